"""Export a trained DeepSpeed engine as a plain model directory (fp32 master weights, no DeepSpeed): the trained
weights, the weights' moving average (train.ema), or both, as export.weights says."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from tessera.models import MultiTowerModel, load_model, save_model
from tessera.models.adapters import carries_prompts, fingerprint, load_adapter, merge_adapter, save_adapter

from ..distributed.deepspeed_setup import deepspeed
from ..distributed.groups import DistInfo, barrier
from .distill import MAPS
from .ema import WeightEMA


def _training_only(name: str) -> bool:
    """Whether a tensor belongs to what trains with the model but is not part of it: distillation's maps into a
    teacher's width."""
    return name.startswith(MAPS + ".")


def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 value, from the optimizer's master copy where DeepSpeed keeps one.

    A collective under ZeRO-3 (parameters are gathered): every rank must call it.
    """
    module = engine.module
    master = {}
    # Stage 0 with bf16/fp16 keeps fp32 masters in the optimizer's groups, which safe_get_* does not see.
    opt = engine.optimizer
    for lp_group, hp_group in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
        for lp, hp in zip(lp_group, hp_group):
            if lp.shape == hp.shape:
                master[id(lp)] = hp
    state = {}
    for name, p in module.named_parameters():
        if _training_only(name):
            continue
        full = deepspeed.utils.safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            full = master.get(id(p))
        if full is None:
            if hasattr(p, "ds_id"):  # a frozen ZeRO-3 parameter: gather it
                with deepspeed.zero.GatheredParameters([p]):
                    full = p.detach().clone()
            else:
                full = p.detach()
        state[name] = full.detach().float().cpu().clone()
    param_names = set(state)
    for name, buf in module.state_dict().items():
        if name not in param_names and not _training_only(name) and isinstance(buf, torch.Tensor):
            buf = buf.detach().cpu().clone()
            state[name] = buf.float() if buf.is_floating_point() else buf
    return state


def weight_states(engine, ema: WeightEMA | None, weights: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The full fp32 state dict of each of `weights`: "raw", the trained weights (`full_fp32_state_dict`); "ema", the
    same with the trainable parameters' moving average in their place. A collective under ZeRO-3."""
    state = full_fp32_state_dict(engine)
    out = {}
    for kind in weights:
        if kind == "raw":
            out[kind] = state
        elif ema is None:
            raise ValueError(f"export of the {kind} weights needs the run's weight EMA (train.ema)")
        else:
            out[kind] = {**state, **{k: v for k, v in ema.state_dict().items() if not _training_only(k)}}
    return out


def _recorded(metadata: dict[str, Any] | None, kind: str, ema: WeightEMA | None) -> dict[str, Any]:
    """An export's metadata, saying which weights it holds (and the average's settings)."""
    return {**(metadata or {}), "weights": kind, **({"ema": ema.describe()} if kind == "ema" and ema else {})}


def export_engine(
    engine,
    model: MultiTowerModel,
    out_dirs: dict[str, Path],
    dist: DistInfo,
    metadata: dict[str, Any] | None = None,
    ema: WeightEMA | None = None,
) -> None:
    """Write each folder of `out_dirs` ({"raw" or "ema": folder}) with those weights (`weight_states`). A
    collective."""
    states = weight_states(engine, ema, out_dirs)
    if dist.is_main:
        for kind, out_dir in out_dirs.items():
            save_model(model, out_dir, metadata=_recorded(metadata, kind, ema), state_dict=states[kind])
    barrier()


def export_adapter(
    engine,
    base: str,
    attach: Callable,
    out_dir: Path,
    dist: DistInfo,
    merged: bool,
    metadata: dict[str, Any] | None = None,
    suffixes: dict[str, str] | None = None,
    ema: WeightEMA | None = None,
) -> dict[str, str]:
    """OUTPUT_DIR/adapter (the trained weights, from DeepSpeed's fp32 masters: LoRA in peft's format, or prompts)
    and, for LoRA with `merged`, OUTPUT_DIR/model: the base with the adapter folded in. `suffixes` ({"raw" or "ema":
    suffix}, default {"raw": ""}) names the weights to export and their folders' suffixes (adapter-ema, model-ema).
    The adapter goes onto a fresh fp32 copy of the base (`attach(base model)` puts an untrained one on it), never
    onto the engine's module, whose frozen weights DeepSpeed may hold in bf16. A collective."""
    suffixes = suffixes or {"raw": ""}
    states = weight_states(engine, ema, suffixes)
    out = {}
    for kind, suffix in suffixes.items():
        adapter_dir, model_dir = out_dir / f"adapter{suffix}", out_dir / f"model{suffix}"
        out[adapter_dir.name] = str(adapter_dir)
        if not dist.is_main:
            continue
        plain = load_model(base)
        identity = (base, fingerprint(plain))
        fresh = attach(plain)
        trained = {n for n, p in fresh.named_parameters() if p.requires_grad}
        fresh.load_state_dict({n: states[kind][n] for n in trained}, strict=False)
        save_adapter(fresh, adapter_dir, base=identity)
        if merged and not carries_prompts(fresh):  # prompts live in the inputs, not in weights: nothing to merge
            merged_model = merge_adapter(load_adapter(load_model(base), adapter_dir))
            save_model(merged_model, model_dir, metadata=_recorded(metadata, kind, ema))
            out[model_dir.name] = str(model_dir)
    barrier()
    return out
