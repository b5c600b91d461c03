"""What the Hugging Face towers (`hf_text`, `hf_audio`) share: a model from a local directory or an in-code
config, never from the hub, and its gradient checkpointing switch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_LORA_TARGETS
from transformers import AutoConfig, AutoModel

from tessera.config import require

# LoRA targets of a model type peft has no preset for: the usual attention projection names
HF_FALLBACK_TARGETS = ["query", "key", "value", "q_proj", "k_proj", "v_proj", "out_proj", "dense"]


def require_local_source(name: str, path: str | None, config: dict[str, Any], examples: str) -> None:
    """Exactly one of `path` (a local model directory) and `config` (an in-code config with a model_type)."""
    require(
        (path is None) != (not config),
        f"{name}: give exactly one of 'path' (a local directory) or 'config' (an in-code HF config)",
    )
    if path is not None:
        require(
            Path(path, "config.json").is_file(),
            f"{name}: '{path}' is not a local Hugging Face model directory (no config.json); "
            "models are never downloaded",
        )
    else:
        require("model_type" in config, f"{name}.config needs a 'model_type' (e.g. {examples})")


def build_hf_model(
    path: str | None, config: dict[str, Any], load_weights: bool, check: Callable[[Any], None] = lambda hf_cfg: None
) -> tuple[Any, Any]:
    """(model, its HF config) from a local directory (its weights unless `load_weights` is false) or from an
    in-code config; `check(hf_cfg)` runs before any weight is loaded."""
    if path is not None:
        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        check(hf_cfg)
        if load_weights:
            return AutoModel.from_pretrained(path, local_files_only=True), hf_cfg
        return AutoModel.from_config(hf_cfg), hf_cfg
    kwargs = dict(config)
    hf_cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    check(hf_cfg)
    return AutoModel.from_config(hf_cfg), hf_cfg


def set_hf_grad_checkpointing(model: Any, enable: bool) -> None:
    if enable:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()


def hf_lora_targets(model: Any) -> list[str]:
    """peft's own LoRA targets for the model's type (its attention projections)."""
    return list(PEFT_LORA_TARGETS.get(model.config.model_type, HF_FALLBACK_TARGETS))
