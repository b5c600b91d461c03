"""Steps with a non-finite loss or gradient: skipped without touching the weights, counted, logged, and a run of
them stops training with a clear message; no checkpoint ever holds non-finite weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

from tessera.train.components.guard import NonFiniteError, check_weights
from tessera.train.distributed.engine import cosine_schedule

from .conftest import PY, ROOT, run_cli
from .test_distributed import torchrun
from .test_train import tiny_run_args

SCRIPT = str(ROOT / "tests" / "nonfinite_run.py")


def _module(run: Path, step: int) -> dict[str, torch.Tensor]:
    path = run / "checkpoints" / f"step{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_records(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


def _args(shards: Path, run: Path, *extra: str) -> list[str]:
    return tiny_run_args(
        shards, run, "train.precision=fp32", "train.log_every=1", "train.keep_ckpts=10", "data.val=[]", *extra
    )


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(demo_shards, tmp_path):
    """Rank 1's loss is NaN at steps 3 and 4: both ranks skip them (the weights at step 4 are those of step 2),
    count them, say which pair, and train on."""
    run = tmp_path / "run"
    args = _args(demo_shards, run, "train.steps=6", "train.ckpt_every=2", "train.max_nonfinite_steps=3")
    proc = torchrun("loss", "1", "3,4", *args, target=(SCRIPT,))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 3 skipped: the loss of image-text is not finite (1 in a row, 1 in all" in proc.stderr
    assert "step 4 skipped: the loss of image-text is not finite (2 in a row, 2 in all" in proc.stderr
    assert _same(_module(run, 2), _module(run, 4)) and not _same(_module(run, 4), _module(run, 6))
    records = _train_records(run)
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 2, 2, 2]
    # the schedule does not advance over the skipped steps: steps 5 and 6 take the rates steps 3 and 4 would have
    # (each record's lr is the next step's); warmup 2, cosine over 6 steps
    factor = cosine_schedule(2, 6, 0.0)
    lr = [r["lr"] for r in records]
    peak = lr[0] / factor(1)
    assert lr == pytest.approx([peak * factor(k) for k in (1, 2, 2, 2, 3, 4)], rel=1e-6)
    assert all(r["loss"] == r["loss"] for r in records if r["step"] not in (3, 4))  # finite steps log numbers


@pytest.mark.slow
def test_a_gradient_that_is_not_finite_skips_the_step_at_zero_1(demo_shards, tmp_path):
    """The loss stays finite but a temperature's gradient is inf at step 2: under ZeRO-1 the step changes no
    weight, and the log says it was a gradient."""
    run = tmp_path / "run"
    args = _args(demo_shards, run, "train.steps=3", "train.ckpt_every=1", "deepspeed.zero_stage=1")
    proc = run_cli([PY, SCRIPT, "gradient", "0", "2", *args])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 2 skipped: a gradient is not finite (the loss of image-text is)" in proc.stderr
    assert _same(_module(run, 1), _module(run, 2)) and not _same(_module(run, 2), _module(run, 3))
    # DeepSpeed withheld this step itself (its own check of the gradients' norm), and its schedule with it: taken
    # out once, not twice
    factor, lr = cosine_schedule(2, 3, 0.0), [r["lr"] for r in _train_records(run)]
    assert lr == pytest.approx([lr[0] / factor(1) * factor(k) for k in (1, 1, 2)], rel=1e-6)


@pytest.mark.slow
def test_a_run_of_nan_steps_stops_training_with_the_step_and_the_pair(demo_shards, tmp_path):
    run = tmp_path / "run"
    args = _args(demo_shards, run, "train.steps=8", "train.ckpt_every=1", "train.max_nonfinite_steps=2")
    proc = run_cli([PY, SCRIPT, "loss", "0", "3+", *args])
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "error: step 4: the loss of image-text is not finite, 2 step(s) in a row" in proc.stderr
    assert "Traceback" not in proc.stderr
    saved = sorted(p.name for p in (run / "checkpoints").glob("step*"))
    assert saved == ["step00000001", "step00000002", "step00000003"]  # step 3 skipped: its weights are step 2's
    assert all(torch.isfinite(v).all() for s in (1, 2, 3) for v in _module(run, s).values())
    assert _same(_module(run, 2), _module(run, 3))
    assert not (run / "model").exists()


def test_non_finite_weights_are_never_checkpointed():
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    check_weights(model, 7)
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"step 7: parameters 1.bias are not finite; no checkpoint was written"):
        check_weights(model, 7)


# --- stop requests: SIGTERM (preemption) and SIGINT (Ctrl-C) ---


def _wait_for_steps(proc, run: Path, steps: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and sum('"kind": "train"' in x for x in metrics.read_text().splitlines()) >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    raise AssertionError("the run did not reach its first steps")


def _latest_step(run: Path) -> int:
    return int((run / "checkpoints" / "latest").read_text().removeprefix("step"))


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigterm_to_one_rank_stops_both_at_the_same_step_with_a_checkpoint(demo_shards, tmp_path):
    run = tmp_path / "run"
    args = _args(demo_shards, run, "train.steps=100000", "deepspeed.zero_stage=1")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tessera.train.pretrain"]
    proc = subprocess.Popen(
        [*cmd, *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_steps(proc, run, 3)
        ranks = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
        assert len(ranks) == 1
        ranks[0].send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    step = _latest_step(run)
    assert "[rank1] WARNING tessera: SIGTERM: stopped at step" in stderr
    tag = run / "checkpoints" / f"step{step:08d}"
    assert (tag / "COMPLETE").read_text() == "2\n"
    assert {p.name for p in tag.glob("tessera_rank*.pt")} == {"tessera_rank0.pt", "tessera_rank1.pt"}
