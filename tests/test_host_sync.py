"""A training step makes no host sync unless it logs, evaluates or checkpoints: the guard's non-finite check and its
skip stay on the device, the loss exchanges no sizes for uniform batches and builds its weights once. Counted on
CPU by a dispatch mode (every `.item()`, `float()`, `bool()` of a tensor reads one scalar through
`aten._local_scalar_dense`) and by patches on what reads a tensor on the host without dispatching (`tolist`,
`numpy`, `cpu`). A GPU run adds torch.cuda.set_sync_debug_mode("error") (tests/test_gpu.py)."""

from __future__ import annotations

import json
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .conftest import ROOT, TINY_MODEL

OURS = str(ROOT)


class HostReads(TorchDispatchMode):
    """Records where each host read of a tensor happens, per training step (`step` is set by the caller)."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.reads: dict[int, list[str]] = {}

    def record(self, what: str) -> None:
        frames = [
            f
            for f in traceback.extract_stack()[:-2]
            if (f.filename.startswith(OURS) and "/.venv/" not in f.filename) or "deepspeed" in f.filename
        ]
        where = f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else "?"
        self.reads.setdefault(self.step, []).append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.record("a scalar read")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "stage,precision,extra",
    [
        (0, "fp32", []),
        (0, "bf16", []),
        (0, "fp16", []),
        (0, "fp16", ["train.chunk_size=4"]),
        (0, "fp32", ["loss.matryoshka=[16]"]),
        (0, "fp32", ["train.chunk_size=4"]),
        (0, "fp32", ["train.ema.decay=0.9"]),
        (2, "fp32", []),
        (3, "fp32", []),
    ],
)
def test_steps_that_do_not_log_make_no_host_sync(
    demo_shards, tmp_path, in_process_training, monkeypatch, stage, precision, extra
):
    """Tessera's code reads nothing on the host in steps 2-4 of 5 (step 1 builds, step 5 logs), at every ZeRO stage
    and with the two-pass step, Matryoshka, the weight EMA and fp16's loss scale; nor does DeepSpeed at ZeRO-0. At
    ZeRO 1-3 DeepSpeed's own optimizer reads the gradient norm's finiteness on the host each step (and ZeRO-3 checks
    its partitions' order): those are DeepSpeed's, not changed here."""
    from tessera.train.components.metrics import MetricsLogger
    from tessera.train.loop import train
    from tessera.train.recipes.load import load_config
    from tessera.train.recipes.tasks import make_task

    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"model={json.dumps(TINY_MODEL)}",
            f"data.train={demo_shards}/train-txt-{{000000..000003}}.tar",
            "data.num_workers=1",  # the transforms' random draws read scalars, in the loader's process
            "data.val=[]",
            "train.steps=5",
            "train.batch_size=8",
            "train.log_every=5",
            "train.ckpt_every=-1",
            "train.warmup_steps=1",
            f"train.precision={precision}",
            f"deepspeed.zero_stage={stage}",
            *extra,
        ],
    )
    reads = HostReads()
    progress = MetricsLogger.progress

    def step_done(self, step, **postfix):  # the loop calls it once after each step (and again when it logs)
        reads.step = step + 1
        return progress(self, step, **postfix)

    monkeypatch.setattr(MetricsLogger, "progress", step_done)
    for name in ("tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def patched(self, *a, _original=original, _name=name, **kw):
            reads.record(f".{_name}()")
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, patched)
    reads.step = 1
    with reads:
        train(make_task(cfg))
    # step 1 builds what later steps reuse; step 5 logs (and the run's end exports and evaluates)
    quiet = [(step, w) for step, where in reads.reads.items() if 2 <= step <= 4 for w in where]
    ours = [f"step {step}: {w}" for step, w in quiet if "deepspeed" not in w]
    assert not ours, "host syncs in Tessera's code in steps that do not log:\n" + "\n".join(ours)
    if stage == 0:
        assert not quiet, "host syncs in steps that do not log:\n" + "\n".join(f"step {s}: {w}" for s, w in quiet)
