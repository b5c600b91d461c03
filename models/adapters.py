"""Adapters: what fine-tuning trains on top of an exported model, and the directory it travels in. LoRA (`lora`) and
prompts (`prompts`) behind one config and one save, load and merge.

    from tessera.models import load_model
    from tessera.models.adapters import AdapterConfig, apply_adapter, save_adapter, load_adapter, merge_adapter
    tuned = apply_adapter(load_model("runs/demo/model"), AdapterConfig(kind="lora"))   # only the adapter trains
    ...train...
    save_adapter(tuned, "runs/x/adapter")     # LoRA: peft's adapter_config.json + adapter_model.safetensors
    tuned = load_adapter(load_model("runs/demo/model"), "runs/x/adapter")             # either kind
    plain = merge_adapter(tuned)              # LoRA folded into the weights: a plain MultiTowerModel
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from tessera.config import ConfigError

from .adapter_config import AdapterConfig
from .freeze import parameter_counts

__all__ = [
    "AdapterConfig",
    "apply_adapter",
    "fingerprint",
    "load_adapter",
    "merge_adapter",
    "parameter_counts",
    "save_adapter",
]
log = logging.getLogger(__name__)
# each kind's own module, imported when an adapter of that kind is used: they import peft (seconds), which a
# pretraining run, an evaluation without --adapter and `--help` never need
KINDS = {"lora": "tessera.models.lora", "prompt": "tessera.models.prompts"}
BASE_FILE = "base.json"  # in an adapter directory: the base it was trained on (its path and weights' fingerprint)


def apply_adapter(model, cfg: AdapterConfig, classnames: list[str] | None = None):
    """The base `model` with the configured adapter on it (LoRA or prompts); unchanged for full fine-tuning.
    `classnames` are those of class-specific prompt context."""
    if cfg.kind == "lora":
        return _kind("lora").apply_lora(model, cfg.lora)
    if cfg.kind == "prompt":
        return _kind("prompt").apply_prompts(model, cfg.prompt, classnames)
    return model


def _kind(kind: str):
    return importlib.import_module(KINDS[kind])


def carries_prompts(model) -> bool:
    return getattr(model, "prompt_learner", None) is not None


def fingerprint(model) -> str:
    """sha256 of a plain model's state: every parameter's and buffer's name, dtype, shape and value. A re-export of
    the same weights has the same one; any other base (another seed, more training) has another."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


def save_adapter(model, out_dir: str | Path, base: tuple[str, str] | None = None) -> list[Path]:
    """The trained part of an adapted model, in its own format (peft's for LoRA); returns the files written. `base`:
    (path, `fingerprint`) of the base it was trained on, recorded so that it only ever loads onto that base."""
    if carries_prompts(model):
        files = _kind("prompt").save_prompts(model, out_dir)
    else:
        files = _kind("lora").save_lora(model, out_dir)
    if base is not None:
        path = Path(out_dir) / BASE_FILE
        path.write_text(json.dumps({"path": str(base[0]), "fingerprint": base[1]}, indent=2) + "\n")
        files.append(path)
    return files


def check_base(model, adapter_dir: str | Path) -> None:
    """ConfigError unless `model` is the base the adapter at `adapter_dir` was trained on (where it says)."""
    record = Path(adapter_dir) / BASE_FILE
    if not record.is_file():
        log.warning("adapter '%s' does not record its base: it cannot be checked against this model", adapter_dir)
        return
    try:
        saved = json.loads(record.read_text())
        path, expected = saved["path"], saved["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"adapter '{adapter_dir}': {BASE_FILE} cannot be read ({exc})") from None
    actual = fingerprint(model)
    if actual != expected:
        raise ConfigError(
            f"adapter '{adapter_dir}' was trained on the base '{path}' (weights {expected[:12]}), and this model is "
            f"another (weights {actual[:12]}): load it onto the base it was trained on"
        )


def load_adapter(model, adapter_dir: str | Path, trainable: bool = False):
    """`model` (a MultiTowerModel) with the adapter at `adapter_dir` on it: LoRA (a PeftModel), or prompts. An adapter
    made for another base (a module it adapts is missing, or has another shape) is a ConfigError naming the
    difference, and so is one whose recorded base (`BASE_FILE`) is not `model`."""
    lora, prompts = _kind("lora"), _kind("prompt")
    if not prompts.is_prompt_adapter(adapter_dir) and not lora.is_lora_adapter(adapter_dir):
        raise ConfigError(f"'{adapter_dir}' is not an adapter directory (no adapter_config.json or prompt_config.json)")
    check_base(model, adapter_dir)
    if prompts.is_prompt_adapter(adapter_dir):
        return prompts.load_prompts(model, adapter_dir, trainable)
    return lora.load_lora(model, adapter_dir, trainable)


def merge_adapter(model) -> Any:
    """The adapted model with LoRA folded into its weights: a plain MultiTowerModel (export it with save_model).
    Prompts cannot be folded into weights: a model carrying them (or no adapter) is returned as it is."""
    merge = getattr(model, "merge_and_unload", None)  # a peft model's (LoRA); a MultiTowerModel has none
    return merge() if merge is not None else model
