"""Preemption as schedulers deliver it: SIGTERM or SIGINT to every process of the job (Slurm's preemption and time
limit, scancel, `timeout`, Ctrl-C in a terminal), loader workers included. Every rank finishes its step, writes a
complete checkpoint and exits 0; the resumed run's losses equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tessera.train.components.guard import StopSignals

from .conftest import PY, ROOT, finished
from .test_train import tiny_run_args

STEPS = 20  # the signal lands after step 3 (about step 5): room to spare, and short runs


def _args(shards: Path, run: Path, *extra: str) -> list[str]:
    return tiny_run_args(
        shards,
        run,
        "train.precision=fp32",
        "train.log_every=1",
        "data.val=[]",
        "data.num_workers=2",
        f"train.steps={STEPS}",
        *extra,
    )


def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if x["kind"] == "train"}


def _launch(cmd: list[str]) -> subprocess.Popen:
    """`cmd` in a session of its own (its own process group, as a batch job's), not through the warm interpreter:
    the signal must reach the very processes that run, loader workers included."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _signal_group_mid_run(cmd: list[str], run: Path, sig: signal.Signals) -> tuple[int, str]:
    proc = _launch(cmd)
    try:
        deadline = time.monotonic() + 300
        while len(_losses(run) if (run / "metrics.jsonl").is_file() else {}) < 3:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the run did not reach step 3: {proc.communicate()[1][-3000:]}")
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stderr


def _stopped_step(run: Path) -> int:
    return int((run / "checkpoints" / "latest").read_text().removeprefix("step"))


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return finished([_launch(cmd)])[0]


@pytest.fixture(scope="module")
def uninterrupted(demo_shards, tmp_path_factory) -> dict[int, float]:
    """The losses of the one-rank run, uninterrupted."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    ref = _run([PY, "-m", "tessera.train.pretrain", *_args(demo_shards, run, "train.ckpt_every=-1")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    return _losses(run)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_checkpoints_exits_0_and_resumes_exactly(
    demo_shards, tmp_path, uninterrupted, sig
):
    """One rank with two loader workers; SIGTERM to the whole group, as Slurm, scancel and `timeout` send it, or
    SIGINT, as Ctrl-C in a terminal does. (SIGTERM used to kill the loader workers, and the main process with them:
    "DataLoader worker (pid N) is killed by signal: Terminated", and no checkpoint.)"""
    pretrain = [PY, "-m", "tessera.train.pretrain"]
    run = tmp_path / "run"
    rc, stderr = _signal_group_mid_run([*pretrain, *_args(demo_shards, run)], run, sig)
    assert rc == 0, stderr[-4000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and "killed by signal" not in stderr
    step = _stopped_step(run)
    assert 3 <= step < STEPS and f"{sig.name}: stopped at step {step} with a checkpoint" in stderr
    assert (run / "checkpoints" / f"step{step:08d}" / "COMPLETE").is_file() and not (run / "model").exists()
    again = _run([*pretrain, *_args(demo_shards, run, "resume=latest")])
    assert again.returncode == 0, again.stderr[-3000:]
    got = _losses(run)
    assert [got[s] for s in range(step + 1, STEPS + 1)] == [uninterrupted[s] for s in range(step + 1, STEPS + 1)]
    assert (run / "model").is_dir()


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigterm_to_a_torchrun_job_s_process_group_checkpoints_every_rank_and_resumes_exactly(demo_shards, tmp_path):
    """Two ranks under torchrun, each with two loader workers; SIGTERM to every process (torchrun's agent forwards it
    to the ranks again, within the window that counts as one request)."""
    launch = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    pretrain = [*launch, "tessera.train.pretrain"]
    extra = ("deepspeed.zero_stage=1",)
    ref = _run([*pretrain, *_args(demo_shards, tmp_path / "ref", "train.ckpt_every=-1", *extra)])
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    _, stderr = _signal_group_mid_run([*pretrain, *_args(demo_shards, run, *extra)], run, signal.SIGTERM)
    step = _stopped_step(run)
    for rank in (0, 1):
        assert f"[rank{rank}] WARNING tessera: SIGTERM: stopped at step {step} with a checkpoint" in stderr, stderr
    assert "killed by signal" not in stderr and "exitcode  : -" not in stderr  # no rank died of the signal
    tag = run / "checkpoints" / f"step{step:08d}"
    assert (tag / "COMPLETE").read_text() == "2\n"
    again = _run([*pretrain, *_args(demo_shards, run, "resume=latest", *extra)])
    assert again.returncode == 0, again.stderr[-3000:]
    expected, got = _losses(tmp_path / "ref"), _losses(run)
    assert [got[s] for s in range(step + 1, STEPS + 1)] == [expected[s] for s in range(step + 1, STEPS + 1)]


def test_a_repeat_within_the_window_is_the_same_request_and_a_later_one_stops_at_once(monkeypatch, request):
    monkeypatch.setattr(StopSignals, "REPEAT_S", 0.3)
    # the handler from before is Python's, whatever an earlier test in this process left installed
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, saved))
    # raise_signal: delivered to this thread and handled before it returns (os.kill may land on another of the
    # process's threads, and the handler then runs at whichever later instruction the main thread checks, which
    # under load can be after pytest.raises has closed)
    with StopSignals() as signals:
        signal.raise_signal(signal.SIGTERM)
        assert signals.requested == "SIGTERM"
        signal.raise_signal(signal.SIGINT)  # within the window: nothing more
        time.sleep(0.4)
        with pytest.raises(KeyboardInterrupt):  # SIGINT's handler from before: Python's
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is not None
