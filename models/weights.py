"""Safe loading of weight files: safetensors, or torch files with `weights_only=True` (never unpickling code)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tessera.config import ConfigError


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise ConfigError(f"cannot load weights from '{path}' safely (weights_only=True): {exc}") from exc
    if not isinstance(state, dict):
        raise ConfigError(f"'{path}' holds a {type(state).__name__}, not a state dict")
    return state
