"""Tessera data: safe shard decoding, the webdataset pipeline, shard writing and the demo dataset.

Imports nothing of `tessera.models`: a modality's decoder (`tessera.modalities`) is imported when a source needs it.
The names below are imported when first used (`tessera.lazy`): `DataConfig` alone needs no torch or webdataset.
"""

from tessera.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        ".config": ["DataConfig", "SourceConfig", "parse_sources"],
        ".decode": ["BadSample", "Decoder", "ManifestError", "decoders"],
        ".label": ["LABEL"],
        ".loader": ["TrainLoader", "eval_batches", "to_device"],
        ".per_source": ["ChunkedLoader", "Chunks", "PerSourceLoader", "train_loader"],
        ".shards": ["ShardError", "expand_shards", "shard_sizes"],
        ".stats": ["DataQualityError", "SampleStats"],
    },
)
