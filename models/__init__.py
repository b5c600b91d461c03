"""Tessera models: per-modality encoders, projection heads, the multi-tower model and its adapters.

Usable on its own (no DeepSpeed, no webdataset): build from a `ModelConfig`, or `load_model(dir)`. Encoders are
registered in `tessera.modalities` and imported when a model uses them.
"""

from tessera.config import ConfigError

from .config import ModelConfig, TowerConfig, pair_key
from .encoder import Encoder
from .export import load_model, read_model_config, save_model
from .heads import HeadConfig
from .multitower import MultiTowerModel, build_model

__all__ = [
    "ConfigError",
    "Encoder",
    "HeadConfig",
    "ModelConfig",
    "MultiTowerModel",
    "TowerConfig",
    "build_model",
    "load_model",
    "pair_key",
    "read_model_config",
    "save_model",
]
