"""The device feed: the loader's batches, in order, on the training device (its CUDA side stream is exercised by
scripts/gpu_check.sh)."""

from __future__ import annotations

import torch

from tessera.data.feed import DeviceFeed, chunks_on, nbytes
from tessera.data.per_source import Chunks


def _batch(i: int) -> dict:
    return {"image": torch.full((2, 3, 4, 4), i, dtype=torch.uint8), "wave": torch.full((2, 8), float(i)), "i": i}


def test_the_feed_hands_out_every_batch_once_in_order_however_often_it_reads_ahead():
    feed = DeviceFeed(iter([_batch(i) for i in range(6)]), torch.device("cpu"), torch.float64)
    got = []
    for i in range(5):
        got.append(feed.take())
        for _ in range(i % 3):  # ahead() fetches one batch, and only one, until it is taken
            feed.ahead()
    assert [b["i"] for b in got] == list(range(5))
    assert all(b["wave"].dtype == torch.float64 and b["image"].dtype == torch.uint8 for b in got)
    assert torch.equal(got[3]["image"], _batch(3)["image"])


def test_chunks_cross_whole_and_each_chunk_once():
    chunks = Chunks(_batch(i) for i in range(3))
    assert nbytes(chunks) == 3 * (2 * 3 * 4 * 4 + 2 * 8 * 4)
    moved = DeviceFeed(iter([chunks]), torch.device("cpu")).take()
    assert isinstance(moved, Chunks) and [c["i"] for c in moved] == [0, 1, 2]
    assert [c["i"] for c in chunks_on(list(moved), torch.device("cpu"))] == [0, 1, 2]
