"""Tessera models: per-modality encoders, projection heads and the multi-tower model.

Usable on its own (no DeepSpeed, no webdataset): build from a `ModelConfig`, or `load_model(dir)`.
"""

from .config import ModelConfig, TowerConfig, pair_key
from tessera.config import ConfigError
from .encoder import Encoder
from .export import load_model, read_model_config, save_model
from .heads import HeadConfig
from .multitower import MultiTowerModel, build_model
from .registry import ENCODERS, EncoderSpec

__all__ = [
    "ConfigError", "ENCODERS", "Encoder", "EncoderSpec", "HeadConfig", "ModelConfig", "MultiTowerModel",
    "TowerConfig", "build_model", "load_model", "pair_key", "read_model_config", "save_model",
]
