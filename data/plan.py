"""Batch plans: training batches filled from communities of similar samples, so that a batch's negatives are hard
without any labels (B3, 2025), read from local uncompressed shards by member offset.

`tessera plan-batches` (tessera.tools.plan_batches) writes a plan: a JSON file with the shards it indexed (path and
byte size, checked whenever the plan is used), per sample its shard, position, key and members' (offset, size), and
the communities, lists of samples that a previous model embeds close together. A run with `data.batch_plan` then
builds each epoch's global batches from the plan (`epoch_batches`): the communities in an order drawn from
(seed, epoch), packed a few to a batch, and a `data.batch_plan_random` fraction of the batches filled with samples
drawn at random instead. Every planned sample is in one batch of each epoch either way, but for the few that do
not fill a last batch (other ones each epoch).

A global batch of world x batch_size samples is cut into per-rank slices, and a rank's slices into the loader's
batches (the chunks, when the step takes its batch in chunks); loader batch i goes to worker i mod workers, the
rotation in which `TrainLoader` hands batches out. So each worker streams a list of planned samples, read by offset
(`PlannedStream`), through the decode, transform, batch and resume stages of a shard stream, and a resumed run
continues exactly; on another layout it continues the epoch without the samples already consumed.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.config import ConfigError

from .consumed import SampleSet
from .loader import TrainLoader
from .pipeline import EpochClock, ShardStream, Source, StreamSpec, seeded_rng
from .shards import ShardError, group_samples, member_extents, read_extent
from .stats import SampleStats

log = logging.getLogger(__name__)

PLAN_FORMAT = "tessera-batch-plan"
PLAN_VERSION = 1
OPEN_SHARDS = 32  # shard files a worker keeps open


@dataclass
class SampleIndex:
    """Where each sample's members lie: columns over the samples, shards by position in `shards`."""

    shards: list[str] = field(default_factory=list)  # absolute paths
    shard_bytes: list[int] = field(default_factory=list)  # each shard's size when indexed
    shard: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)  # position in its shard, as iter_raw_samples counts it
    key: list[str] = field(default_factory=list)
    members: list[dict[str, tuple[int, int]]] = field(default_factory=list)  # suffix -> (offset, size)

    def __len__(self) -> int:
        return len(self.key)

    def subset(self, rows: Sequence[int]) -> SampleIndex:
        return SampleIndex(
            self.shards,
            self.shard_bytes,
            [self.shard[r] for r in rows],
            [self.index[r] for r in rows],
            [self.key[r] for r in rows],
            [self.members[r] for r in rows],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "shards": [{"path": p, "bytes": b} for p, b in zip(self.shards, self.shard_bytes, strict=True)],
            "samples": {
                "shard": self.shard,
                "index": self.index,
                "key": self.key,
                "members": [{k: list(v) for k, v in m.items()} for m in self.members],
            },
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SampleIndex:
        samples = doc["samples"]
        out = cls(
            [str(s["path"]) for s in doc["shards"]],
            [int(s["bytes"]) for s in doc["shards"]],
            [int(s) for s in samples["shard"]],
            [int(i) for i in samples["index"]],
            [str(k) for k in samples["key"]],
            [{str(k): (int(v[0]), int(v[1])) for k, v in m.items()} for m in samples["members"]],
        )
        columns = {len(out.shard), len(out.index), len(out.key), len(out.members)}
        if len(columns) != 1 or any(not 0 <= s < len(out.shards) for s in out.shard):
            raise ValueError("sample columns disagree")
        return out

    def check_shards(self, where: str) -> None:
        """Each shard still there, at the size it was indexed at: offsets into a rewritten shard would read other
        bytes."""
        for path, size in zip(self.shards, self.shard_bytes, strict=True):
            if not os.path.isfile(path):
                raise ShardError(f"{where}: shard {path} is gone")
            if os.path.getsize(path) != size:
                raise ShardError(
                    f"{where}: shard {path} is {os.path.getsize(path)} bytes, {size} when the plan was made: it "
                    "changed since, so the plan's offsets no longer hold; make the plan again"
                )


def index_shards(urls: Sequence[str], stats: SampleStats) -> SampleIndex:
    """Every sample of the shards (those `iter_raw_samples` would read, but duplicates), with its members' extents."""
    out = SampleIndex()
    for s, url in enumerate(urls):
        path = os.path.abspath(url)
        out.shards.append(path)
        out.shard_bytes.append(os.path.getsize(path) if os.path.isfile(path) else 0)
        for sample in group_samples(path, member_extents(url, stats), stats):
            if "__bad__" in sample:
                stats.skip(sample["__bad__"], path, sample["__key__"])
                continue
            out.shard.append(s)
            out.index.append(sample.pop("__index__"))
            out.key.append(sample.pop("__key__"))
            sample.pop("__url__")
            out.members.append(sample)
    return out


class ShardReader:
    """Reads members by offset, keeping the last `OPEN_SHARDS` shard files open."""

    def __init__(self) -> None:
        self.files: OrderedDict[str, Any] = OrderedDict()

    def read(self, index: SampleIndex, row: int) -> dict[str, Any]:
        """The raw sample at `row`, as `iter_raw_samples` yields it; a member that cannot be read whole makes it a
        `__bad__` marker."""
        path = index.shards[index.shard[row]]
        sample: dict[str, Any] = {"__key__": index.key[row], "__url__": path, "__index__": index.index[row]}
        try:
            fh = self._open(path)
            for suffix, (offset, size) in index.members[row].items():
                sample[suffix] = read_extent(fh, offset, size)
        except (OSError, EOFError) as exc:
            log.warning("sample %s of %s failed to read (%s)", index.key[row], path, exc)
            return {**{k: sample[k] for k in ("__key__", "__url__", "__index__")}, "__bad__": "shard_read_error"}
        return sample

    def _open(self, path: str):
        fh = self.files.pop(path, None) or open(path, "rb")  # noqa: SIM115 (kept open across samples)
        self.files[path] = fh
        while len(self.files) > OPEN_SHARDS:
            self.files.popitem(last=False)[1].close()
        return fh

    def close(self) -> None:
        while self.files:
            self.files.popitem()[1].close()


class PlannedStream(ShardStream):
    """A shard stream whose samples are `order` (rows of `index`), read by offset: worker w of W streams loader
    batches w, w + W, ... of it (of spec.batch_size samples each). `source_of[shard]` names each shard's source."""

    def __init__(
        self,
        spec: StreamSpec,
        index: SampleIndex,
        order_of: Callable[[int], Sequence[int]],
        source_of: Sequence[int],
        epoch: int = 0,
        skip: dict[int, tuple[int, int]] | None = None,
        exclude: dict[int, SampleSet] | None = None,
        clock: EpochClock | None = None,
    ):
        """`order_of(epoch)`: the rows this rank streams in that epoch."""
        super().__init__(spec, epoch, skip, exclude, clock)
        self.index, self.order_of, self.source_of = index, order_of, source_of
        self.order: Sequence[int] = []

    def _begin(self) -> None:
        super()._begin()
        self.order = self.order_of(self.epoch)

    def _rows(self, worker: int, num_workers: int) -> Iterator[int]:
        size = self.spec.batch_size
        for start in range(worker * size, len(self.order), num_workers * size):
            yield from self.order[start : start + size]

    def _mixed(self, worker: int, num_workers: int, stats: SampleStats, reading: Any = None) -> Iterator[dict]:
        index, exclude = self.index, self.exclude
        rows: Iterator[int] = self._rows(worker, num_workers)
        if exclude is not None:
            rows = (r for r in rows if (index.shards[index.shard[r]], index.index[r]) not in exclude)
        skip = self.skip.get(worker, (0, 0))[0]
        reader = ShardReader()
        try:
            for position, row in enumerate(rows):
                if position < skip:  # consumed before the resume: the stream passes over it unread
                    yield {}
                    continue
                sample = reader.read(index, row)
                sample["__source__"] = self.source_of[index.shard[row]]
                sample["__row__"] = row
                yield sample
        finally:
            reader.close()


@dataclass
class BatchPlan:
    """A plan file's content: the sample index, the communities (lists of its rows) and what made them."""

    index: SampleIndex
    communities: list[list[int]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            **self.meta,
            **self.index.to_json(),
            "communities": self.communities,
        }

    @classmethod
    def load(cls, path: str | Path) -> BatchPlan:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"data.batch_plan: cannot read {path}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
            raise ConfigError(f"data.batch_plan: {path} is not a batch plan (make one with `tessera plan-batches`)")
        if doc.get("version") != PLAN_VERSION:
            raise ConfigError(
                f"data.batch_plan: {path} is a version {doc.get('version')} plan; this Tessera reads "
                f"version {PLAN_VERSION}: make the plan again"
            )
        try:
            index = SampleIndex.from_json(doc)
            communities = [[int(r) for r in c] for c in doc["communities"]]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"data.batch_plan: {path} is damaged ({type(exc).__name__}: {exc})") from None
        rows = [r for c in communities for r in c]
        if len(set(rows)) != len(rows) or any(not 0 <= r < len(index) for r in rows):
            raise ConfigError(f"data.batch_plan: {path} is damaged (its communities do not partition its samples)")
        meta = {k: v for k, v in doc.items() if k not in ("format", "version", "shards", "samples", "communities")}
        return cls(index, communities, meta)


def epoch_batches(communities: Sequence[Sequence[int]], seed: int, epoch: int, batch: int, random_rate: float = 0.0):
    """The epoch's global batches of `batch` rows: the communities in an order drawn from (seed, epoch) and packed
    in turn, except a `random_rate` fraction of the batches (at positions drawn too), filled with samples drawn
    uniformly from all of them. Each batch is shuffled, so every rank's slice mixes its communities. Every row is in
    one batch, but for the remainder that fills no batch."""
    rng = seeded_rng(seed, epoch, "batch-plan")
    rows = [r for c in communities for r in c]
    n = len(rows) // batch
    k = round(random_rate * n)
    drawn = set(rng.sample(rows, k * batch)) if k else set()
    order = list(range(len(communities)))
    rng.shuffle(order)
    packed = [r for c in order for r in communities[c] if r not in drawn]
    at_random = sorted(drawn)
    rng.shuffle(at_random)
    random_slots = set(rng.sample(range(n), k))
    batches, p, q = [], 0, 0
    for i in range(n):
        if i in random_slots:
            batches.append(at_random[q : q + batch])
            q += batch
        else:
            batches.append(packed[p : p + batch])
            p += batch
    for b in batches:
        rng.shuffle(b)
    return batches


class PlannedLoader(TrainLoader):
    """`TrainLoader` over a batch plan (`data.batch_plan`): the same rotation, position and resume, with each epoch's
    samples in the plan's batches. `global_batch`: the samples of one optimizer step over all ranks."""

    def __init__(self, *args: Any, rank_batch: int | None = None, **kwargs: Any):
        """`TrainLoader`'s arguments, and `rank_batch`: the samples one rank takes from a planned batch (default: the
        loader's batch size; the per-source chunked path reads a rank's batch in smaller pieces)."""
        super().__init__(*args, **kwargs)
        cfg, world = self.cfg, self.spec.world
        self.plan = BatchPlan.load(cfg.batch_plan)
        self.plan.index.check_shards(f"data.batch_plan {cfg.batch_plan}")
        self.rank_batch = rank_batch or self.spec.batch_size
        self.global_batch = world * self.rank_batch
        self.source_of = self._sources_of_shards()
        planned = sum(len(c) for c in self.plan.communities)
        if planned < self.global_batch:
            raise ConfigError(
                f"data.batch_plan: {cfg.batch_plan} plans {planned} samples, fewer than one global batch "
                f"({world} rank(s) x {self.rank_batch})"
            )
        made_for = self.plan.meta.get("batch_size")
        log.info(
            "batch plan %s: %d samples in %d communities (made for batches of %s; these are %d), %g of the batches "
            "at random",
            cfg.batch_plan,
            planned,
            len(self.plan.communities),
            made_for,
            self.global_batch,
            cfg.batch_plan_random,
        )

    def _workers(self, sources: list[Source], requested: int, world: int) -> int:
        return requested  # every worker reads by offset from any shard: no shard split to balance

    def _sources_of_shards(self) -> list[int]:
        """For each of the plan's shards, the data.train source that lists it: its modalities are decoded."""
        owner: dict[str, int] = {}
        for i, src in enumerate(self.spec.sources):
            for url in src.urls:
                owner.setdefault(os.path.abspath(url), i)
        missing = [p for p in self.plan.index.shards if p not in owner]
        if missing:
            raise ConfigError(
                f"data.batch_plan: {len(missing)} of the plan's shards are in no data.train source, e.g. "
                f"{missing[:2]}: the plan was made for other data"
            )
        return [owner[p] for p in self.plan.index.shards]

    def _stream(self, epoch: int, skip: dict[int, tuple[int, int]], exclude: dict[int, SampleSet]) -> ShardStream:
        order_of = RankOrder(
            self.plan.communities,
            self.spec.seed,
            self.global_batch,
            self.cfg.batch_plan_random,
            self.rank * self.rank_batch,
            (self.rank + 1) * self.rank_batch,
        )
        return PlannedStream(self.spec, self.plan.index, order_of, self.source_of, epoch, skip, exclude, self._clock)


@dataclass
class RankOrder:
    """The rows one rank streams in an epoch of a batch plan: its slice `lo:hi` of each planned batch (made in the
    loader workers, from the epoch the clock gives)."""

    communities: list[list[int]]
    seed: int
    global_batch: int
    random_fraction: float
    lo: int
    hi: int

    def __call__(self, epoch: int) -> list[int]:
        batches = epoch_batches(self.communities, self.seed, epoch, self.global_batch, self.random_fraction)
        return [r for b in batches for r in b[self.lo : self.hi]]
