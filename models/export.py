"""Exported models: `tessera_model.safetensors` + `config.yaml`, loadable with one call and without DeepSpeed, and
beside them the same model in the formats other tools load (`open_clip/`: see `open_clip_io`).

from tessera.models import load_model
model = load_model("runs/demo/model")
emb = model.encode("text", model.transforms(is_train=False)["text"]("a red circle")[None])

The weights file is not called `model.safetensors`: that is the name `transformers` looks for, and its
`from_pretrained` would quietly build a random model around a file whose keys it does not know. Exports written
before the rename still load.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml

from tessera.config import ConfigError
from tessera.durable import staged_dir

from .config import FORMAT, FORMAT_VERSION, read_model_config
from .multitower import MultiTowerModel

log = logging.getLogger(__name__)


class NotRepresentable(ConfigError):
    """The model (or part of it) has no form in another tool's format; the message says which part and why."""


WEIGHTS_FILE = "tessera_model.safetensors"
LEGACY_WEIGHTS_FILE = "model.safetensors"  # exports written before Tessera wrote open_clip and HF forms beside
# formats written beside the Tessera files by default, each in its own subdirectory when the model has that form
DEFAULT_FORMATS = ("open_clip",)


def save_model(
    model: MultiTowerModel,
    out_dir: str | Path,
    metadata: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
) -> Path:
    """Write `model` to `out_dir` atomically and durably: a crash leaves either the old export or the new one,
    fsynced, with the permissions the umask gives.

    `state_dict` (e.g. fp32 master weights gathered from a DeepSpeed engine) replaces the module's own
    tensors when given. `formats` ("open_clip", "hf") are also written, into `out_dir/<format>`, where the model
    has such a form; where it has none, the log says why and the Tessera export stands alone.
    """
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": model.export_config(tmp),
            "metadata": metadata or {},
        }
        (tmp / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        if state_dict is None:
            # save_model (not save_file) handles tensors that share storage, e.g. tied embeddings.
            safetensors.torch.save_model(model, str(tmp / WEIGHTS_FILE))
        else:
            tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
            safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_FILE))
        _write_formats(tmp, out_dir, formats)
    return out_dir


def check_out_dir(out_dir: Path, is_same_kind, what: str, source: Path | None = None) -> None:
    """`out_dir` may be replaced only where it is absent, empty, or a previous `what` (`is_same_kind(out_dir)`), and
    never the source it is made from or a folder holding it: a wrong --out must not delete a user's files."""
    out_dir = Path(out_dir).resolve()
    if source is not None:
        src = Path(source).resolve()
        if out_dir == src or out_dir in src.parents:
            raise ConfigError(f"--out {out_dir} is (or holds) the source {src}; choose another folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not is_same_kind(out_dir):
        raise ConfigError(f"{out_dir} exists and is not {what}; it would be replaced: choose an empty or new folder")


def is_tessera_export(path: Path) -> bool:
    try:
        doc = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def write_format(
    model_dir: Path, fmt: str, out_dir: Path | None = None, truncate_dim: int | None = None
) -> tuple[Path, list[str]]:
    """Write the export `model_dir` in another tool's format (default `model_dir/<fmt>`), atomically, serving the
    first `truncate_dim` features of the embedding where given. Returns the directory and notes on what that format
    leaves out; NotRepresentable says why the model has no such form. Format "tessera": a Tessera export (with
    its default formats beside it), e.g. a Matryoshka model served at a smaller width."""
    if fmt == "tessera":
        return export_truncated(model_dir, out_dir, truncate_dim), []
    writers = {"open_clip": "open_clip_io:export_open_clip", "hf": "hf_clip_io:export_hf"}  # imported when used
    if fmt not in writers:
        raise ConfigError(f"unknown export format '{fmt}'; one of {sorted(writers) + ['tessera']}")
    module, func = writers[fmt].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), func)(model_dir, out_dir, truncate_dim)


def load_truncated(model_dir: Path, truncate_dim: int | None) -> MultiTowerModel:
    """The export in `model_dir`, serving `truncate_dim` features where given (else as exported)."""
    model = load_model(model_dir)
    return model.truncate(truncate_dim) if truncate_dim is not None else model


def export_truncated(model_dir: Path, out_dir: Path | None, truncate_dim: int | None) -> Path:
    """A copy of the export `model_dir` in `out_dir` that serves `truncate_dim` features (its weights are the same:
    the config says how many features to keep)."""
    if out_dir is None:
        raise ConfigError("--format tessera writes a new Tessera export: give it --out")
    model_dir = Path(model_dir)
    check_out_dir(Path(out_dir), is_tessera_export, "a Tessera export", model_dir)
    metadata = (yaml.safe_load((model_dir / "config.yaml").read_text()) or {}).get("metadata") or {}
    metadata = {**metadata, "truncated_from": str(model_dir)} if truncate_dim is not None else metadata
    return save_model(load_truncated(model_dir, truncate_dim), out_dir, metadata=metadata)


def _write_formats(tmp: Path, out_dir: Path, formats: tuple[str, ...]) -> None:
    """`formats` beside the Tessera files in `tmp` (to be published as `out_dir`), each where the model has it."""
    for fmt in formats:
        try:
            _, notes = write_format(tmp, fmt)
        except NotRepresentable as exc:
            log.info("no %s export: %s", fmt, exc)
        except Exception as exc:  # a converter's bug must not cost the user the Tessera export itself
            log.error("the %s export failed; %s has the Tessera export without it: %r", fmt, out_dir, exc)
        else:
            log.info("%s export: %s%s", fmt, out_dir / fmt, "".join(f"; {n}" for n in notes))


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> MultiTowerModel:
    """Rebuild an exported model and load its weights (strict: every tensor must match)."""
    model_dir = Path(model_dir)
    model = MultiTowerModel(read_model_config(model_dir))
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file() and (model_dir / LEGACY_WEIGHTS_FILE).is_file():
        weights = model_dir / LEGACY_WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"'{model_dir}' has config.yaml but no {WEIGHTS_FILE}")
    missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False, device=str(device))
    if missing or unexpected:
        raise ConfigError(
            f"{weights} does not match its config.yaml: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device).eval()
