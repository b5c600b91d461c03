"""Main-process side of data loading: endless training batches with a resumable position, and
single-pass evaluation batches. Both account for every bad sample the workers skipped."""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from tessera.modalities import MODALITIES

from .config import DataConfig, SourceConfig
from .consumed import SampleSet
from .decode import decoders
from .pipeline import EpochClock, ShardStream, Source, StreamSpec, slot_split
from .shards import ShardError, expand_shards, seekable, shard_sizes
from .stats import DataQualityError, SampleStats

log = logging.getLogger(__name__)


def resolve_sources(sources: list[SourceConfig], default_modalities: list[str]) -> list[Source]:
    if not sources:
        raise ShardError("no data sources configured (set data.train, e.g. data.train=path/{000..009}.tar)")
    out = []
    for src in sources:
        modalities = src.modalities or list(default_modalities)
        for m in modalities:
            if m not in MODALITIES:
                raise ShardError(f"source '{src.name}': no decoder for modality '{m}' (known: {sorted(MODALITIES)})")
            if m not in default_modalities:
                raise ShardError(f"source '{src.name}' requires '{m}', which the model has no tower for")
        try:
            urls = expand_shards(src.shards)
        except ShardError as exc:
            raise ShardError(f"source '{src.name}': {exc}") from None
        sizes = shard_sizes(urls)
        total = sum(sizes[u] for u in urls) if len(sizes) == len(urls) else "unknown (no sizes.json)"
        log.info(
            "source %s: %d shard(s), %s samples, weight %g, needs %s",
            src.name,
            len(urls),
            total,
            src.weight,
            "+".join(modalities),
        )
        out.append(Source(src.name or "source", urls, src.weight, modalities, sizes))
    return out


def _decoders(sources: list[Source]) -> dict:
    """The decoders of the modalities the sources carry, and no others (each imports what it needs)."""
    return decoders(sorted({m for s in sources for m in s.modalities}))


MAX_AUTO_WORKERS = 16


def auto_workers(shares: int = 1) -> int:
    """`data.num_workers=auto`: the cores this process may run on, per local rank (torchrun's LOCAL_WORLD_SIZE; a task
    srun started has its own), less one for the training process, at most MAX_AUTO_WORKERS, split over `shares`
    loaders; at least 1. Logged."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if "SLURM_PROCID" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        local = 1  # a task srun started (no torchrun): its CPUs are its own already (--cpus-per-task)
    workers = max(1, min(cores // local - 1, MAX_AUTO_WORKERS) // max(1, shares))
    log.info(
        "data.num_workers=auto: %d loader worker(s) per rank%s (%d core(s) for %d local rank(s), one kept for "
        "training, at most %d)",
        workers,
        f" for each of {shares} sources" if shares > 1 else "",
        cores,
        local,
        MAX_AUTO_WORKERS,
    )
    return workers


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A loader worker's start (`worker_init_fn`): SIGTERM and SIGINT are the main process's business. A scheduler
    signals the whole process group (Slurm's preemption and time limit, scancel, `timeout`, Ctrl-C in a terminal);
    the main process finishes its step, saves, and then shuts the workers down."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def plan_workers(sources: list[Source], requested: int, world: int, resampled: bool) -> int:
    """Workers per rank such that every (rank, worker) slot has whole shards to read, when possible."""
    if resampled or requested == 0:
        return requested
    fewest = min(len(s.urls) for s in sources)
    if fewest >= world * requested:
        return requested
    if fewest >= world:
        workers = max(1, fewest // world)
        log.warning(
            "source with %d shards for %d rank(s) x %d workers: using %d worker(s) per rank so that each "
            "reads whole shards",
            fewest,
            world,
            requested,
            workers,
        )
        return workers
    log.warning(
        "source with %d shards for %d rank(s): every rank reads every shard and keeps 1/%d of the "
        "samples; write more shards than ranks to avoid the duplicated reads",
        fewest,
        world,
        world * requested,
    )
    return requested


class TrainLoader:
    """An endless iterator of training batches for one rank.

    Epochs follow each other (seed+epoch reshuffles). Batches are handed out in a fixed rotation over
    the loader workers, whatever order the workers finish them in, so the sequence of batches is a
    function of (seed, rank, world, workers) alone. The position (epoch, the next worker in the
    rotation, and per worker the stream samples behind its last consumed batch) is `state_dict()`;
    loading it resumes exactly there. The state also names the samples consumed in the epoch (`SampleSet`), so
    that a run on another number of ranks or workers continues the epoch without them (`load_state_dict`).
    """

    def __init__(
        self,
        cfg: DataConfig,
        transforms: dict[str, Callable],
        collators: dict[str, Callable],
        modalities: list[str],
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        pin_memory: bool = False,
    ):
        self.cfg = cfg
        sources = resolve_sources(cfg.train, modalities)
        requested = auto_workers() if cfg.num_workers == "auto" else cfg.num_workers
        self.num_workers = self._workers(sources, requested, world)
        per_worker = None
        if cfg.resampled:
            per_worker = math.ceil(cfg.train_num_samples / (world * max(1, self.num_workers) * batch_size))
        self.spec = StreamSpec(
            sources=sources,
            decoders=_decoders(sources),
            transforms=transforms,
            collators=collators,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world=world,
            train=True,
            resampled=cfg.resampled,
            batches_per_worker=per_worker,
            shuffle_buffer=cfg.shuffle_buffer,
            shuffle_initial=cfg.shuffle_initial,
            shard_shuffle=cfg.shard_shuffle,
            drop_last=True,
        )
        self.world = world
        self.rank = rank
        self.pin_memory = pin_memory
        self.epoch = 0
        self.stats = SampleStats()
        self.cursors: dict[int, tuple[int, int]] = {}  # worker -> (stream samples, batches) consumed
        self.next_worker = 0
        self.taken = SampleSet()  # consumed in this epoch
        self.exclude: dict[int, SampleSet] = {}  # per epoch: consumed by runs on another layout
        self._skip: dict[int, tuple[int, int]] = {}
        self._iter: Iterator | None = None
        self._loader: DataLoader | None = None  # its workers stay from one epoch to the next
        self._clock = EpochClock()
        self._queues: dict[int, deque] = {}
        self._ended: set[int] = set()
        self._batches_in_epoch = 0
        self.counted: dict[str, int] = {}  # samples per shard, as the workers found reading shards to their end

    def _workers(self, sources: list[Source], requested: int, world: int) -> int:
        return plan_workers(sources, requested, world, self.cfg.resampled)

    def _stream(self, epoch: int, skip: dict[int, tuple[int, int]], exclude: dict[int, SampleSet]) -> ShardStream:
        return ShardStream(self.spec, epoch, skip, exclude, self._clock, dict(self.counted))

    @property
    def _slots(self) -> int:
        return max(1, self.num_workers)

    def _open_epoch(self) -> Iterator[dict[str, Any]]:
        """The iterator of this epoch's worker items. The DataLoader and its workers are made once, at the first epoch
        (or after `load_state_dict`), and persist: each epoch, the workers read which one it is from the clock."""
        self._clock.set(self.epoch)
        self._queues = {w: deque() for w in range(self._slots)}
        self._ended = set()
        if self._loader is None:
            stream = self._stream(self.epoch, self._skip, dict(self.exclude))
            self._skip = {}
            kwargs: dict[str, Any] = {}
            if self.num_workers > 0:
                kwargs = {
                    "prefetch_factor": self.cfg.prefetch_factor,
                    "persistent_workers": True,
                    "worker_init_fn": ignore_stop_signals,
                }
            self._loader = DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **kwargs
            )
        return iter(self._loader)

    def close(self) -> None:
        """Stop the workers (they otherwise stay until the loader is collected)."""
        self._iter = None
        self._loader = None

    def _pop_in_rotation(self) -> dict[str, Any] | None:
        for _ in range(self._slots):
            w = self.next_worker
            if self._queues[w]:
                break
            if w not in self._ended:
                # Waiting for worker w. Should others pile up (w is crossing a long bad stretch), give up
                # the fixed order rather than memory: no sample is lost or repeated either way.
                if sum(len(q) for q in self._queues.values()) <= 2 * self._slots * self.cfg.prefetch_factor:
                    return None
                w = max(self._queues, key=lambda k: len(self._queues[k]))
                break
            self.next_worker = (w + 1) % self._slots
        else:
            return None
        batch = self._queues[w].popleft()
        self.cursors[w] = batch.pop("_cursor")
        self.taken.add_all(batch.pop("_taken", ()))
        self.next_worker = (w + 1) % self._slots
        self._batches_in_epoch += 1
        return batch

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            batch = self._pop_in_rotation() if self._iter is not None else None
            if batch is not None:
                return batch
            if self._iter is None:
                self._iter = self._open_epoch()
            try:
                item = next(self._iter)
            except StopIteration:
                self._ended = set(self._queues)
                if any(self._queues.values()):
                    continue
                self._iter = None
                if self._batches_in_epoch == 0 and not self.cursors:
                    raise DataQualityError(
                        f"rank {self.rank}: epoch {self.epoch} produced no batch of "
                        f"{self.spec.batch_size} usable samples: {self.stats.summary()}"
                    ) from None
                self.exclude.pop(self.epoch, None)
                self.epoch += 1
                self.cursors, self.next_worker, self._batches_in_epoch = {}, 0, 0
                self.taken = SampleSet()
                continue
            self.stats.merge(item.pop("_stats"))
            self.counted.update(item.pop("_counted", {}))
            worker, _, cursor, batches = item.pop("_state")
            self.stats.check(self.cfg.max_bad_fraction, self.cfg.bad_check_after, f"rank {self.rank} training data")
            if item.pop("_end", False):
                self._ended.add(worker)
            elif not item.pop("_heartbeat", False):
                item["_cursor"] = (cursor, batches)
                self._queues[worker].append(item)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "next_worker": self.next_worker,
            "cursors": {str(k): list(v) for k, v in self.cursors.items()},
            "num_workers": self.num_workers,
            "world": self.world,
            "stats": self.stats.to_dict(),
            "taken": self.taken.to_state(),
            "exclude": {str(e): s.to_state() for e, s in self.exclude.items()},
            "shard_counts": dict(self.counted),
        }

    def load_state_dict(self, state: dict[str, Any], peers: Callable[[], list[dict] | None] | None = None) -> None:
        """Resume at `state`, this rank's saved position. On the layout it was saved with (ranks x workers), each
        worker replays its stream to its cursor. On another layout, `peers()` gives every saving rank's state, in
        rank order (None where some are missing): the epoch continues without the samples they consumed."""
        self.epoch = int(state["epoch"])
        self.stats = SampleStats.from_dict(state.get("stats", {}))
        self.close()  # the workers hold the old position: new ones start at this one
        self._batches_in_epoch = 0
        self.next_worker = int(state.get("next_worker", 0))
        cursors = {int(k): (int(v[0]), int(v[1])) for k, v in state.get("cursors", {}).items()}
        self.taken = SampleSet.from_state(state.get("taken"))
        self.exclude = {int(e): SampleSet.from_state(s) for e, s in state.get("exclude", {}).items()}
        self.counted.update({str(u): n for u, n in state.get("shard_counts", {}).items() if isinstance(n, int)})
        if state.get("num_workers") != self.num_workers or state.get("world") != self.world:
            cursors, self.next_worker = {}, 0
            saved = f"{state.get('world')} x {state.get('num_workers')}"
            now = f"{self.world} rank(s) x {self.num_workers} worker(s)"
            states = None if self.spec.resampled or peers is None else peers()
            if states:
                self.epoch, self.exclude = self._continue_epoch(states)
                self.taken = SampleSet()
                if self.rank >= len(states):
                    self.stats = SampleStats()  # its saved counts are another rank's
                log.info(
                    "data saved on %s, resumed on %s: epoch %d continues without the %d sample(s) already consumed",
                    saved,
                    now,
                    self.epoch,
                    self.exclude.get(self.epoch, SampleSet()).count(),
                )
            else:
                why = (
                    "resampled data has no order to continue"
                    if self.spec.resampled
                    else "not every rank's data position is here"
                )
                log.warning("data saved on %s, resumed on %s (%s): epoch %d starts again", saved, now, why, self.epoch)
                self.taken, self.exclude = SampleSet(), {}
        self.cursors = dict(cursors)
        self._skip = cursors
        self._say_what_resume_reads()

    def _say_what_resume_reads(self) -> None:
        """Once, in the main process: which shards a resume mid-epoch may have to read up to its position."""
        if not any(skip for skip, _ in self._skip.values()):
            return
        unknown = [u for s in self.spec.sources for u in s.urls if u not in self.counted and u not in s.sizes]
        unseekable = [u for s in self.spec.sources for u in s.urls if not seekable(u, look=False)]
        if unknown:
            log.warning(
                "resuming mid-epoch: %d shard(s) have no recorded sample count (no sizes.json entry, not read to "
                "their end before the checkpoint), e.g. %s: those the workers had consumed are read again to reach "
                "the position",
                len(unknown),
                unknown[0],
            )
        if unseekable:
            log.warning(
                "resuming mid-epoch: %d shard(s) are remote or compressed, e.g. %s: where the position lies inside "
                "one, or the shuffle buffer holds its samples, it is read from its start",
                len(unseekable),
                unseekable[0],
            )

    def _continue_epoch(self, states: list[dict[str, Any]]) -> tuple[int, dict[int, SampleSet]]:
        """From every saving rank's state: the epoch to continue (the earliest any rank was in) and, per epoch from
        it, what is consumed: what each rank took, what earlier layouts had taken, and for a rank that had already
        finished an epoch, all of its share of that epoch's shards."""
        epoch = min(int(st["epoch"]) for st in states)
        exclude: dict[int, SampleSet] = {}
        for rank, st in enumerate(states):
            for e, consumed in st.get("exclude", {}).items():
                exclude.setdefault(int(e), SampleSet()).update(SampleSet.from_state(consumed))
            ahead = int(st["epoch"])
            exclude.setdefault(ahead, SampleSet()).update(SampleSet.from_state(st.get("taken")))
            workers = max(1, int(st["num_workers"]))
            for e in range(epoch, ahead):  # epochs this rank had finished
                done = exclude.setdefault(e, SampleSet())
                for src in range(len(self.spec.sources)):
                    for worker in range(workers):
                        split = slot_split(self.spec, e, src, rank, int(st["world"]), worker, workers)
                        for url in split.shards:
                            done.add_rule(url, split.sample_stride, split.sample_offset)
        return epoch, {e: s for e, s in exclude.items() if e >= epoch}


def eval_batches(
    sources: list[SourceConfig],
    transforms: dict[str, Callable],
    collators: dict[str, Callable],
    modalities: list[str],
    batch_size: int,
    num_workers: int = 0,
    stats: SampleStats | None = None,
    all_views: bool = False,
) -> Iterator[dict[str, Any]]:
    """One deterministic pass over held-out shards: no shuffling, nothing dropped, bad samples counted.
    With `all_views`, every caption of a sample is kept (batch["__views__"] counts them per sample)."""
    resolved = resolve_sources(sources, modalities)
    spec = StreamSpec(
        sources=resolved,
        decoders=_decoders(resolved),
        transforms=transforms,
        collators=collators,
        batch_size=batch_size,
        train=False,
        drop_last=False,
        all_views=all_views,
    )
    stats = stats if stats is not None else SampleStats()
    workers = min(num_workers, min(len(s.urls) for s in spec.sources))
    extra = {"worker_init_fn": ignore_stop_signals} if workers else {}
    loader = DataLoader(ShardStream(spec), batch_size=None, num_workers=workers, **extra)
    for item in loader:
        stats.merge(item.pop("_stats"))
        item.pop("_state")
        item.pop("_taken", None)
        item.pop("_counted", None)
        if not (item.pop("_heartbeat", False) or item.pop("_end", False)):
            yield item


def to_device(batch: Any, device, float_dtype=None) -> Any:
    """Move a collated batch (tensors, dicts of them, PyG graph batches) to `device`, casting floating
    tensors to `float_dtype` when given; integer tensors (token ids, edge indices) keep their dtype."""
    if isinstance(batch, torch.Tensor):
        if float_dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=float_dtype, non_blocking=True)
        return batch.to(device=device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device, float_dtype) for k, v in batch.items()}
    # A PyG Data/Batch (graphs). torch_geometric is only in sys.modules when something built one.
    pyg = sys.modules.get("torch_geometric.data.data")
    if pyg is not None and isinstance(batch, pyg.BaseData):
        # a shallow copy (its own attribute stores, the same tensors), so the caller's batch is left as is
        return copy.copy(batch).apply(lambda t: to_device(t, device, float_dtype))
    return batch
