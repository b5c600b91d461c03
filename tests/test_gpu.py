"""On a CUDA GPU (skipped elsewhere; `bash scripts/gpu_check.sh` runs them): the loss's bf16 GEMMs against fp64,
one training run per precision (bf16 autocast; fp16 autocast with its loss scale) with evaluation on the GPU, and
pinned loader batches."""

from __future__ import annotations

import json

import pytest
import torch

from tessera.losses import contrastive_loss, contrastive_loss_reference

from .conftest import PY, run_cli
from .test_losses import _features, _loss_and_grads
from .test_train import tiny_run_args

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"),
]


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("kind,bias", [("infonce", None), ("siglip", -10.0)])
def test_bf16_loss_on_the_gpu_within_its_bound_of_fp64(kind, bias, kernel):
    """bf16 features on the GPU (the tiles' GEMMs accumulate in fp32), by the torch path and by the fused kernel:
    loss within 1% of the fp64 reference on the same rounded inputs, every gradient within 2% of its largest entry;
    at a size with many tiles. No step of it waits for the host (torch's sync debug mode raises if one would)."""
    a, b = _features(4096, 256)
    a16, b16 = a.bfloat16(), b.bfloat16()
    scale = torch.tensor(50.0, dtype=torch.float64)
    bias_t = None if bias is None else torch.tensor(bias, dtype=torch.float64)
    got = _loss_and_grads(
        _without_host_sync(contrastive_loss),
        a16.cuda(),
        b16.cuda(),
        scale.float().cuda(),
        None if bias_t is None else bias_t.float().cuda(),
        kind=kind,
        tile_size=1024,
        kernel=kernel,
    )
    want = _loss_and_grads(contrastive_loss_reference, a16.double(), b16.double(), scale, bias_t, kind=kind)
    assert all(t.is_cuda for t in got) and got[1].dtype == torch.bfloat16
    assert abs(got[0].double().cpu() - want[0]) / want[0].abs() < 1e-2
    for x, y in zip(got[1:], want[1:]):
        assert (x.double().cpu() - y).abs().max() / y.abs().max() < 2e-2


def _without_host_sync(fn):
    def run(*args, **kw):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return run


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_training_run_on_the_gpu_per_precision(demo_shards, tmp_path, precision):
    """Steps, a checkpoint, the export and retrieval on held-out data, all on the GPU; the loss stays finite."""
    out = tmp_path / "run"
    args = tiny_run_args(demo_shards, out, "train.steps=6", "train.log_every=1", f"train.precision={precision}")
    proc = run_cli([PY, "-m", "tessera.train.pretrain", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["kind"] == "train"]
    assert len(losses) == 6 and all(v == v for v in losses[-3:])  # fp16 may skip its first steps while scaling
    assert any(x["kind"] == "eval" for x in lines) and (out / "model" / "tessera_model.safetensors").is_file()


def test_loader_batches_are_pinned_for_the_gpu(demo_shards):
    from tessera.data import DataConfig, train_loader
    from tessera.models import build_model
    from tessera.train.recipes.load import load_config

    from .conftest import TINY_MODEL

    cfg = load_config(None, [f"model={json.dumps(TINY_MODEL)}", f"data.train={demo_shards}/train-txt-000000.tar"])
    model = build_model(cfg.model)
    data = DataConfig(train=cfg.data.train, num_workers=1)
    loader = train_loader(data, model.transforms(True), model.collators(), list(model.modalities), 8, pin_memory=True)
    batch = next(loader)
    assert batch["image"].is_pinned() and batch["image"].to("cuda", non_blocking=True).is_cuda


def test_the_feed_copies_on_a_side_stream_and_the_step_waits_on_the_device():
    """Each batch crosses on the feed's own stream, issued while the compute stream is busy, and arrives intact (the
    compute stream waits for the copy's event); a two-pass batch that fits stays on the device, and its chunks are
    not copied again."""
    from tessera.data.feed import DeviceFeed, chunks_on
    from tessera.data.per_source import Chunks

    host = [{"image": torch.randint(0, 255, (64, 3, 224, 224), dtype=torch.uint8).pin_memory()} for _ in range(4)]
    feed = DeviceFeed(iter(host), torch.device("cuda"))
    assert feed.stream is not None and feed.stream != torch.cuda.current_stream()
    busy = torch.randn(4096, 4096, device="cuda")
    for expected in host:
        got = feed.take()
        for _ in range(20):  # keep the compute stream busy while the next copy is issued
            busy = busy @ busy / 64
        feed.ahead()
        assert got["image"].is_cuda and torch.equal(got["image"].cpu(), expected["image"])
    chunks = Chunks({"image": h["image"][:8]} for h in host)
    moved = DeviceFeed(iter([chunks]), torch.device("cuda")).take()  # small: whole on the device
    assert all(c["image"].is_cuda for c in moved)
    again = list(chunks_on(list(moved), torch.device("cuda")))
    assert all(a["image"].data_ptr() == m["image"].data_ptr() for a, m in zip(again, moved))  # not copied again
    streamed = list(chunks_on(list(chunks), torch.device("cuda")))  # from the host: chunk i+1 in flight during i
    assert all(torch.equal(s["image"].cpu(), c["image"]) for s, c in zip(streamed, chunks))
