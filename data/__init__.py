"""Tessera data: safe shard decoding, the webdataset pipeline, shard writing and the demo dataset."""

from .audio import AudioDecoder
from .config import DataConfig, SourceConfig
from .decode import DECODERS, BadSample, Decoder
from .graph import GraphDecoder
from .loader import LABEL_PIPELINE, TrainLoader, eval_batches, to_device
from .per_source import PerSourceLoader, train_loader
from .shards import ShardError, expand_shards
from .stats import DataQualityError, SampleStats

__all__ = [
    "AudioDecoder", "DECODERS", "LABEL_PIPELINE", "BadSample", "DataConfig", "DataQualityError", "Decoder", "GraphDecoder", "SampleStats", "ShardError",
    "PerSourceLoader", "SourceConfig", "TrainLoader", "eval_batches", "expand_shards", "to_device", "train_loader",
]
