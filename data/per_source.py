"""Training batches for sources that carry different modalities: each batch comes from one source.

A run may mix image-text, audio-text and graph-text shards, and shards with three modalities at once. Mixing
their samples inside a batch would leave each pair's loss with only the samples that carry both sides, a
fraction of the batch, which changes from step to step. Instead every micro-batch is drawn whole from one
source, chosen by weight, so the loss of every pair it carries sees the full batch of negatives (and, across
ranks, the full global batch).

The choice of source for micro-batch i depends only on (seed, i): every rank draws the same source at the same
step, which the tiled loss's ring needs (all ranks must run the same pairs' collectives) and which keeps the
towers DeepSpeed gathers the same on every rank. Each source has its own endless `TrainLoader` (own workers,
own epochs, own resumable position).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

from tessera.config import ConfigError

from .config import DataConfig, SourceConfig
from .loader import TrainLoader, auto_workers
from .pipeline import seeded_rng
from .plan import PlannedLoader
from .shards import ShardError
from .stats import SampleStats

log = logging.getLogger(__name__)


def source_modalities(src: SourceConfig, default: list[str]) -> tuple[str, ...]:
    return tuple(src.modalities or default)


def choose_batching(cfg: DataConfig, modalities: list[str]) -> str:
    """'mixed' or 'per_source', from data.batching and what the sources carry."""
    carried = {source_modalities(s, modalities) for s in cfg.train}
    if cfg.batching == "mixed" and len(carried) > 1:
        raise ShardError(
            "data.batching=mixed needs every source to carry the same modalities, but they carry "
            f"{sorted('+'.join(c) for c in carried)}: use data.batching=per_source (or auto)"
        )
    if cfg.batching == "auto":
        return "per_source" if len(carried) > 1 else "mixed"
    return cfg.batching


class PerSourceLoader:
    """An endless iterator of one-source training batches, the source drawn by weight, in lockstep over ranks.

    Exposes what the training loop uses of `TrainLoader`: `stats`, `epoch`, `num_workers`, `state_dict()`,
    `load_state_dict()`. Each batch also says which source it came from (`__source__`).
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
        group: int = 1,
    ):
        """`group` consecutive batches come from one source (the chunks of one contrastive batch)."""
        if not cfg.train:
            raise ShardError("no data sources configured (set data.train, e.g. data.train=path/{000..009}.tar)")
        self.seed = seed
        self.names = [s.name for s in cfg.train]
        if len(set(self.names)) != len(self.names):
            raise ShardError(f"data.train: source names must differ for per-source batching, got {self.names}")
        self.weights = [s.weight for s in cfg.train]
        if cfg.num_workers == "auto":  # the cores are shared out over the sources' loaders
            cfg = dataclasses.replace(cfg, num_workers=auto_workers(len(cfg.train)))
        self.loaders = {
            s.name: TrainLoader(
                dataclasses.replace(cfg, train=[s]),
                transforms,
                collators,
                modalities,
                batch_size,
                seed=seed,
                rank=rank,
                world=world,
                pin_memory=pin_memory,
            )
            for s in cfg.train
        }
        self.group = group
        self.drawn = 0  # batches handed out: the position in the source schedule
        log.info(
            "per-source batching: %s",
            ", ".join(
                f"{s.name} ({'+'.join(source_modalities(s, modalities))}, p={s.weight / sum(self.weights):.2f})"
                for s in cfg.train
            ),
        )

    def source_at(self, i: int) -> str:
        """The source of batch i: a function of (seed, i // group) alone, so identical on every rank."""
        return seeded_rng(self.seed, "source", i // self.group).choices(self.names, weights=self.weights)[0]

    def __iter__(self) -> PerSourceLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        name = self.source_at(self.drawn)
        batch = next(self.loaders[name])
        self.drawn += 1
        batch["__source__"] = name
        return batch

    @property
    def stats(self) -> SampleStats:
        total = SampleStats()
        for loader in self.loaders.values():
            total.merge(loader.stats.to_dict())
        return total

    @property
    def epoch(self) -> int:
        """Epochs every source has completed at least."""
        return min(loader.epoch for loader in self.loaders.values())

    @property
    def num_workers(self) -> int:
        return sum(loader.num_workers for loader in self.loaders.values())

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn, "sources": {n: loader.state_dict() for n, loader in self.loaders.items()}}

    def load_state_dict(self, state: dict[str, Any], peers: Callable[[], list[dict] | None] | None = None) -> None:
        if "sources" not in state or set(state["sources"]) != set(self.loaders):
            raise ShardError(
                f"the checkpoint's data position is for sources {sorted(state.get('sources', {}))}, "
                f"this run has {sorted(self.loaders)}: resume with the same data.train sources"
            )
        self.drawn = int(state["drawn"])
        for name, loader in self.loaders.items():
            loader.load_state_dict(state["sources"][name], peers and _source_states(peers, name))


def _source_states(peers: Callable[[], list[dict] | None], name: str) -> Callable[[], list[dict] | None]:
    def states() -> list[dict] | None:
        every = peers()
        return None if every is None else [st["sources"][name] for st in every]

    return states


class Chunks(list):
    """The chunks of one contrastive batch, in order: each a batch the loader collated on its own (so no worker ever
    holds the whole batch), left where the loader put it until a step moves one chunk at a time to its device."""


class ChunkedLoader:
    """Groups of `chunks` consecutive batches of `loader`, as `Chunks`. Its position is the inner loader's, which
    a checkpoint always saves at a group's boundary (after a whole step)."""

    def __init__(self, loader: TrainLoader | PerSourceLoader, chunks: int):
        self.loader, self.chunks = loader, chunks

    def __iter__(self) -> ChunkedLoader:
        return self

    def __next__(self) -> Chunks:
        return Chunks(next(self.loader) for _ in range(self.chunks))

    def __getattr__(self, name: str) -> Any:  # stats, epoch, num_workers, state_dict, load_state_dict
        return getattr(self.__dict__["loader"], name)


def train_loader(
    cfg: DataConfig,
    transforms: dict[str, Callable],
    collators: dict[str, Callable],
    modalities: list[str],
    batch_size: int,
    chunk_size: int = 0,
    **kwargs: Any,
) -> TrainLoader | PerSourceLoader | ChunkedLoader:
    """The training loader data.batching asks for (see `choose_batching`). With a `chunk_size` below
    `batch_size` (a divisor of it), workers collate chunks and the loader hands out each batch as its `Chunks`;
    per-source batching draws one source for all chunks of a batch."""
    per_source = choose_batching(cfg, modalities) == "per_source"
    cls: Callable[..., TrainLoader | PerSourceLoader] = PerSourceLoader if per_source else TrainLoader
    if cfg.batch_plan:
        if per_source:
            raise ConfigError(
                "data.batch_plan builds batches across the sources, so they must carry the same modalities "
                "(data.batching=mixed)"
            )
        cls = functools.partial(PlannedLoader, rank_batch=batch_size)
    if not chunk_size or chunk_size >= batch_size:
        return cls(cfg, transforms, collators, modalities, batch_size, **kwargs)
    if batch_size % chunk_size:
        raise ValueError(f"batch size {batch_size} is not a multiple of the chunk size {chunk_size}")
    group = batch_size // chunk_size
    if per_source:
        inner = PerSourceLoader(cfg, transforms, collators, modalities, chunk_size, group=group, **kwargs)
    else:
        inner = cls(cfg, transforms, collators, modalities, chunk_size, **kwargs)
    return ChunkedLoader(inner, group)
