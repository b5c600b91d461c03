"""Audio encoders: an audio spectrogram transformer (a timm ViT over log-mel patches), and Hugging Face
`transformers` audio models (spectrogram or raw waveform) from a local directory or an in-code config.

Training batches hold one crop per clip: (B, M, F) log-mels, or (B, S) waveforms. Evaluation batches may
hold K evenly spaced crops per clip (`audio.eval_crops`): (B, K, M, F) or (B, K, S). Every crop is encoded
on its own and the encoder features are averaged over K, so a clip gets one feature before its head.

Log-mels (dB) are standardised inside the encoder, not in the transform, so an exported model carries its
own normalisation. `norm: fixed` maps dB to about unit scale with a fixed mean and std; the defaults
(-20 dB, 20 dB) are AST's AudioSet statistics (-4.27, 4.57 in natural-log Kaldi fbank units) converted
to dB, and put this repository's log-mels of ordinary clips, from quiet to loud, within a few units of 0.
`norm: clip` standardises each crop by its own mean and std instead: independent of the data set and of
recording level, at the cost of discarding loudness.
Shape legend: B batch, K crops, M mel bins, F frames, S samples, T tokens, D width.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import AutoConfig

from tessera.config import ConfigError, require, to_dict

from .audio_features import AudioConfig, AudioTransform
from .encoder import Encoder
from .hf_common import build_hf_model, hf_lora_targets, require_local_source, set_hf_grad_checkpointing

__all__ = ["AST_SIZES", "ASTConfig", "ASTEncoder", "HFAudioConfig", "HFAudioEncoder"]

# (width, depth, heads), as DeiT/ViT tiny, small, base (AST's own size) and large
AST_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def _standardize(x: torch.Tensor, norm: str, mean: float, std: float) -> torch.Tensor:
    """Normalise each example of `x` (B, ...): fixed (x - mean) / std, per example ('clip'), or not ('none')."""
    if norm == "fixed":
        return (x - mean) / std
    if norm == "clip":
        # float32 statistics: bf16 sums over thousands of values lose too much
        x32 = x.float().flatten(1)
        mu, sigma = x32.mean(1), x32.std(1)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return ((x.float() - mu.view(shape)) / (sigma.view(shape) + 1e-5)).to(x.dtype)
    return x


def _average_over_crops(
    encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, item_dims: int, what: str
) -> torch.Tensor:
    """`encode` a batch of single crops (B, ...), or of K crops per clip (B, K, ...) averaged over K."""
    if x.dim() == item_dims + 1:
        return encode(x)
    if x.dim() == item_dims + 2:
        B, K = x.shape[:2]
        return encode(x.flatten(0, 1)).unflatten(0, (B, K)).mean(1)
    raise ValueError(f"expected {what} with or without a crop axis K, got shape {tuple(x.shape)}")


@dataclass
class ASTConfig:
    audio: AudioConfig = field(default_factory=AudioConfig, metadata={"help": "waveform -> log-mel parameters"})
    size: Literal["tiny", "small", "base", "large"] = field(
        default="base", metadata={"help": f"width/depth/heads preset {AST_SIZES}; explicit fields win"}
    )
    width: int | None = field(default=None, metadata={"help": "transformer width; default: the size's"})
    depth: int | None = field(default=None, metadata={"help": "transformer blocks; default: the size's"})
    heads: int | None = field(default=None, metadata={"help": "attention heads; default: the size's"})
    patch_size: int | list[int] = field(default=16, metadata={"help": "patch, or [mel bins, frames]; no overlap"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden width as a multiple of the width"})
    pool: Literal["token", "avg"] = field(default="token", metadata={"help": "class token, or mean of patches"})
    drop_path_rate: float = field(default=0.0, metadata={"help": "stochastic depth, training"})
    output_dim: int | None = field(default=None, metadata={"help": "features width; default: width (no projection)"})
    norm: Literal["fixed", "clip"] = field(
        default="fixed", metadata={"help": "log-mel standardisation: fixed mean/std, or per clip"}
    )
    norm_mean: float = field(default=-20.0, metadata={"help": "dB; norm: fixed"})
    norm_std: float = field(default=20.0, metadata={"help": "dB; norm: fixed"})

    def __post_init__(self):
        width, depth, heads = self.arch
        require(width > 0 and depth > 0 and heads > 0, "ast: width, depth and heads must be positive")
        require(width % heads == 0, f"ast: width {width} is not divisible by heads {heads}")
        ps = [self.patch_size] if isinstance(self.patch_size, int) else self.patch_size
        require(
            len(ps) in (1, 2) and all(p > 0 for p in ps),
            f"ast.patch_size must be a positive int or [mel bins, frames], got {self.patch_size}",
        )
        require(self.output_dim is None or self.output_dim > 0, "ast.output_dim must be positive")
        require(self.norm_std > 0 and self.mlp_ratio > 0, "ast.norm_std and ast.mlp_ratio must be positive")
        require(0.0 <= self.drop_path_rate < 1.0, "ast.drop_path_rate must be in [0, 1)")

    @property
    def arch(self) -> tuple[int, int, int]:
        """(width, depth, heads): the size preset with the explicit fields over it."""
        width, depth, heads = AST_SIZES[self.size]
        return self.width or width, self.depth or depth, self.heads or heads

    @property
    def patch(self) -> tuple[int, int]:
        ps = self.patch_size
        return (ps, ps) if isinstance(ps, int) else (ps[0], ps[-1])


class ASTEncoder(Encoder):
    """Audio spectrogram transformer: timm's VisionTransformer over one-channel (M, F) log-mel images.

    The log-mel is zero-padded (after standardisation, so with its mean level) up to whole patches, so
    any clip length and mel count work; the position embeddings cover the padded grid.
    """

    config_cls = ASTConfig

    def __init__(self, cfg: ASTConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        width, depth, heads = cfg.arch
        (ph, pw), m, f = cfg.patch, cfg.audio.n_mels, cfg.audio.frames
        self.input_size = (m, f)
        self.pad = (0, -f % pw, 0, -m % ph)  # F.pad order: frames (right), then mel bins (bottom)
        self.vit = VisionTransformer(
            img_size=(m + self.pad[3], f + self.pad[1]),
            patch_size=(ph, pw),
            in_chans=1,
            num_classes=0,
            global_pool=cfg.pool,
            class_token=cfg.pool == "token",
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=cfg.mlp_ratio,
            drop_path_rate=cfg.drop_path_rate,
        )
        self.output_dim = cfg.output_dim or width
        self.proj = nn.Linear(width, self.output_dim, bias=False) if self.output_dim != width else nn.Identity()

    def forward(self, spec: torch.Tensor) -> torch.Tensor:  # (B, M, F) or (B, K, M, F) -> (B, output_dim)
        return _average_over_crops(self._encode, spec, 2, "log-mels (B, M, F)")

    def _encode(self, spec_BMF: torch.Tensor) -> torch.Tensor:
        if tuple(spec_BMF.shape[1:]) != self.input_size:
            raise ValueError(
                f"ast: expected log-mels (B, {self.input_size[0]}, {self.input_size[1]}) as its "
                f"audio config makes them, got {tuple(spec_BMF.shape)}"
            )
        x_BMF = _standardize(spec_BMF, self.cfg.norm, self.cfg.norm_mean, self.cfg.norm_std)
        x_B1MF = F.pad(x_BMF, self.pad).unsqueeze(1)
        return self.proj(self.vit(x_B1MF))

    def transform(self, is_train: bool) -> AudioTransform:
        return AudioTransform(self.cfg.audio, is_train)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def lora_targets(self) -> list[str]:
        return ["qkv", "proj", "fc1", "fc2"]  # timm's attention and MLP projections


@dataclass
class HFAudioConfig:
    path: str | None = field(default=None, metadata={"help": "local HF model directory (config.json, weights)"})
    config: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "in-code HF config, e.g. {model_type: wav2vec2, ...}"}
    )
    audio: AudioConfig = field(default_factory=AudioConfig, metadata={"help": "rate, crops (and mel parameters)"})
    inputs: Literal["mel", "waveform"] = field(
        default="mel",
        metadata={"help": "mel: (B, frames, mel bins) input_values, as AST; waveform: (B, S), as wav2vec2 / HuBERT"},
    )
    pooling: Literal["mean", "cls"] = field(default="mean", metadata={"help": "how token states become one"})
    norm: Literal["fixed", "clip", "none"] | None = field(
        default=None,
        metadata={
            "help": "input standardisation; default: fixed for mel, clip (zero mean, unit "
            "variance per crop, as wav2vec2's feature extractor) for waveform"
        },
    )
    norm_mean: float = field(default=-20.0, metadata={"help": "dB; norm: fixed (mel only)"})
    norm_std: float = field(default=20.0, metadata={"help": "dB; norm: fixed (mel only)"})
    load_weights: bool = field(default=True, metadata={"help": "load weights from path (false: random init)"})

    def __post_init__(self):
        require_local_source("hf_audio", self.path, self.config, "audio-spectrogram-transformer, wav2vec2, hubert")
        require(
            not (self.inputs == "waveform" and self.norm == "fixed"),
            "hf_audio.norm 'fixed' (dB mean/std) is for mel inputs; use 'clip' or 'none' for waveforms",
        )
        require(self.norm_std > 0, "hf_audio.norm_std must be positive")

    @property
    def norm_mode(self) -> str:
        return self.norm or ("fixed" if self.inputs == "mel" else "clip")

    def expected_fields(self) -> dict[str, int]:
        """HF config fields a spectrogram model must agree on with the audio config."""
        return {"num_mel_bins": self.audio.n_mels, "max_length": self.audio.frames}


def _check_hf_config(hf_cfg: Any, cfg: HFAudioConfig, source: str) -> None:
    if cfg.inputs == "mel":
        if not hasattr(hf_cfg, "num_mel_bins"):
            raise ConfigError(
                f"hf_audio: {source} ({hf_cfg.model_type}) has no num_mel_bins, so it is not a "
                "spectrogram model; for raw-audio models (wav2vec2, hubert) set inputs: waveform"
            )
        for key, want in cfg.expected_fields().items():
            got = getattr(hf_cfg, key, want)
            if got != want:
                source_of = {
                    "num_mel_bins": "audio.n_mels",
                    "max_length": "audio frames (clip_samples // hop_length + 1)",
                }[key]
                raise ConfigError(
                    f"hf_audio: {source} has {key}={got} but the audio config gives {want} "
                    f"({source_of}); change the audio config to match the model"
                )
    if cfg.path is not None:
        extractor = Path(cfg.path, "preprocessor_config.json")
        rate = json.loads(extractor.read_text()).get("sampling_rate") if extractor.is_file() else None
        if rate is not None and rate != cfg.audio.sample_rate:
            raise ConfigError(
                f"hf_audio: '{cfg.path}' expects {rate} Hz audio but audio.sample_rate is {cfg.audio.sample_rate}"
            )


class HFAudioEncoder(Encoder):
    """A `transformers` audio model's last hidden states, pooled -> (B, hidden_size)."""

    config_cls = HFAudioConfig

    def __init__(self, cfg: HFAudioConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        config = dict(cfg.config)
        if cfg.path is None and cfg.inputs == "mel":  # fill the fields the model's config has from the audio config
            defaults = AutoConfig.for_model(config["model_type"])
            for key, value in cfg.expected_fields().items():
                if hasattr(defaults, key):
                    config.setdefault(key, value)
        source = f"'{cfg.path}'" if cfg.path is not None else "hf_audio.config"
        self.model, hf_cfg = build_hf_model(
            cfg.path, config, cfg.load_weights, check=lambda hf_cfg: _check_hf_config(hf_cfg, cfg, source)
        )
        self.output_dim = int(getattr(hf_cfg, "hidden_size", None) or hf_cfg.d_model)
        self.input_size = (cfg.audio.n_mels, cfg.audio.frames) if cfg.inputs == "mel" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, [K,] M, F) or (B, [K,] S) -> (B, output_dim)
        if self.cfg.inputs == "mel":
            return _average_over_crops(self._encode, x, 2, "log-mels (B, M, F)")
        return _average_over_crops(self._encode, x, 1, "waveforms (B, S)")

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None:
            if tuple(x.shape[1:]) != self.input_size:
                raise ValueError(
                    f"hf_audio: expected log-mels (B, {self.input_size[0]}, {self.input_size[1]}) "
                    f"as its audio config makes them, got {tuple(x.shape)}"
                )
            x = x.transpose(1, 2)  # (B, F, M): HF spectrogram models are time-major
        x = _standardize(x, self.cfg.norm_mode, self.cfg.norm_mean, self.cfg.norm_std)
        hidden_BTD = self.model(input_values=x).last_hidden_state
        if self.cfg.pooling == "cls":
            return hidden_BTD[:, 0]
        return hidden_BTD.mean(1)

    def transform(self, is_train: bool) -> AudioTransform:
        return AudioTransform(self.cfg.audio, is_train, features=self.cfg.inputs)

    def export_params(self, out_dir: Path) -> dict[str, Any]:
        self.model.config.save_pretrained(Path(out_dir) / "hf_audio")
        return {**to_dict(self.cfg), "path": "./hf_audio", "config": {}, "load_weights": False}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_hf_grad_checkpointing(self.model, enable)

    def lora_targets(self) -> list[str]:
        return hf_lora_targets(self.model)
