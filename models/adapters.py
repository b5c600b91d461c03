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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import peft

from tessera.config import ConfigError

from .freeze import parameter_counts
from .lora import LoraConfig, apply_lora, is_lora_adapter, load_lora, save_lora
from .prompts import PromptConfig, apply_prompts, is_prompt_adapter, load_prompts, save_prompts

__all__ = ["AdapterConfig", "apply_adapter", "load_adapter", "merge_adapter", "parameter_counts", "save_adapter"]


@dataclass
class AdapterConfig:
    kind: Literal["lora", "prompt", "full"] = field(
        default="lora",
        metadata={
            "help": "lora: train LoRA adapters on the base (peft); prompt: train prompt vectors (CoOp context in the "
            "class prompts, VPT tokens in a ViT, peft prompt tuning of a Hugging Face text tower); full: train "
            "every weight of the base"
        },
    )
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    export_merged: bool = field(
        default=True,
        metadata={
            "help": "also write OUTPUT_DIR/model: the base with the LoRA adapter merged in (no peft needed to run it); "
            "prompts cannot be merged into weights"
        },
    )

    @property
    def lr_scales(self) -> dict[str, float]:
        """Parameter-name substrings that take their own learning rate, as multiples of train.lr."""
        return {"visual_prompts": self.prompt.visual_lr_scale} if self.kind == "prompt" else {}


def apply_adapter(model, cfg: AdapterConfig, classnames: list[str] | None = None):
    """The base `model` with the configured adapter on it (LoRA or prompts); unchanged for full fine-tuning.
    `classnames` are those of class-specific prompt context."""
    if cfg.kind == "lora":
        return apply_lora(model, cfg.lora)
    if cfg.kind == "prompt":
        return apply_prompts(model, cfg.prompt, classnames)
    return model


def carries_prompts(model) -> bool:
    return getattr(model, "prompt_learner", None) is not None


def save_adapter(model, out_dir: str | Path) -> list[Path]:
    """The trained part of an adapted model, in its own format (peft's for LoRA); returns the files written."""
    return save_prompts(model, out_dir) if carries_prompts(model) else save_lora(model, out_dir)


def load_adapter(model, adapter_dir: str | Path, trainable: bool = False):
    """`model` (a MultiTowerModel) with the adapter at `adapter_dir` on it: LoRA (a PeftModel), or prompts. An adapter
    made for another base (a module it adapts is missing, or has another shape) is a ConfigError naming the
    difference."""
    if is_prompt_adapter(adapter_dir):
        return load_prompts(model, adapter_dir, trainable)
    if not is_lora_adapter(adapter_dir):
        raise ConfigError(f"'{adapter_dir}' is not an adapter directory (no adapter_config.json or prompt_config.json)")
    return load_lora(model, adapter_dir, trainable)


def merge_adapter(model) -> Any:
    """The adapted model with LoRA folded into its weights: a plain MultiTowerModel (export it with save_model).
    Prompts cannot be folded into weights: a model carrying them (or no adapter) is returned as it is."""
    return model.merge_and_unload() if isinstance(model, peft.PeftModel) else model
