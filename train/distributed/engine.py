"""The DeepSpeed engine: optimizer parameter groups, schedule, precision, ZeRO, clipping, accumulation."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from tessera.config import ConfigError

from ..components.guard import SkippableAdamW
from ..recipes.config import DeepSpeedConfig, TrainConfig
from .deepspeed_setup import deepspeed
from .groups import init_distributed

log = logging.getLogger(__name__)


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, lr_scales: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on 0/1-d tensors (norms, biases, temperatures, class tokens). With
    `lr_scales` ({parameter-name substring: factor}), the matching parameters get their own group at lr * factor
    (the schedule scales every group alike)."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((f for key, f in (lr_scales or {}).items() if key in name), 1.0)
        groups.setdefault((p.ndim >= 2, scale), []).append(p)
    out = []
    for (decay, scale), params in sorted(groups.items(), key=lambda kv: (kv[0][1] != 1.0, not kv[0][0])):
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if scale != 1.0:
            group["lr"] = lr * scale
        out.append(group)
    return out


def cosine_schedule(warmup: int, total: int, min_ratio: float):
    """Multiplier of the peak lr at optimizer step `s` (0-based): linear warmup, then cosine to min_ratio."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(
    t: TrainConfig,
    ds_cfg: DeepSpeedConfig,
    micro_batch: int,
    backwards: int = 1,
    node_local: bool = False,
    load_universal: bool = False,
) -> dict[str, Any]:
    """DeepSpeed's config from the typed ones. `micro_batch` is the samples per rank of one backward pass, and
    `backwards` the backward passes of one micro-batch (a two-pass step runs one per chunk): DeepSpeed's
    accumulation boundary, and so its one gradient reduction and optimizer step, comes after train.grad_accum
    micro-batches of them. `node_local`: the output directory is not shared between nodes, so the first rank of
    every node writes the model's states into its own checkpoint (DeepSpeed's use_node_local_storage). `load_universal`:
    the checkpoint to resume is in DeepSpeed's universal form (saved on another number of ranks)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": t.grad_accum * backwards,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": ds_cfg.zero_stage},
        # bf16 and fp16 are autocast over fp32 weights (the model's autocast_dtype; fp16 with the steps' loss
        # scale), so DeepSpeed runs in fp32: gradients are accumulated, reduced and clipped in fp32 at every stage
        "zero_allow_untested_optimizer": True,  # torch AdamW: it runs on CPU as well as GPU
        "checkpoint": {"use_node_local_storage": node_local, "load_universal": load_universal},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for key, value in ds_cfg.config.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def build_engine(
    model: nn.Module,
    t: TrainConfig,
    ds_cfg: DeepSpeedConfig,
    micro_batch: int | None = None,
    lr_scales: dict[str, float] | None = None,
    backwards: int = 1,
    node_local: bool = False,
    load_universal: bool = False,
):
    """Wrap `model` in a DeepSpeed engine with AdamW and the cosine schedule; returns the engine. `micro_batch`
    (default train.batch_size) is what one backward pass covers per rank, `backwards` the backward passes of one
    micro-batch (see `deepspeed_config`); `lr_scales` give parameters whose names contain a key their own learning
    rate; `node_local` and `load_universal` see `deepspeed_config`. Joins (or makes) the process group first:
    DeepSpeed asserts on a missing LOCAL_RANK rather than saying so."""
    init_distributed()
    accel = deepspeed.accelerator.get_accelerator()
    if t.precision == "fp16" and accel.device_name() == "cpu":
        log.warning(
            "train.precision=fp16 on a CPU: most CPUs emulate fp16 matrix products, slowly; it is meant for "
            "GPUs without bf16 (V100, T4)"
        )
    if t.precision == "bf16" and not accel.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16 is not supported on {accel.device_name()}; use fp32")
    groups = param_groups(model, t.weight_decay, t.lr, lr_scales)
    # The fused kernel (CPU and CUDA) updates a ViT-B/32 about 7x faster than the per-tensor loop on CPU.
    # (a step whose loss or gradient is not finite is withheld from it: `tessera.train.components.guard`)
    optimizer = SkippableAdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(t.warmup_steps, t.steps, t.min_lr / t.lr))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(t, ds_cfg, micro_batch or t.batch_size, backwards, node_local, load_universal),
    )
    if t.compile and engine.zero_optimization_stage() == 3:  # set through deepspeed.config (zero_stage is checked)
        raise ConfigError("train.compile does not train exactly under ZeRO stage 3 yet; use stage 0, 1 or 2 with it")
    if backwards > 1 and engine.zero_optimization_stage() >= 2 and engine.dp_world_size > 1:
        # ZeRO-2/3 reduce-scatter the gradients at every backward pass, not once per step as ZeRO-0/1 do
        log.warning(
            "train.chunk_size under ZeRO stage %d: the gradients are reduce-scattered after each of the step's %d "
            "chunk backward passes, %dx the communication of one per step; ZeRO stage 1 (deepspeed.zero_stage=1) "
            "reduces once per step and still shards the optimizer state",
            engine.zero_optimization_stage(),
            backwards,
            backwards,
        )
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # One process has nothing to average, yet DeepSpeed would still flatten every gradient into a
        # bucket, all-reduce it and copy it back: about 10% of a ViT-B/32 step on CPU.
        engine.enable_backward_allreduce = False
    return engine
