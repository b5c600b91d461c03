"""The explicit table of encoders, by name. Adding an encoder (or a modality) is one entry here."""

from __future__ import annotations

from dataclasses import dataclass

from .audio import ASTConfig, ASTEncoder, HFAudioConfig, HFAudioEncoder
from .encoder import Encoder
from .graph import GraphEncoder, GraphEncoderConfig
from .hf_text import HFTextConfig, HFTextEncoder
from .open_clip_towers import (
    OpenClipImageConfig,
    OpenClipImageEncoder,
    OpenClipTextConfig,
    OpenClipTextEncoder,
)


@dataclass(frozen=True)
class EncoderSpec:
    modality: str            # the batch key the encoder reads, and the data decoder it needs
    config_cls: type         # its typed config
    encoder_cls: type[Encoder]  # built as encoder_cls(config, embed_dim)


ENCODERS: dict[str, EncoderSpec] = {
    "open_clip_image": EncoderSpec("image", OpenClipImageConfig, OpenClipImageEncoder),
    "open_clip_text": EncoderSpec("text", OpenClipTextConfig, OpenClipTextEncoder),
    "hf_text": EncoderSpec("text", HFTextConfig, HFTextEncoder),
    "gnn": EncoderSpec("graph", GraphEncoderConfig, GraphEncoder),
    "ast": EncoderSpec("audio", ASTConfig, ASTEncoder),
    "hf_audio": EncoderSpec("audio", HFAudioConfig, HFAudioEncoder),
}
