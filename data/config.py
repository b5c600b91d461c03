"""Data configuration: sources of shards, mixing weights, loader workers, bad-sample limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tessera.config import ConfigError, from_fields, require


@dataclass
class SourceConfig:
    """One source of shards. In YAML either a mapping, or just the shard spec string."""

    shards: str | list[str] = field(metadata={"help": "brace pattern(s), e.g. data/train-{000..099}.tar"})
    weight: float = field(default=1.0, metadata={"help": "mixing weight among sources"})
    name: str | None = field(default=None, metadata={"help": "label in logs; default: source0, source1, ..."})
    modalities: list[str] | None = field(
        default=None, metadata={"help": "modalities every sample must carry; default: all the model's towers"}
    )

    def __post_init__(self):
        require(bool(self.shards), "a source needs 'shards'")
        require(self.weight > 0, f"source weight must be positive, got {self.weight}")

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> SourceConfig:
        if isinstance(data, str):
            data = {"shards": data}
        return from_fields(cls, data, where)


def parse_sources(value: Any, where: str) -> list[SourceConfig]:
    if isinstance(value, (str, SourceConfig)):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a shard spec or a list of sources, got {value!r}")
    out = [
        v if isinstance(v, SourceConfig) else SourceConfig.from_dict(v, f"{where}[{i}]") for i, v in enumerate(value)
    ]
    return [s if s.name else SourceConfig(s.shards, s.weight, f"source{i}", s.modalities) for i, s in enumerate(out)]


@dataclass
class DataConfig:
    train: Any = field(
        default_factory=list, metadata={"help": "list of sources {shards, weight, name, modalities}, or one shard spec"}
    )
    val: Any = field(default_factory=list, metadata={"help": "held-out sources for evaluation (same forms)"})
    batching: Literal["auto", "mixed", "per_source"] = field(
        default="auto",
        metadata={
            "help": "mixed: every batch mixes samples of all sources (they must carry the same modalities); "
            "per_source: each batch comes from one source, drawn by weight, the same one on every rank, so each "
            "pair's loss sees a full batch; auto: per_source when the sources' modalities differ"
        },
    )
    num_workers: int | Literal["auto"] = field(
        default="auto",
        metadata={
            "help": "loader worker processes per rank (shared out over the sources, when batching is per_source); "
            "auto: the cores per local rank less one for the training process, at most 16"
        },
    )
    prefetch_factor: int = field(default=2, metadata={"help": "batches each worker prepares ahead"})
    resampled: bool = field(default=False, metadata={"help": "draw shards with replacement (needs train_num_samples)"})
    train_num_samples: int | None = field(
        default=None, metadata={"help": "samples per epoch over all ranks (resampled mode)"}
    )
    shuffle_buffer: int = field(default=1000, metadata={"help": "sample shuffle buffer per worker (0: off)"})
    shuffle_initial: int = field(default=100, metadata={"help": "samples buffered before the first is drawn"})
    shard_shuffle: bool = field(default=True, metadata={"help": "shuffle shard order each epoch (seed+epoch)"})
    batch_plan: str | None = field(
        default=None,
        metadata={
            "help": "a batch plan from `tessera plan-batches` (hard-negative batches: each batch drawn from a few "
            "communities of similar samples); it must index shards of data.train, local and uncompressed"
        },
    )
    batch_plan_random: float = field(
        default=0.0, metadata={"help": "with data.batch_plan: the fraction of batches filled with random samples"}
    )
    max_bad_fraction: float = field(
        default=0.1, metadata={"help": "stop with an error when more samples than this are bad"}
    )
    bad_check_after: int = field(default=500, metadata={"help": "samples per rank before the limit applies"})

    def __post_init__(self):
        self.train = parse_sources(self.train, "data.train")
        self.val = parse_sources(self.val, "data.val")
        require(self.num_workers == "auto" or self.num_workers >= 0, "data.num_workers must be >= 0 or auto")
        require(self.prefetch_factor >= 1, "data.prefetch_factor must be >= 1")
        require(self.shuffle_buffer >= 0 and self.shuffle_initial >= 0, "data.shuffle_* must be >= 0")
        require(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction must be in [0, 1]")
        require(
            not self.resampled or (self.train_num_samples or 0) > 0,
            "data.resampled=true needs data.train_num_samples (samples per epoch over all ranks)",
        )
        require(0.0 <= self.batch_plan_random <= 1.0, "data.batch_plan_random must be in [0, 1]")
        require(
            not (self.batch_plan and self.resampled),
            "data.batch_plan sets each epoch's samples and order: it cannot be combined with data.resampled",
        )
        require(self.train_num_samples is None or self.train_num_samples > 0, "data.train_num_samples must be > 0")
