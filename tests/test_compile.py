"""train.compile: compiled towers train as the eager ones do under DeepSpeed ZeRO-2 (stage 0 runs the same compiled
towers, without partitioned gradients), with the two-pass step and gradient checkpointing, LoRA or visual prompts;
they evaluate (recompiling, logged and bounded) and export the same module tree. ZeRO-3 is refused until it trains
exactly."""

from __future__ import annotations

import importlib
import json
import os
import shutil

import pytest
import torch

from tessera.config import ConfigError, from_dict
from tessera.models import ModelConfig, build_model, load_model, save_model
from tessera.train.components.compiled import compile_towers
from tessera.train.recipes.load import load_config

from .conftest import PY, ROOT, TINY_MODEL, no_compiler_env, run_cli
from .test_adapters import _base, _finetune_args
from .test_train import tiny_run_args


def _train_records(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _eager_and_compiled(module: str, args, tmp_path) -> dict:
    """{"eager"|"compiled": (output dir, finished process)}: the run `args(out, *extra)` without and with compile."""
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["train.compile=true", "train.compile_recompiles=4"])):
        out = tmp_path / name
        proc = run_cli([PY, "-m", module, *args(out, *extra)])
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[name] = (out, proc)
    return runs


def _same_losses(runs) -> None:
    """The same losses step by step: Inductor only reorders fp32 arithmetic."""
    (eager, _), (compiled, proc) = runs["eager"], runs["compiled"]
    assert len(_train_records(eager)) == 3
    assert [r["loss"] for r in _train_records(compiled)] == pytest.approx(
        [r["loss"] for r in _train_records(eager)], rel=2e-3
    )
    assert "towers ['image', 'text'] compile at their first call" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(_cxx() is None, reason="Inductor needs a C++ compiler on a CPU")
@pytest.mark.parametrize("stage", [2])
def test_compiled_towers_train_evaluate_and_export_as_eager_ones(demo_shards, tmp_path, stage):
    """... with the two-pass step (chunks of 8) and gradient checkpointing."""
    common = [f"deepspeed.zero_stage={stage}", "train.precision=fp32", "train.steps=3", "train.log_every=1"]
    common += ["train.chunk_size=8", "train.grad_checkpointing=true"]
    runs = _eager_and_compiled(
        "tessera.train.pretrain", lambda out, *extra: tiny_run_args(demo_shards, out, *common, *extra), tmp_path
    )
    _same_losses(runs)
    (eager, _), (compiled, proc) = runs["eager"], runs["compiled"]
    # the first step (compiling) is timed apart, and took longer than the eager run's first step
    first = _train_records(compiled)[0]
    assert first["first_step_s"] > _train_records(eager)[0]["first_step_s"]
    assert "first_step_s" not in _train_records(compiled)[1]
    # evaluation runs the compiled towers in eval mode, without gradients and with a last partial batch:
    # recompiles, each logged
    assert "Recompiling function" in proc.stderr, proc.stderr[-3000:]
    assert (compiled / "eval" / "retrieval.json").is_file()
    # the export is the eager module tree: it loads as one, with weights close to the eager run's
    a, b = load_model(eager / "model").state_dict(), load_model(compiled / "model").state_dict()
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3


@pytest.mark.slow
@pytest.mark.skipif(_cxx() is None, reason="Inductor needs a C++ compiler on a CPU")
@pytest.mark.parametrize(
    "adapter",
    [
        ["adapter.kind=lora", "train.grad_checkpointing=true"],
        ["adapter.kind=prompt", "adapter.prompt.context=0", "adapter.prompt.visual_tokens=4"],
    ],
    ids=["lora", "visual-prompts"],
)
def test_compiled_towers_finetune_adapters_as_eager_ones(demo_shards, tmp_path, adapter):
    save_model(_base(), tmp_path / "base")
    # no evaluation: the losses are what this test compares (the test above covers compiled towers evaluating)
    common = ["deepspeed.zero_stage=2", "train.precision=fp32", "train.steps=3", "data.val=[]", *adapter]
    runs = _eager_and_compiled(
        "tessera.train.finetune",
        lambda out, *extra: _finetune_args(tmp_path / "base", out, demo_shards, *common, *extra),
        tmp_path,
    )
    _same_losses(runs)


def test_compile_under_zero3_is_refused_with_a_clear_error():
    with pytest.raises(ConfigError, match="zero_stage=3"):
        load_config(str(ROOT / "configs" / "demo.yaml"), ["train.compile=true", "deepspeed.zero_stage=3"])


def test_compile_without_a_cpp_compiler_is_refused_with_a_clear_error(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU compiles with Triton")
    for key, value in no_compiler_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    model = build_model(from_dict(ModelConfig, TINY_MODEL, "model"))
    # Inductor remembers the compiler it found in this process (a test that compiled in it, before this one)
    search = importlib.import_module("torch._inductor.cpp_builder").cpp_compiler_search
    search.cache_clear()
    try:
        with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
            compile_towers(model, 4)
    finally:
        search.cache_clear()
