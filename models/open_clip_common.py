"""What open_clip's image and text towers share: named model configs, overrides of their fields, and loading the
part of a local open_clip checkpoint that belongs to one tower.

Any open_clip model config name works (`ViT-B-32`, `ViT-L-14`, `RN50`, timm-backed configs, ...); `overrides`
changes individual fields of open_clip's `CLIPVisionCfg` / `CLIPTextCfg`, which is how the tiny CPU configs are
written. Only the architecture is taken from open_clip: no weights are ever downloaded. `pretrained` may point at
a local open_clip checkpoint to initialise a tower from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import safe_open

from tessera.config import ConfigError, closest, require

from .weights import load_state_dict_file

# LoRA presets of open_clip's transformer towers: its own blocks, and those of timm-backed configs
TRANSFORMER_TARGETS = ["attn", "c_fc", "c_proj", "qkv", "fc1", "fc2"]


def named_config(name: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(
            f"'{name}' is not an open_clip model config.{closest(name, open_clip.list_models())}"
            " See open_clip.list_models()."
        )
    return cfg


def check_overrides(overrides: dict[str, Any], cfg_cls: type, what: str) -> None:
    names = [f.name for f in dataclasses.fields(cfg_cls)]
    for key in overrides:
        require(
            key in names,
            f"overrides: '{key}' is not a field of open_clip's {cfg_cls.__name__} ({what}).{closest(key, names)}",
        )


def quick_gelu(cfg: Any) -> bool:
    if cfg.quick_gelu is not None:
        return cfg.quick_gelu
    return bool(named_config(cfg.model).get("quick_gelu", False))


def read_clip_state(path) -> dict[str, torch.Tensor]:
    """The CLIP state dict in an open_clip checkpoint: a state-dict file, or an `open_clip_train` checkpoint (which
    wraps it in `state_dict`, with DDP's `module.` prefix)."""
    state = load_state_dict_file(path)
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def pretrained_temperature(path: str) -> dict[str, torch.Tensor]:
    """The `logit_scale` (and SigLIP's `logit_bias`) of an open_clip checkpoint, as far as it has them."""
    names = ("logit_scale", "logit_bias")
    if str(path).endswith(".safetensors") and Path(path).is_file():  # two scalars, not the whole file
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in names if k in f.keys()}
    state = read_clip_state(path)
    return {k: state[k] for k in names if k in state}


def load_pretrained(module: torch.nn.Module, path: str, prefixes: tuple[str, ...], keep_bare: tuple[str, ...]):
    """Load the part of an open_clip checkpoint that belongs to one tower."""
    state = read_clip_state(path)
    picked = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                picked[key[len(prefix) :]] = value
                break
        else:
            if key.startswith(keep_bare):
                picked[key] = value
    if not picked:
        raise ConfigError(f"pretrained '{path}' holds no weights for this tower (looked for {prefixes + keep_bare})")
    try:
        result = module.load_state_dict(picked, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        raise ConfigError(f"pretrained '{path}' does not match the tower's architecture: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"pretrained '{path}' does not match the tower's architecture: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
