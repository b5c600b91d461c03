"""Export a trained DeepSpeed engine as a plain model directory (fp32 master weights, no DeepSpeed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tessera.models import MultiTowerModel, load_model, save_model
from tessera.models.adapters import carries_prompts, fingerprint, load_adapter, merge_adapter, save_adapter

from ..distributed.deepspeed_setup import deepspeed
from ..distributed.groups import DistInfo, barrier


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
        if name not in param_names and isinstance(buf, torch.Tensor):
            buf = buf.detach().cpu().clone()
            state[name] = buf.float() if buf.is_floating_point() else buf
    return state


def export_engine(
    engine, model: MultiTowerModel, out_dir: Path, dist: DistInfo, metadata: dict[str, Any] | None = None
) -> Path | None:
    state = full_fp32_state_dict(engine)
    if dist.is_main:
        save_model(model, out_dir, metadata=metadata, state_dict=state)
    barrier()
    return out_dir if dist.is_main else None


def export_adapter(
    engine,
    base: str,
    attach: Callable,
    out_dir: Path,
    dist: DistInfo,
    merged: bool,
    metadata: dict[str, Any] | None = None,
) -> dict[str, str]:
    """OUTPUT_DIR/adapter (the trained weights, from DeepSpeed's fp32 masters: LoRA in peft's format, or prompts)
    and, for LoRA with `merged`, OUTPUT_DIR/model: the base with the adapter folded in. The adapter goes onto a
    fresh fp32 copy of the base (`attach(base model)` puts an untrained one on it), never onto the engine's module,
    whose frozen weights DeepSpeed may hold in bf16. A collective."""
    state = full_fp32_state_dict(engine)
    out = {"adapter": str(out_dir / "adapter")}
    if dist.is_main:
        plain = load_model(base)
        identity = (base, fingerprint(plain))
        fresh = attach(plain)
        trained = {n for n, p in fresh.named_parameters() if p.requires_grad}
        fresh.load_state_dict({n: state[n] for n in trained}, strict=False)
        save_adapter(fresh, out_dir / "adapter", base=identity)
        if carries_prompts(fresh):
            merged = False  # prompts live in the inputs, not in weights: nothing to merge
        if merged:
            save_model(
                merge_adapter(load_adapter(load_model(base), out_dir / "adapter")), out_dir / "model", metadata=metadata
            )
            out["model"] = str(out_dir / "model")
    barrier()
    return out
