"""Tessera data: safe shard decoding, the webdataset pipeline, shard writing and the demo dataset."""

from .audio import AudioConfig, AudioDecoder, AudioTransform
from .config import DataConfig, SourceConfig
from .decode import DECODERS, BadSample, Decoder
from .loader import LABEL_PIPELINE, TrainLoader, eval_batches, to_device
from .shards import ShardError, expand_shards
from .stats import DataQualityError, SampleStats

__all__ = [
    "AudioConfig", "AudioDecoder", "AudioTransform", "DECODERS", "LABEL_PIPELINE", "BadSample", "DataConfig", "DataQualityError", "Decoder", "SampleStats", "ShardError",
    "SourceConfig", "TrainLoader", "eval_batches", "expand_shards", "to_device",
]
