"""LoRA adapters on any tower of a multi-tower model, built on peft.

    from tessera.models.lora import LoraConfig, apply_lora
    from tessera.models.adapters import save_adapter, load_adapter, merge_adapter
    tuned = apply_lora(model, LoraConfig(towers=["image"], rank=8))   # only the adapter trains
    ...train...
    save_adapter(tuned, "runs/x/adapter")            # adapter_config.json + adapter_model.safetensors
    tuned = load_adapter(load_model("runs/base/model"), "runs/x/adapter")
    plain = merge_adapter(tuned)                     # a MultiTowerModel again, no peft needed to run it

Which modules get LoRA: per tower, module names (the last component) from the tower's own preset (each encoder
declares it: `Encoder.lora_targets`), or from `target_modules`. `nn.Linear`, `nn.MultiheadAttention` (peft adapts
its input and output projections together) and, named explicitly, `nn.Conv2d` modules qualify; `all-linear` takes
every Linear and MultiheadAttention module of the tower. A module the tower never calls (its weights go to a
functional call, as in open_clip's ModifiedResNet attention pool: `Encoder.lora_unreachable`) is never adapted,
and asking for it is an error.
Optionally the adapted towers' projection heads train too (saved in the adapter, as peft's modules_to_save),
and the pairs' temperatures and biases (saved beside it, in `tessera_scales.safetensors`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tessera.config import ConfigError

from .adapter_config import LoraConfig
from .encoder import ALL_LINEAR
from .freeze import freeze_norm_statistics

ADAPTABLE = (nn.Linear, nn.MultiheadAttention, nn.Conv2d)  # Conv2d by name only, never by all-linear
CONFIG_FILE = "adapter_config.json"  # peft's
SCALES_FILE = "tessera_scales.safetensors"


def _tower_targets(model, tower: str, wanted: list[str], explicit: bool) -> list[str]:
    """Full names of the modules of one tower that LoRA adapts."""
    encoder = model.towers[tower]
    unreachable = encoder.lora_unreachable()
    targets: list[str] = []
    found: set[str] = set()
    inside_attention: list[str] = []
    for name, module in encoder.named_modules():
        if not name or not isinstance(module, ADAPTABLE) or any(name.startswith(p) for p in inside_attention):
            continue  # an attention module's own out_proj is adapted with it
        last = name.rsplit(".", 1)[-1]
        by_name = last in wanted
        if by_name and name.startswith(unreachable) and explicit:
            raise ConfigError(
                f"lora.target_modules.{tower}: '{name}' cannot take LoRA: the tower passes its weight "
                "to a functional call instead of running the module; adapt one of its presets "
                f"({encoder.lora_targets()}) instead"
            )
        if name.startswith(unreachable) or (isinstance(module, nn.Conv2d) and not by_name):
            continue
        if ALL_LINEAR in wanted or by_name:
            targets.append(f"towers.{tower}.{name}")
            found.add(ALL_LINEAR if ALL_LINEAR in wanted else last)
            if isinstance(module, nn.MultiheadAttention):
                inside_attention.append(name + ".")
    missing = [t for t in wanted if t not in found] if explicit else ([] if found else wanted)
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in encoder.named_modules() if n and isinstance(m, ADAPTABLE)})
        raise ConfigError(
            f"lora.target_modules.{tower}: {missing} match no Linear or MultiheadAttention module "
            f"of the '{model.cfg.towers[tower].encoder}' tower; its adaptable modules are named "
            f"{names[:20]} (or use all-linear)"
        )
    return targets


def lora_targets(model, cfg: LoraConfig) -> list[str]:
    """Full names (in `model`) of the modules LoRA adapts. Raises ConfigError for an unknown tower, or for a
    target list that matches no adaptable module of its tower."""
    towers = cfg.towers if cfg.towers is not None else list(model.towers)
    for tower in [*towers, *cfg.target_modules]:
        if tower not in model.towers:
            raise ConfigError(f"lora: the model has no '{tower}' tower (it has {list(model.towers)})")
    targets = []
    for tower in towers:
        explicit = bool(cfg.target_modules.get(tower))  # an empty list asks for the preset, as no entry does
        wanted = cfg.target_modules[tower] if explicit else model.towers[tower].lora_targets()
        targets += _tower_targets(model, tower, wanted, explicit)
    return targets


def _head_names(model, cfg: LoraConfig) -> list[str]:
    towers = cfg.towers if cfg.towers is not None else list(model.towers)
    return [f"heads.{t}" for t in towers if any(p.numel() for p in model.heads[t].parameters())]


def scale_parameters(model) -> dict[str, nn.Parameter]:
    """Every pair's temperature (and logit bias), by its name in the model."""
    out = {f"logit_scales.{k}": p for k, p in model.logit_scales.items()}
    if hasattr(model, "logit_biases"):
        out.update({f"logit_biases.{k}": p for k, p in model.logit_biases.items()})
    return out


def apply_lora(model, cfg: LoraConfig):
    """`model` wrapped in a peft `PeftModel` with LoRA on the configured towers; only the adapter (and, as
    configured, the heads and temperatures) is trainable, and batch-norm statistics stay fixed. The wrapper
    forwards `encode`, `transforms`, ... to the model, so it is used like one."""
    freeze_norm_statistics(model)
    peft_cfg = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_targets(model, cfg),
        modules_to_save=_head_names(model, cfg) if cfg.train_heads else None,
    )
    tuned = peft.get_peft_model(model, peft_cfg)
    if cfg.train_temperatures:
        for p in scale_parameters(model).values():
            p.requires_grad_(True)
    return tuned


def save_lora(tuned, out_dir: str | Path) -> list[Path]:
    """The adapter alone, in peft's format (+ the temperatures when they were trained); returns the files."""
    out_dir = Path(out_dir)
    tuned.save_pretrained(out_dir)
    scales = {
        k: p.detach().cpu().contiguous() for k, p in scale_parameters(tuned.get_base_model()).items() if p.requires_grad
    }
    if scales:
        save_file(scales, str(out_dir / SCALES_FILE))
    return sorted(p for p in out_dir.iterdir() if p.suffix in (".json", ".safetensors"))


def is_lora_adapter(adapter_dir: str | Path) -> bool:
    return (Path(adapter_dir) / CONFIG_FILE).is_file()


def load_lora(model, adapter_dir: str | Path, trainable: bool = False) -> Any:
    """`model` (a MultiTowerModel) with the LoRA adapter at `adapter_dir` on it, as a PeftModel. An adapter made for
    another base (a module it adapts is missing, or has another shape) is a ConfigError that names the difference."""
    adapter_dir = Path(adapter_dir)
    try:
        tuned = peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ConfigError(
            f"adapter '{adapter_dir}' does not fit this model (made for another base?): "
            f"{str(exc).splitlines()[0][:400]}"
        ) from None
    # peft adapts the modules it finds and drops saved weights it has no place for; a weight left over means
    # the adapter was made for another base (e.g. a deeper one)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        saved = set(f.keys())
    unused = sorted(saved - set(peft.get_peft_model_state_dict(tuned)))
    if unused:
        raise ConfigError(
            f"adapter '{adapter_dir}' does not fit this model (made for another base?): "
            f"{len(unused)} of its weights have no place in it, e.g. {unused[:3]}"
        )
    scales_path = adapter_dir / SCALES_FILE
    if scales_path.is_file():
        params = scale_parameters(model)
        for key, value in load_file(str(scales_path)).items():
            if key not in params or params[key].shape != value.shape:
                raise ConfigError(
                    f"adapter '{adapter_dir}': temperature '{key}' has no counterpart in this model "
                    f"(its pairs: {sorted(params)})"
                )
            with torch.no_grad():
                params[key].copy_(value)
            params[key].requires_grad_(trainable)
    return tuned
