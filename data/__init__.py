"""Tessera data: safe shard decoding, the webdataset pipeline, shard writing and the demo dataset.

Imports nothing of `tessera.models`: a modality's decoder (`tessera.modalities`) is imported when a source needs it.
"""

from .config import DataConfig, SourceConfig, parse_sources
from .decode import BadSample, Decoder, ManifestError, decoders
from .label import LABEL
from .loader import TrainLoader, eval_batches, to_device
from .per_source import ChunkedLoader, Chunks, PerSourceLoader, train_loader
from .shards import ShardError, expand_shards, shard_sizes
from .stats import DataQualityError, SampleStats

__all__ = [
    "LABEL",
    "BadSample",
    "ChunkedLoader",
    "Chunks",
    "DataConfig",
    "DataQualityError",
    "Decoder",
    "ManifestError",
    "PerSourceLoader",
    "SampleStats",
    "ShardError",
    "SourceConfig",
    "TrainLoader",
    "decoders",
    "eval_batches",
    "expand_shards",
    "parse_sources",
    "shard_sizes",
    "to_device",
    "train_loader",
]
