"""Optimizer groups, the learning-rate schedule and the DeepSpeed config Tessera builds."""

from __future__ import annotations

import math

import pytest

from tessera.models import build_model
from tessera.train.distributed.engine import cosine_schedule, deepspeed_config, param_groups
from tessera.train.recipes.load import load_config


def test_no_weight_decay_on_norms_biases_and_temperatures(tiny_model_cfg):
    model = build_model(tiny_model_cfg)
    model.towers["image"].requires_grad_(False)
    groups = param_groups(model, 0.2)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.2 and groups[1]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in decay | no_decay, f"frozen {name} reached the optimizer"
        elif "logit_scales" in name or name.endswith("bias") or ".ln_" in name or "ln_final" in name:
            assert id(p) in no_decay, name
        elif name.endswith("weight") and p.ndim == 2:
            assert id(p) in decay, name


def test_parameters_can_take_their_own_learning_rate():
    from tessera.models.prompts import PromptConfig, apply_prompts

    from .test_adapters import _base

    model = apply_prompts(_base(), PromptConfig(context=4, visual_tokens=2))
    groups = param_groups(model, 0.0, lr=0.05, lr_scales={"visual_prompts": 0.1})
    by_param = {id(p): g.get("lr", "default") for g in groups for p in g["params"]}
    assert by_param[id(model.prompt_learner.visual_prompts["image"])] == pytest.approx(0.005)
    assert by_param[id(model.prompt_learner.context)] == "default"
    assert sum(len(g["params"]) for g in groups) == 2


def test_cosine_schedule_with_warmup():
    f = cosine_schedule(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(values, values[1:]))


def test_deepspeed_config_follows_the_typed_config():
    cfg = load_config(
        None,
        [
            "train.batch_size=12",
            "train.grad_accum=3",
            "train.grad_clip=0.5",
            "train.precision=fp32",
            "deepspeed.zero_stage=3",
            "deepspeed.config={zero_optimization: {overlap_comm: true}, flops_profiler: {enabled: false}}",
        ],
    )
    ds = deepspeed_config(cfg.train, cfg.deepspeed, cfg.train.batch_size)
    assert ds["train_micro_batch_size_per_gpu"] == 12 and ds["gradient_accumulation_steps"] == 3
    # bf16 and fp16 are autocast over fp32 weights: DeepSpeed's own half-precision modes stay off
    assert ds["gradient_clipping"] == 0.5 and "bf16" not in ds and "fp16" not in ds
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["flops_profiler"] == {"enabled": False}
