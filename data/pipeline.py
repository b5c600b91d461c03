"""The per-worker sample stream, as a declarative list of stages.

    shards -(shuffle by seed+epoch, split by rank and worker)-> raw samples -(dedupe, leave out the samples a run
    on another layout consumed)-> sample shuffle -> weighted mix of sources -> skip (resume) -> decode + transform
    -> batch + collate

Everything before `decode` handles undecoded bytes and is cheap; its order depends only on
(seed, epoch, rank, worker) and the shards' sample counts. So a resumed run replays it exactly and skips what it had
consumed without reading it: the shards it had finished stay closed, the one it was in is read from the saved position
(by offset, when local and uncompressed), and the samples its shuffle buffer held are read back into it
(`shards.Ahead`). Where a shard's count is unknown (no sizes.json, not read to its end before), or it cannot be read by
offset, the samples before the position are read again. Each batch carries `_state` (worker, epoch, cursor: the
stream samples behind it, and the worker's batch count), `_taken` (the (shard, index) of every sample the stream
consumed since the previous batch, for resuming on another layout: `consumed.SampleSet`) and
`_stats` (bad-sample counts since the worker's previous item) and `_counted` (the sample counts of the shards read to
their end since then) for the main process. Between batches a
worker may send `_heartbeat` items (stats only), and it ends its epoch with an `_end` item.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .consumed import SampleSet
from .decode import BadSample, Decoder
from .derived import Derived
from .shards import STAND_IN, Ahead, Split, fill, iter_raw_samples, split_shards
from .stats import SampleStats

HEARTBEAT_SAMPLES = 256  # ship stats at least this often, so all-bad data is noticed without a batch


def seeded_rng(*parts: int | str) -> random.Random:
    """An RNG seeded identically in every process (str seeds are hashed with sha512, not hash())."""
    return random.Random("-".join(str(p) for p in parts))


@contextlib.contextmanager
def sample_randomness(rng: random.Random):
    """Seed the global torch and Python RNGs from `rng` for one sample's transforms, then restore them.

    Augmentation then depends only on the sample's position in the stream, not on what the worker
    decoded before; a resumed run, which skips samples undecoded, augments exactly as the original.
    """
    # The CPU generator only, saved and restored directly: torch.manual_seed would also queue lazy seeding of
    # every accelerator backend (~0.5 ms a sample), and fork_rng costs 4x a get/set of the state. A loader
    # worker's global RNGs serve nothing else, so there Python's (10 us to save and restore, 1-3% of a small
    # image's decode + transform) is left as the sample's seeding made it; in the main process it is restored.
    in_worker = get_worker_info() is not None
    py_state = None if in_worker else random.getstate()
    torch_state = torch.default_generator.get_state()
    torch.default_generator.manual_seed(rng.getrandbits(63))
    random.seed(rng.getrandbits(63))
    try:
        yield
    finally:
        if py_state is not None:
            random.setstate(py_state)
        torch.default_generator.set_state(torch_state)


def shuffled(samples: Iterator[Any], bufsize: int, initial: int, rng: random.Random, buf: list[Any]) -> Iterator[Any]:
    """webdataset's sample shuffle (`filters._shuffle`: the same draws, so the same order), over a buffer the caller
    holds, so that a resume can read its content back (`Ahead`)."""
    initial = min(initial, bufsize)
    for sample in samples:
        buf.append(sample)
        if len(buf) < bufsize:
            buf.extend(itertools.islice(samples, 1))
        if len(buf) >= initial:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list[Any], rng: random.Random) -> Any:
    k = rng.randint(0, len(buf) - 1)
    sample, buf[k] = buf[k], buf[-1]
    buf.pop()
    return sample


@dataclass
class Source:
    name: str
    urls: list[str]
    weight: float
    modalities: list[str]
    sizes: dict[str, int] = field(default_factory=dict)  # samples per shard, from sizes.json


@dataclass
class StreamSpec:
    """Everything a worker needs; built in the main process and pickled into the workers."""

    sources: list[Source]
    decoders: dict[str, Decoder]
    transforms: dict[str, Callable[[Any], Any]]
    collators: dict[str, Callable[[list[Any]], Any]]
    batch_size: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    train: bool = True
    resampled: bool = False
    batches_per_worker: int | None = None  # epoch length in resampled mode
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    shard_shuffle: bool = True
    drop_last: bool = True
    extra_keys: list[str] = field(default_factory=lambda: ["__key__"])
    all_views: bool = False  # evaluation: keep every view (caption) of a sample; see _collate
    # per modality, the batch keys derived from it (`Derived` transforms: a teacher's input), found once
    derived: dict[str, list[tuple[str, Derived]]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        for key, make in self.transforms.items():
            if isinstance(make, Derived):
                self.derived.setdefault(make.modality, []).append((key, make))


def slot_split(spec: StreamSpec, epoch: int, src_idx: int, rank: int, world: int, worker: int, workers: int) -> Split:
    """What worker `worker` of `workers` on rank `rank` of `world` reads of source `src_idx` in `epoch` (not
    resampled): its shards, in order, and its stride over their samples."""
    urls = list(spec.sources[src_idx].urls)
    if spec.train and spec.shard_shuffle:
        # Same permutation on every rank and worker, so the split partitions it exactly.
        seeded_rng(spec.seed, epoch, src_idx, "shards").shuffle(urls)
    return split_shards(urls, rank, world, worker, workers)


class EpochClock:
    """The epoch the main process is in, in shared memory: loader workers that persist from one epoch to the next read
    it each time they begin one."""

    def __init__(self) -> None:
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def get(self) -> int:
        return int(self._epoch[0])


class ShardStream(IterableDataset):
    """Yields collated batches (dicts keyed by modality) for one epoch of one rank: `epoch`, or with a `clock`, the
    one it says each time iteration begins."""

    def __init__(
        self,
        spec: StreamSpec,
        epoch: int = 0,
        skip: dict[int, tuple[int, int]] | None = None,
        exclude: dict[int, SampleSet] | None = None,
        clock: EpochClock | None = None,
        counts: dict[str, int] | None = None,
    ):
        """`skip[worker] = (stream samples, batches)` that worker's previous run already delivered in `epoch`;
        `exclude[e]`: the samples of epoch e that runs on another layout consumed, left out before anything else;
        `counts`: samples per shard as earlier reading found them (the checkpoint's record; else sizes.json's), by
        which a resume passes the shards it had finished over unopened."""
        super().__init__()
        self.spec = spec
        self.first_epoch = self.epoch = epoch
        self.skips = skip or {}
        self.excludes = exclude or {}
        self.clock = clock
        self.counts = counts or {}
        self.skip: dict[int, tuple[int, int]] = {}
        self.exclude: SampleSet | None = None

    def _begin(self) -> None:
        """Set the epoch this iteration streams, and what of it a resume skips or leaves out."""
        self.epoch = self.clock.get() if self.clock is not None else self.first_epoch
        self.skip = self.skips if self.epoch == self.first_epoch else {}
        self.exclude = self.excludes.get(self.epoch) or None

    # -- stages before decoding: bytes only, order fixed by (seed, epoch, rank, worker) --------------

    def _shard_urls(self, src_idx: int, worker: int, num_workers: int) -> tuple[Iterator[str], Split]:
        spec, src = self.spec, self.spec.sources[src_idx]
        if spec.resampled:
            rng = seeded_rng(spec.seed, self.epoch, spec.rank, worker, src_idx, "resample")
            return (rng.choice(src.urls) for _ in itertools.count()), Split(src.urls)
        split = slot_split(spec, self.epoch, src_idx, spec.rank, spec.world, worker, num_workers)
        return iter(split.shards), split

    def _source_samples(
        self, src_idx: int, worker: int, num_workers: int, stats: SampleStats, reading: _Reading
    ) -> Iterator[dict]:
        spec, src = self.spec, self.spec.sources[src_idx]
        urls, split = self._shard_urls(src_idx, worker, num_workers)
        exclude = self.exclude
        if exclude is not None:
            urls = (u for u in urls if not exclude.whole(u))
        samples = iter_raw_samples(urls, stats, src.sizes, reading.ahead, reading.counted)
        if exclude is not None:
            samples = (s for s in samples if (s["__url__"], s["__index__"]) not in exclude)
        if split.sample_stride > 1:
            samples = itertools.islice(samples, split.sample_offset, None, split.sample_stride)
        if spec.train and spec.shuffle_buffer > 1:
            rng = seeded_rng(spec.seed, self.epoch, spec.rank, worker, src_idx, "samples")
            buf: list[dict] = []
            reading.buffers.append(buf)
            samples = shuffled(samples, spec.shuffle_buffer, spec.shuffle_initial, rng, buf)
        for sample in samples:
            sample["__source__"] = src_idx
            yield sample

    def _mixed(self, worker: int, num_workers: int, stats: SampleStats, reading: _Reading) -> Iterator[dict]:
        """Training: draw from the sources by weight; the epoch ends when any source runs out. Evaluation: every
        sample of every source, one source after the other."""
        streams = [self._source_samples(i, worker, num_workers, stats, reading) for i in range(len(self.spec.sources))]
        if len(streams) == 1 or not self.spec.train:
            yield from itertools.chain.from_iterable(streams)
            return
        rng = seeded_rng(self.spec.seed, self.epoch, self.spec.rank, worker, "mix")
        weights = [s.weight for s in self.spec.sources]
        while True:
            (choice,) = rng.choices(range(len(streams)), weights=weights)
            sample = next(streams[choice], None)
            if sample is None:
                return
            yield sample

    # -- decoding and batching ----------------------------------------------------------------------

    def _decode(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        if "__bad__" in sample:  # a marker the reading stage left: a duplicate key, a member that failed to read
            raise BadSample(sample["__bad__"])
        spec = self.spec
        item = {k: sample[k] for k in spec.extra_keys if k in sample}
        with sample_randomness(rng):
            for modality in spec.sources[sample["__source__"]].modalities:
                decoder = spec.decoders[modality]
                if not decoder.present(sample):
                    raise BadSample(f"missing_{modality}")
                value = decoder.decode_for(sample, spec.transforms[modality])
                if spec.all_views and not spec.train:
                    item[modality] = [spec.transforms[modality](v) for v in decoder.views(value)]
                    continue
                value = decoder.pick(value, rng) if spec.train else decoder.first(value)
                item[modality] = spec.transforms[modality](value)
                for key, make in spec.derived.get(modality, ()):  # a teacher's view of the same value, or its embedding
                    item[key] = make(sample, value)
        return item

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        modalities = [m for m in self.spec.collators if all(m in it for it in items)]
        if self.spec.all_views:
            # every view of every sample, flattened; `__views__[m][i]` says how many rows sample i has
            batch = {m: self.spec.collators[m]([v for it in items for v in it[m]]) for m in modalities}
            batch["__views__"] = {m: [len(it[m]) for it in items] for m in modalities}
        else:
            batch = {m: self.spec.collators[m]([it[m] for it in items]) for m in modalities}
        for key in self.spec.extra_keys:
            batch[key] = [it.get(key) for it in items]
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._begin()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        spec = self.spec
        stats = SampleStats()
        skip, batches = self.skip.get(worker, (0, 0))  # resuming: stream samples and batches already consumed
        items: list[dict[str, Any]] = []
        taken: list[tuple[str, int]] = []  # (shard, index) of the samples consumed since the last batch
        unshipped = 0

        def state(cursor: int) -> tuple[int, int, int, int]:
            return (worker, self.epoch, cursor, batches)

        reading = _Reading(Ahead(self.counts) if skip else None)
        cursor = 0
        for cursor, sample in enumerate(self._mixed(worker, num_workers, stats, reading), start=1):
            if cursor <= skip:  # consumed before the checkpoint: passed over unread where the shards allow
                if cursor == skip:
                    reading.arrived()
                    stats.take()  # its counts were already saved with the checkpoint
                continue
            stats.seen += 1
            unshipped += 1
            taken.append((sample["__url__"], sample["__index__"]))
            try:
                items.append(self._decode(sample, seeded_rng(spec.seed, self.epoch, spec.rank, worker, cursor)))
            except BadSample as exc:
                stats.skip(exc.reason, sample.get("__url__"), sample.get("__key__"))
            if len(items) == spec.batch_size:
                batches += 1
                batch = self._collate(items)
                batch.update(_state=state(cursor), _stats=stats.take(), _taken=taken, _counted=reading.news())
                items, taken, unshipped = [], [], 0
                yield batch
                if spec.batches_per_worker is not None and batches >= spec.batches_per_worker:
                    break
            elif unshipped >= HEARTBEAT_SAMPLES:
                unshipped = 0
                yield {"_state": state(cursor), "_stats": stats.take(), "_counted": reading.news(), "_heartbeat": True}
        if items and not spec.drop_last:
            batch = self._collate(items)
            batch.update(_state=state(cursor), _stats=stats.take(), _taken=taken, _counted=reading.news())
            yield batch
        elif items:
            stats.event("dropped_partial_batch_samples", len(items))
        yield {"_state": state(cursor), "_stats": stats.take(), "_counted": reading.news(), "_end": True}


class _Reading:
    """A worker's reading of its epoch: the resume's `Ahead` (None when starting from the top), the shuffle buffers
    (whose stand-ins it reads on arrival), and the sample counts of the shards read to their end (`counted`), of
    which `news()` gives those not yet shipped to the main process."""

    def __init__(self, ahead: Ahead | None) -> None:
        self.ahead = ahead
        self.buffers: list[list[dict]] = []
        self.counted: dict[str, int] = {}
        self._shipped = 0

    def arrived(self) -> None:
        """The stream is at its checkpoint: read from here on, and read the stand-ins it holds."""
        if self.ahead is not None:
            self.ahead.on = False
            fill([s for buf in self.buffers for s in buf if STAND_IN in s])

    def news(self) -> dict[str, int]:
        if len(self.counted) == self._shipped:
            return {}
        items = list(self.counted.items())[self._shipped :]
        self._shipped = len(self.counted)
        return dict(items)
