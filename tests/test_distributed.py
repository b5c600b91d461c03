"""A real 2-process torchrun run with DeepSpeed ZeRO-2: the loss falls; a resumed run continues exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from .conftest import PY, SEED, command, finished, learned, loss_fall, no_compiler_env, run_cli
from .test_train import tiny_run_args


def torchrun(*args: str, target: tuple[str, ...] = ("-m", "tessera.train.pretrain"), env: dict | None = None):
    """2 ranks on this machine running `target` (pretraining by default, or a script) with `args`."""
    return run_cli(
        [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target, *args],
        env={"OMP_NUM_THREADS": "1", **(env or {})},
    )


def _train_losses(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"]) for x in lines if x["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.learning
def test_two_rank_zero2_training_and_exact_resume(demo_shards, tmp_path):
    """... on a machine without a C++ compiler: nothing is compiled at run time."""
    common = [
        "deepspeed.zero_stage=2",
        "train.precision=fp32",
        "train.steps=12",
        "train.log_every=1",
        "train.ckpt_every=6",
        "train.keep_ckpts=3",
        "train.lr=0.003",
        "data.val=[]",
        "data.num_workers=2",
        f"seed={SEED}",
    ]
    full = tmp_path / "full"
    proc = torchrun(*tiny_run_args(demo_shards, full, *common), env=no_compiler_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not any((tmp_path / "torch_extensions").iterdir())
    losses = [loss for _, loss in _train_losses(full)]
    assert len(losses) == 12
    learned(loss_fall(losses), 0.1, "the loss's fall over 12 steps")  # it learns

    # Simulate a crash right after the step-6 checkpoint, then resume=latest.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step00000006", resumed / "checkpoints" / "step00000006")
    (resumed / "checkpoints" / "latest").write_text("step00000006")
    proc = torchrun(*tiny_run_args(demo_shards, resumed, *common, "resume=latest"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "at step 6" in proc.stderr
    after = _train_losses(resumed)
    assert [s for s, _ in after] == list(range(7, 13))
    # the same batches, the same optimizer and schedule state: the same losses and final weights
    assert after == _train_losses(full)[6:]
    a = load_file(str(full / "model" / "tessera_model.safetensors"))
    b = load_file(str(resumed / "model" / "tessera_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() == 0.0, k


@pytest.mark.slow
@pytest.mark.multiproc
def test_tiled_ring_loss_trains_as_the_full_matrix_loss_under_deepspeed(demo_shards, tmp_path):
    """Two ranks, ZeRO-2: the tiled loss (ring, ragged tiles of 5 over 16 local rows) gives the same losses,
    gradient norms and weights as the gathered full-matrix reference."""
    common = [
        "deepspeed.zero_stage=2",
        "train.precision=fp32",
        "train.steps=2",
        "train.log_every=1",
        "train.ckpt_every=-1",
        "train.grad_clip=1.0",
        "data.val=[]",
        "data.num_workers=1",
    ]
    runs = {}
    for impl, extra in [("full", ["loss.impl=full"]), ("tiled", ["loss.impl=tiled", "loss.tile_size=5"])]:
        out = tmp_path / impl
        proc = torchrun(*tiny_run_args(demo_shards, out, *common, *extra))
        assert proc.returncode == 0, proc.stderr[-4000:]
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[impl] = (
            [x for x in lines if x["kind"] == "train"],
            load_file(str(out / "model" / "tessera_model.safetensors")),
        )
    (full_log, full_w), (tiled_log, tiled_w) = runs["full"], runs["tiled"]
    assert len(full_log) == len(tiled_log) == 2
    for f, t in zip(full_log, tiled_log):
        assert t["loss"] == pytest.approx(f["loss"], rel=1e-5)
        assert t["grad_norm"] == pytest.approx(f["grad_norm"], rel=1e-4)
    for k in full_w:
        assert torch.allclose(tiled_w[k], full_w[k], rtol=0, atol=1e-5), k


NODE_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _nodes(port: int, runs: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Two torchrun "nodes" of one rank each, over loopback, node n running with the overrides runs[n]."""
    procs = [
        subprocess.Popen(
            command(
                [
                    PY,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes",
                    "2",
                    "--node_rank",
                    str(n),
                    "--nproc_per_node",
                    "1",
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    str(port),
                    "-m",
                    "tessera.train.pretrain",
                    *args,
                ],
                env=NODE_ENV,
            ),
            env={**os.environ, **NODE_ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, args in enumerate(runs)
    ]
    return finished(procs)


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_nodes_with_node_local_disks_checkpoint_and_resume_each_from_its_own(demo_shards, tmp_path):
    """Two nodes whose output_dir roots differ (standing for local disks): each keeps a complete checkpoint,
    DeepSpeed's model states included; both resume from their own copy and continue exactly; a node without the
    chosen checkpoint stops the run with a message naming it."""
    from tessera.train.components.checkpoint import complete_world

    from .test_losses import _free_port

    common = [
        "deepspeed.zero_stage=1",
        "train.precision=fp32",
        "train.steps=4",
        "train.log_every=1",
        "train.ckpt_every=2",
        "data.val=[]",
        "train.export=false",
    ]

    def run(name, *extra, nodes=(0, 1)):
        return _nodes(
            _free_port(), [tiny_run_args(demo_shards, tmp_path / f"node{n}" / name, *common, *extra) for n in nodes]
        )

    procs = run("full")
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-3000:] + procs[1].stderr[-3000:]
    for n in (0, 1):
        ckpt = tmp_path / f"node{n}" / "full" / "checkpoints"
        assert (ckpt / "latest").read_text() == "step00000004"
        assert complete_world(ckpt / "step00000004") == 2
        assert list((ckpt / "step00000004").glob("*model_states.pt")), n  # the weights are on every node's disk

    for n in (0, 1):  # each node resumes from its own disk's step-2 checkpoint
        resumed = tmp_path / f"node{n}" / "resumed" / "checkpoints"
        resumed.mkdir(parents=True)
        shutil.copytree(tmp_path / f"node{n}" / "full" / "checkpoints" / "step00000002", resumed / "step00000002")
        (resumed / "latest").write_text("step00000002")
    procs = run("resumed", "resume=latest")
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-3000:] + procs[1].stderr[-3000:]
    assert _train_losses(tmp_path / "node0" / "resumed") == _train_losses(tmp_path / "node0" / "full")[2:]

    lacking = tmp_path / "node0" / "lacking" / "checkpoints"  # node 1's disk has no checkpoint at all
    shutil.copytree(tmp_path / "node0" / "full" / "checkpoints", lacking)
    procs = run("lacking", "resume=latest")
    assert all(p.returncode != 0 for p in procs)
    for p in procs:
        assert "rank 0 resumes from 'step00000004', but rank 1" in p.stderr and "has no complete copy" in p.stderr
