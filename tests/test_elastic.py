"""Elastic runs: a rank killed mid-step is restarted by torchrun and resumes from the last complete checkpoint; a
kill during a checkpoint save leaves `latest` on the previous complete one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tessera.train.checkpoint import unusable

from .conftest import PY, ROOT, run_cli
from .test_train import tiny_run_args

KILL = str(ROOT / "tests" / "kill_run.py")


def _args(shards: Path, run: Path, *extra: str) -> list[str]:
    return tiny_run_args(
        shards, run, "train.precision=fp32", "train.log_every=1", "train.keep_ckpts=10", "data.val=[]", *extra
    )


def _steps(run: Path) -> list[int]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["step"] for x in lines if x["kind"] == "train"]


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text()


@pytest.mark.slow
@pytest.mark.multiproc
def test_torchrun_restarts_a_rank_killed_mid_step_and_resumes_from_the_last_checkpoint(demo_shards, tmp_path):
    run = tmp_path / "run"
    args = _args(demo_shards, run, "deepspeed.zero_stage=1", "train.steps=8", "train.ckpt_every=2", "resume=latest")
    launch = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "3"]
    # Rank 1 dies during its 5th step, after the checkpoint of step 4. A fresh rendezvous store per attempt (README,
    # "Restarts"); DEEPSPEED_TIMEOUT (minutes) bounds any wait on a peer that never connects.
    env = {"OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "DEEPSPEED_TIMEOUT": "1"}
    proc = run_cli([*launch, KILL, "step", "1", "5", *args], env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step00000004 at step 4" in proc.stderr and "pytorch#135712" not in proc.stderr, proc.stderr[-4000:]
    assert sorted(set(_steps(run))) == list(range(1, 9))
    assert _latest(run) == "step00000008" and (run / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_save_leaves_latest_on_the_previous_one(demo_shards, tmp_path):
    run = tmp_path / "run"
    args = _args(demo_shards, run, "train.steps=6", "train.ckpt_every=2")
    killed = run_cli([PY, KILL, "save", "0", "4", *args])
    assert killed.returncode == -9, killed.stderr[-3000:]
    partial = run / "checkpoints" / "step00000004"
    assert _latest(run) == "step00000002" and partial.is_dir() and unusable(partial)
    again = run_cli([PY, "-m", "tessera.train.pretrain", *args, "resume=latest"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step00000002 at step 2" in again.stderr
    assert _latest(run) == "step00000006" and unusable(partial) is None
    assert sorted(set(_steps(run))) == list(range(1, 7))
