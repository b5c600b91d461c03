"""A resume mid-epoch passes over what the checkpointed run had consumed without reading it, and still hands out
the uninterrupted run's batches."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.data import shards
from tessera.data.make_shards import write_shards

from .test_pipeline import _keys, _loader, tiny_model  # noqa: F401 (a fixture)

SAMPLES, PER_SHARD, BATCH, BUFFER = 2000, 100, 20, 100


@pytest.fixture(scope="module")
def web_shards(tmp_path_factory):
    """2,000 image-text samples (96 px noise JPEGs, about 10 KiB each) in 20 shards with their sizes.json; and the
    most tar bytes a sample takes in any shard, on average (its members' data and headers)."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("resume")
    samples = []
    for i in range(SAMPLES):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        samples.append((f"s{i:05d}", {"jpg": buf.getvalue(), "txt": f"a photo of thing {i % 7}".encode()}))
    sizes = write_shards(samples, out, "web", PER_SHARD)
    return out, max((out / name).stat().st_size / count for name, count in sizes.items())


class _Counted:
    """A shard file that counts the bytes read through it into `tally`."""

    def __init__(self, fh, tally: list[int]):
        self.fh, self.tally = fh, tally

    def read(self, *args):
        data = self.fh.read(*args)
        self.tally[0] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _count_reads(monkeypatch) -> list[int]:
    tally = [0]
    opener = shards.open_shard
    monkeypatch.setattr(shards, "open_shard", lambda url: _Counted(opener(url), tally))
    return tally


def _runs(model, spec, monkeypatch, at: int, then: int):
    """The uninterrupted run's batches after `at`, the resumed run's, and the bytes the resumed run read to get them."""
    ref = _loader(model, spec, batch_size=BATCH, shuffle_buffer=BUFFER, shuffle_initial=BUFFER, seed=5)
    for _ in range(at):
        next(ref)
    state = ref.state_dict()
    expected = [next(ref) for _ in range(then)]
    resumed = _loader(model, spec, batch_size=BATCH, shuffle_buffer=BUFFER, shuffle_initial=BUFFER, seed=5)
    resumed.load_state_dict(state)
    tally = _count_reads(monkeypatch)
    got = [next(resumed) for _ in range(then)]
    return expected, got, tally[0]


def _same(expected, got) -> None:
    assert _keys(got) == _keys(expected)
    for x, y in zip(got, expected):  # the same samples, crops and captions
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])


def test_a_resume_at_90_percent_reads_only_the_rest_and_one_shuffle_buffer(tiny_model, web_shards, monkeypatch):  # noqa: F811
    root, per_sample = web_shards
    at = SAMPLES * 9 // 10 // BATCH
    expected, got, read = _runs(tiny_model, str(root / "web-{000000..000019}.tar"), monkeypatch, at, then=10)
    _same(expected, got)
    rest = SAMPLES - at * BATCH
    # the rest of the epoch and one shuffle buffer; and the members' headers (webdataset writes a pax header and
    # the tar header, 1536 bytes) of the shards read by offset, up to the samples read: those the buffer holds
    # samples of (its 100 samples span at most three shards of 100)
    limit = (rest + BUFFER) * per_sample + 3 * PER_SHARD * 2 * 1536
    assert read <= limit, f"{read} bytes read to resume; the rest and a buffer is at most {limit}"
    total = sum(p.stat().st_size for p in root.glob("web-*.tar"))
    assert read < total / 4


def test_a_resume_over_streamed_shards_reads_from_their_start_and_says_so(tiny_model, web_shards, monkeypatch, caplog):  # noqa: F811
    """`pipe:` shards cannot be read by offset: the one the position lies in is read from its start, once the
    checkpoint's record of shard counts lets the workers pass the finished ones over unopened."""
    root, _ = web_shards
    spec = f"pipe:cat {root}/web-{{000000..000019}}.tar"
    at = SAMPLES * 9 // 10 // BATCH
    with caplog.at_level(logging.WARNING, logger="tessera.data.loader"):
        expected, got, read = _runs(tiny_model, spec, monkeypatch, at, then=12)  # into the next epoch
    _same(expected, got)
    said = [r for r in caplog.records if "remote or compressed" in r.getMessage()]
    assert len(said) == 1
    total = sum(p.stat().st_size for p in root.glob("web-*.tar"))
    assert read < total * 0.6  # the next epoch's first two batches read a few shards too
