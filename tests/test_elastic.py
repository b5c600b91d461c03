"""Elastic runs: a rank killed mid-step is restarted by torchrun and resumes from the last complete checkpoint; a
kill during a checkpoint save leaves `latest` on the previous complete one; a ZeRO checkpoint resumes on another
number of ranks, its data epoch continuing where it was."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from tessera.train.components.checkpoint import unusable

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
    # Rank 1 dies during its 5th step, after the checkpoint of step 4. torchrun's defaults: its agent shares the
    # rendezvous store with the ranks, and each attempt keys its process group apart (pytorch#135712 hung the restart
    # on a dead peer's address); DEEPSPEED_TIMEOUT (minutes) bounds any wait on a peer that never connects.
    env = {"OMP_NUM_THREADS": "1", "DEEPSPEED_TIMEOUT": "1"}
    started = time.monotonic()
    proc = run_cli([*launch, KILL, "step", "1", "5", *args], env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert time.monotonic() - started < 120  # no wait on a dead peer (that waits DEEPSPEED_TIMEOUT, a minute)
    assert "step00000004 at step 4" in proc.stderr and "Connection refused" not in proc.stderr, proc.stderr[-4000:]
    assert sorted(set(_steps(run))) == list(range(1, 9))
    assert _latest(run) == "step00000008" and (run / "model" / "tessera_model.safetensors").is_file()


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


def _launch(ranks: int) -> list[str]:
    if ranks == 1:
        return [PY, "-m", "tessera.train.pretrain"]
    return [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        "-m",
        "tessera.train.pretrain",
    ]


def _adam_steps(tag_dir: Path) -> set[int]:
    """The step counts Adam holds for its parameter groups in one rank's optimizer file (ZeRO 1-3)."""
    saved = torch.load(tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=False)
    inner = saved["optimizer_state_dict"]
    inner = inner.get("base_optimizer_state") or inner["optimizer_state_dict"]  # ZeRO 1-2, ZeRO-3
    return {int(state["step"]) for state in inner["state"].values()}


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("stage,saved,resumed", [(1, 2, 1), (3, 1, 2)])
def test_a_zero_checkpoint_resumes_on_another_number_of_ranks(demo_shards, tmp_path, stage, saved, resumed):
    """Weights and Adam's moments come through DeepSpeed's universal form, made once beside the checkpoint."""
    run = tmp_path / "run"
    args = _args(demo_shards, run, f"deepspeed.zero_stage={stage}", "train.ckpt_every=2", "resume=latest")
    env = {"OMP_NUM_THREADS": "1"}
    first = run_cli([*_launch(saved), *args, "train.steps=2"], env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    tag = run / "checkpoints" / "step00000002"
    want = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    shutil.rmtree(run / "model")
    same = run_cli([*_launch(resumed), *args, "train.steps=2"], env=env)  # resumes at its last step: weights only
    assert same.returncode == 0, same.stderr[-3000:]
    assert (
        f"saved by {saved} rank(s), resumed on {resumed}" in same.stderr and (tag / "universal" / "COMPLETE").is_file()
    )
    assert "epoch 0 continues without the" in same.stderr  # the data too (test_pipeline.py checks its samples)
    got = load_file(run / "model" / "tessera_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].float()) for k in got)
    more = run_cli([*_launch(resumed), *args, "train.steps=4"], env=env)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "converting" not in more.stderr and sorted(set(_steps(run))) == [1, 2, 3, 4]
    assert _adam_steps(run / "checkpoints" / "step00000004") == {4}  # a fresh optimizer would count 2
