"""Tessera models: per-modality encoders, projection heads, the multi-tower model and its adapters.

Usable on its own (no DeepSpeed, no webdataset): build from a `ModelConfig`, or `load_model(dir)`. Encoders are
registered in `tessera.modalities` and imported when a model uses them. The names below are imported when first
used (`tessera.lazy`): the configs alone need no torch.
"""

from tessera.config import ConfigError
from tessera.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        ".config": ["HeadConfig", "ModelConfig", "TowerConfig", "pair_key", "read_model_config"],
        ".encoder": ["Encoder"],
        ".export": ["load_model", "save_model"],
        ".multitower": ["REVERSED", "MultiTowerModel", "build_model", "truncate_embeddings"],
    },
)
__all__ += ["ConfigError"]
