"""Checkpoint faults a user meets: a truncated file in the latest checkpoint, and a disk that fills up during a
save. Each gets a message naming what and where, and no run resumes from, or leaves behind, a partial checkpoint."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import PY, ROOT, run_cli
from .test_train import tiny_run_args

PRETRAIN = [PY, "-m", "tessera.train.pretrain"]


def _args(shards: Path, run: Path, *extra: str) -> list[str]:
    return tiny_run_args(shards, run, "train.precision=fp32", "train.keep_ckpts=5", "data.val=[]", *extra)


@pytest.mark.slow
def test_a_truncated_file_in_the_latest_checkpoint_is_named_and_resume_falls_back(demo_shards, tmp_path):
    run = tmp_path / "run"
    proc = run_cli([*PRETRAIN, *_args(demo_shards, run, "train.steps=4", "train.ckpt_every=2")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = run / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])  # a copy cut short

    again = run_cli([*PRETRAIN, *_args(demo_shards, run, "train.steps=6", "train.ckpt_every=2", "resume=latest")])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"'{states}' is " in again.stderr and "(truncated or overwritten)" in again.stderr
    assert "resuming from" in again.stderr and "step00000002" in again.stderr and "at step 2 " in again.stderr
    assert "Traceback" not in again.stderr

    # the step-4 checkpoint was written again by the resumed run; cut it once more and name it explicitly
    states.write_bytes(states.read_bytes()[:100])
    named = run_cli([*PRETRAIN, *_args(demo_shards, run, "train.steps=8", "resume=step00000004")])
    assert named.returncode == 2
    assert f"error: resume=step00000004: checkpoint '{run / 'checkpoints' / 'step00000004'}' cannot be resumed" in (
        named.stderr
    )
    assert f"'{states}' is 100 bytes" in named.stderr and "Traceback" not in named.stderr


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m none {probe}"]
    return shutil.which("unshare") is not None and subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_says_so_and_leaves_nothing_partial(demo_shards, tmp_path):
    """The checkpoints folder is a tmpfs (in a user namespace) with room for one checkpoint and a half: the second
    save would fill it. The run stops before writing it, saying "no space left on" the folder, how much is free and
    what the last checkpoint took; nothing partial is left, and latest still names the first checkpoint."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("user namespaces (unshare -rm) are not permitted here, so no small filesystem can be mounted")
    sized = tmp_path / "sized"
    proc = run_cli([*PRETRAIN, *_args(demo_shards, sized, "train.steps=1")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = sum(f.stat().st_size for f in (sized / "checkpoints" / "step00000001").rglob("*") if f.is_file())

    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    ckpt.mkdir(parents=True)
    train = shlex.join([*PRETRAIN, *_args(demo_shards, run, "train.steps=3", "train.ckpt_every=1")])
    script = (
        f"mount -t tmpfs -o size={one * 3 // 2} none {ckpt} && {{ {train}; echo rc=$?; ls -a {ckpt}; "
        f"echo; cat {ckpt}/latest; echo; }}"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert "rc=2" in proc.stdout, proc.stderr[-3000:]
    assert f"error: checkpoint at step 2: no space left on {ckpt}: " in proc.stderr
    assert re.search(
        r"MiB free, the last checkpoint took \d+ MiB \(rank 0, host [^)]+\); nothing was written", proc.stderr
    )
    assert "latest still names step00000001" in proc.stderr and "Traceback" not in proc.stderr
    listing = proc.stdout.split("rc=2", 1)[1].split()
    assert "step00000001" in listing and "step00000002" not in listing
    assert not any(name.startswith(".latest.tmp") for name in listing)
    assert listing[-1] == "step00000001"  # cat latest


@pytest.mark.parametrize(
    "val,message",
    [
        ("{shards}/missing-000000.tar", "error: data.val: source 'source0': 1 of 1 shards do not exist"),
        (
            "[{{shards: '{shards}/val-000000.tar', name: heard, modalities: [image, audio]}}]",
            "error: data.val: source 'heard' requires 'audio', which the model has no tower for",
        ),
    ],
)
def test_held_out_data_problems_stop_the_run_before_its_first_step(demo_shards, tmp_path, val, message):
    run = tmp_path / "run"
    proc = run_cli(
        [*PRETRAIN, *tiny_run_args(demo_shards, run, "train.steps=2", f"data.val={val.format(shards=demo_shards)}")]
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (run / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("where", ["probe", "save"])
def test_a_save_that_fails_on_one_rank_stops_every_rank_promptly_with_its_message(demo_shards, tmp_path, where):
    """Rank 1's writes fail with ENOSPC from the checkpoint of step 4 on: found by the check every rank makes before
    DeepSpeed's collective save (probe), or inside that save (save), where the other rank is in DeepSpeed's
    collectives. Both ranks stop within seconds, with rank 1's message; latest names step 2, which resumes."""
    run = tmp_path / "run"
    args = _args(demo_shards, run, "train.steps=6", "train.ckpt_every=2", "deepspeed.zero_stage=1")
    launch = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    started = time.monotonic()
    proc = run_cli([*launch, str(ROOT / "tests" / "fail_writes_run.py"), where, "1", "4", *args], timeout=300)
    assert proc.returncode != 0 and time.monotonic() - started < 120, proc.stderr[-4000:]  # no wait for a timeout
    said = re.search(r"error: checkpoint at step 4: (.*)", proc.stderr)
    assert said and "no space left on" in proc.stderr and "(rank 1, host " in proc.stderr, proc.stderr[-4000:]
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    if where == "save":
        again = run_cli([*launch, "-m", "tessera.train.pretrain", *args, "resume=latest"], env={"OMP_NUM_THREADS": "1"})
        assert again.returncode == 0, again.stderr[-3000:]
        assert (
            "step00000002 at step 2" in again.stderr and (run / "checkpoints" / "latest").read_text() == "step00000006"
        )
