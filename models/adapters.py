"""LoRA adapters on any tower of a multi-tower model, built on peft.

    from tessera.models.adapters import LoraConfig, apply_lora, save_adapter, load_adapter, merge_adapter
    tuned = apply_lora(model, LoraConfig(towers=["image"], rank=8))   # only the adapter trains
    ...train...
    save_adapter(tuned, "runs/x/adapter")            # adapter_config.json + adapter_model.safetensors
    tuned = load_adapter(load_model("runs/base/model"), "runs/x/adapter")
    plain = merge_adapter(tuned)                     # a MultiTowerModel again, no peft needed to run it

Which modules get LoRA: per tower, module names (the last component) from a preset chosen by the tower's
encoder, or from `target_modules`. `nn.Linear`, `nn.MultiheadAttention` (peft adapts its input and output
projections together) and, named explicitly, `nn.Conv2d` modules qualify; `all-linear` takes every Linear and
MultiheadAttention module of the tower. Presets: open_clip ViT towers `attn`, `c_fc`, `c_proj` (`qkv`, `fc1`,
`fc2` of timm-backed configs); ModifiedResNet towers their convolutions `conv1`, `conv2`, `conv3` (the attention
pool passes its projections' weights to a functional call, so LoRA there would never run, and asking for it is
an error); `ast` `qkv`, `proj`, `fc1`, `fc2`; Hugging Face towers peft's own per-model_type defaults; `gnn`
all-linear.
Optionally the adapted towers' projection heads train too (saved in the adapter, as peft's modules_to_save),
and the pairs' temperatures and biases (saved beside it, in `tessera_scales.safetensors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tessera.config import ConfigError, require

ALL_LINEAR = "all-linear"
ADAPTABLE = (nn.Linear, nn.MultiheadAttention, nn.Conv2d)   # Conv2d by name only, never by all-linear
SCALES_FILE = "tessera_scales.safetensors"

OPEN_CLIP_TARGETS = ["attn", "c_fc", "c_proj", "qkv", "fc1", "fc2"]
# ModifiedResNet: the bottlenecks' (and stem's) convolutions. Its attention pool cannot take LoRA: open_clip passes
# q/k/v/c_proj's weights straight to F.multi_head_attention_forward, so wrapped modules would never run.
RESNET_TARGETS = ["conv1", "conv2", "conv3"]
PRESETS: dict[str, list[str]] = {
    "open_clip_image": OPEN_CLIP_TARGETS,
    "open_clip_text": OPEN_CLIP_TARGETS,
    "ast": ["qkv", "proj", "fc1", "fc2"],
    "gnn": [ALL_LINEAR],
}
HF_FALLBACK = ["query", "key", "value", "q_proj", "k_proj", "v_proj", "out_proj", "dense"]


@dataclass
class LoraConfig:
    towers: list[str] | None = field(default=None, metadata={"help": "towers to adapt; default: every tower"})
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA path"})
    target_modules: dict[str, list[str]] = field(default_factory=dict, metadata={
        "help": "per tower, module names to adapt (last name component, or all-linear); default: the "
                "encoder's preset"})
    train_heads: bool = field(default=False, metadata={"help": "also train the adapted towers' projection heads"})
    train_temperatures: bool = field(default=False,
                                     metadata={"help": "also train every pair's temperature (and logit bias)"})

    def __post_init__(self):
        require(self.rank > 0 and self.alpha > 0, "lora.rank and lora.alpha must be positive")
        require(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")


class _FrozenStatistics:
    """Mixin: a batch-norm layer that stays in eval mode, i.e. normalises with its running statistics and never
    updates them, whatever `.train()` asks. An adapter must leave its base as it was, buffers included."""

    def train(self, mode: bool = True):
        return super().train(False)


class FrozenStatsBatchNorm1d(_FrozenStatistics, nn.BatchNorm1d):
    pass


class FrozenStatsBatchNorm2d(_FrozenStatistics, nn.BatchNorm2d):
    pass


class FrozenStatsBatchNorm3d(_FrozenStatistics, nn.BatchNorm3d):
    pass


_FROZEN_STATS = {nn.BatchNorm1d: FrozenStatsBatchNorm1d, nn.BatchNorm2d: FrozenStatsBatchNorm2d,
                 nn.BatchNorm3d: FrozenStatsBatchNorm3d}


def freeze_norm_statistics(model: nn.Module) -> int:
    """Keep every batch-norm layer of `model` in eval mode from now on (same parameters, buffers and state-dict
    keys; only `.train()` changes). Without this, training an adapter on a ModifiedResNet or GNN tower would
    move the frozen base's running statistics toward the few fine-tuning batches. Returns the layers frozen."""
    count = 0
    for module in model.modules():
        frozen = _FROZEN_STATS.get(type(module))
        if frozen is not None:
            module.__class__ = frozen
            module.train(False)
            count += 1
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _FrozenStatistics):
            raise ConfigError(f"cannot freeze the statistics of {type(module).__name__}: adapters support "
                              "BatchNorm1d/2d/3d")
    return count


def _encoder_name(model, tower: str) -> str:
    return model.cfg.towers[tower].encoder


def _is_resnet(model, tower: str) -> bool:
    return type(getattr(model.towers[tower], "tower", None)).__name__ == "ModifiedResNet"


def _bypassed(model, tower: str) -> tuple[str, ...]:
    """Prefixes (in the tower) of modules whose weights the tower reads directly instead of calling them, so a
    LoRA wrapper around them would never run."""
    return ("tower.attnpool.",) if _is_resnet(model, tower) else ()


def _preset(model, tower: str) -> list[str]:
    name = _encoder_name(model, tower)
    if _is_resnet(model, tower):
        return RESNET_TARGETS
    if name in PRESETS:
        return PRESETS[name]
    hf = getattr(model.towers[tower], "model", None)
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    if model_type is not None:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as HF_TARGETS

        return list(HF_TARGETS.get(model_type, HF_FALLBACK))
    return [ALL_LINEAR]


def lora_targets(model, cfg: LoraConfig) -> list[str]:
    """Full names (in `model`) of the modules LoRA adapts. Raises ConfigError for an unknown tower, or for a
    target list that matches no adaptable module of its tower."""
    towers = cfg.towers if cfg.towers is not None else list(model.towers)
    for tower in [*towers, *cfg.target_modules]:
        if tower not in model.towers:
            raise ConfigError(f"lora: the model has no '{tower}' tower (it has {list(model.towers)})")
    targets = []
    for tower in towers:
        wanted = cfg.target_modules.get(tower) or _preset(model, tower)
        explicit = tower in cfg.target_modules
        found: set[str] = set()
        inside_attention: list[str] = []
        bypassed = _bypassed(model, tower)
        for name, module in model.towers[tower].named_modules():
            if not name or not isinstance(module, ADAPTABLE) or any(name.startswith(p) for p in inside_attention):
                continue   # an attention module's own out_proj is adapted with it
            last = name.rsplit(".", 1)[-1]
            by_name = last in wanted
            if by_name and name.startswith(bypassed) and explicit:
                raise ConfigError(f"lora.target_modules.{tower}: '{name}' cannot take LoRA: the tower passes its "
                                  "weight to a functional call instead of running the module (open_clip's ModifiedResNet "
                                  "attention pool); adapt the convolutions (conv1, conv2, conv3) instead")
            if name.startswith(bypassed) or (isinstance(module, nn.Conv2d) and not by_name):
                continue
            if ALL_LINEAR in wanted or by_name:
                targets.append(f"towers.{tower}.{name}")
                found.add(ALL_LINEAR if ALL_LINEAR in wanted else last)
                if isinstance(module, nn.MultiheadAttention):
                    inside_attention.append(name + ".")
        missing = [t for t in wanted if t not in found] if explicit else ([] if found else wanted)
        if missing:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.towers[tower].named_modules()
                            if n and isinstance(m, ADAPTABLE)})
            raise ConfigError(f"lora.target_modules.{tower}: {missing} match no Linear or MultiheadAttention module "
                              f"of the '{_encoder_name(model, tower)}' tower; its adaptable modules are named "
                              f"{names[:20]} (or use all-linear)")
    return targets


def _head_names(model, cfg: LoraConfig) -> list[str]:
    towers = cfg.towers if cfg.towers is not None else list(model.towers)
    return [f"heads.{t}" for t in towers if any(p.numel() for p in model.heads[t].parameters())]


def apply_lora(model, cfg: LoraConfig):
    """`model` wrapped in a peft `PeftModel` with LoRA on the configured towers; only the adapter (and, as
    configured, the heads and temperatures) is trainable, and batch-norm statistics stay fixed. The wrapper
    forwards `encode`, `transforms`, ... to the model, so it is used like one."""
    import peft

    freeze_norm_statistics(model)
    peft_cfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=lora_targets(model, cfg),
                               modules_to_save=_head_names(model, cfg) if cfg.train_heads else None)
    tuned = peft.get_peft_model(model, peft_cfg)
    if cfg.train_temperatures:
        for p in _scale_parameters(model).values():
            p.requires_grad_(True)
    return tuned


def _scale_parameters(model) -> dict[str, nn.Parameter]:
    out = {f"logit_scales.{k}": p for k, p in model.logit_scales.items()}
    if hasattr(model, "logit_biases"):
        out.update({f"logit_biases.{k}": p for k, p in model.logit_biases.items()})
    return out


def parameter_counts(model) -> dict[str, int]:
    """{"trainable": ..., "total": ...} parameter counts."""
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def save_adapter(tuned, out_dir: str | Path) -> list[Path]:
    """The adapter alone, in peft's format (+ the temperatures when they were trained); returns the files."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tuned.save_pretrained(out_dir)
    base = tuned.get_base_model()
    scales = {k: p.detach().cpu().contiguous() for k, p in _scale_parameters(base).items() if p.requires_grad}
    if scales:
        save_file(scales, str(out_dir / SCALES_FILE))
    return sorted(p for p in out_dir.iterdir() if p.suffix in (".json", ".safetensors"))


def load_adapter(model, adapter_dir: str | Path, trainable: bool = False):
    """`model` (a MultiTowerModel) with the adapter at `adapter_dir` on it: LoRA (a PeftModel), or prompts
    (`tessera.models.prompts.load_prompts`). An adapter made for another base (a module it adapts is missing, or has
    another shape) is a ConfigError that names the difference."""
    import peft
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .prompts import is_prompt_adapter, load_prompts

    adapter_dir = Path(adapter_dir)
    if is_prompt_adapter(adapter_dir):
        return load_prompts(model, adapter_dir, trainable)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"'{adapter_dir}' is not an adapter directory (no adapter_config.json or prompt_config.json)")
    try:
        tuned = peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ConfigError(f"adapter '{adapter_dir}' does not fit this model (made for another base?): "
                          f"{str(exc).splitlines()[0][:400]}") from None
    # peft adapts the modules it finds and drops saved weights it has no place for; a weight left over means
    # the adapter was made for another base (e.g. a deeper one)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        saved = set(f.keys())
    unused = sorted(saved - set(peft.get_peft_model_state_dict(tuned)))
    if unused:
        raise ConfigError(f"adapter '{adapter_dir}' does not fit this model (made for another base?): "
                          f"{len(unused)} of its weights have no place in it, e.g. {unused[:3]}")
    scales_path = adapter_dir / SCALES_FILE
    if scales_path.is_file():
        params = _scale_parameters(model)
        for key, value in load_file(str(scales_path)).items():
            if key not in params or params[key].shape != value.shape:
                raise ConfigError(f"adapter '{adapter_dir}': temperature '{key}' has no counterpart in this model "
                                  f"(its pairs: {sorted(params)})")
            with torch.no_grad():
                params[key].copy_(value)
            params[key].requires_grad_(trainable)
    return tuned


def merge_adapter(tuned) -> Any:
    """The adapted model with LoRA folded into its weights: a plain MultiTowerModel (export it with save_model).
    Prompts cannot be folded into weights: a model carrying them is returned as it is."""
    if getattr(tuned, "prompt_learner", None) is not None:
        return tuned
    return tuned.merge_and_unload()
