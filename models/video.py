"""The video tower: an open_clip image tower run on K frames of a clip, then pooled over time, as CLIP4Clip does
it: `mean` (meanP, the frames' average) or `transformer` (seqTransf, a small transformer over the frame features
with a learned position per frame).

The image tower is any open_clip vision tower and takes every OpenClipImageConfig key, `pretrained` included, so
a video tower starts from an image tower's weights (an open_clip checkpoint, or the `open_clip/` form of any
Tessera export). The temporal transformer starts as the identity (its residual branches' last projections are
zero), so a tower built from image weights starts exactly as their frame average and learns order from there.

Frames are sampled uniformly over the clip (its first `max_seconds`): one per equal segment, at a random place in
it for training (TSN's sampling) and at its middle for evaluation, so evaluation sees the same frames every time.
One spatial augmentation serves all frames of a clip.
Shape legend: B clips, K frames, D features.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from tessera.config import require

from .encoder import Encoder
from .open_clip_image import OpenClipImageConfig, OpenClipImageEncoder

__all__ = ["OpenClipVideoConfig", "OpenClipVideoEncoder", "VideoTransform", "frame_indices"]

TEMPORAL = ("mean", "transformer")
MOTION = ("none", "difference")
# LoRA names of the temporal transformer (torch's TransformerEncoderLayer)
TEMPORAL_TARGETS = ["self_attn", "linear1", "linear2"]


@dataclass
class OpenClipVideoConfig(OpenClipImageConfig):
    frames: int = field(default=8, metadata={"help": "frames sampled per clip (K)"})
    temporal: str = field(default="mean", metadata={"help": "pooling over frames: mean (meanP) or transformer"})
    temporal_layers: int = field(default=2, metadata={"help": "temporal transformer layers"})
    temporal_heads: int = field(default=4, metadata={"help": "temporal transformer heads (divide the width)"})
    max_seconds: float = field(default=60.0, metadata={"help": "sample frames from the clip's first seconds only"})
    motion: str = field(
        default="none",
        metadata={
            "help": "none; difference: a second frame tower (the same architecture) also encodes each two consecutive "
            "sampled frames as one image (the first's grey levels, the second's, and their difference as its three "
            "channels), so the tower sees motion where it happens, not only in the frames' order; its K-1 features "
            "join the K frames' in the pooling (the temporal transformer's tokens, or their mean)"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        require(self.frames >= 1, f"frames must be at least 1, got {self.frames}")
        require(self.temporal in TEMPORAL, f"temporal: '{self.temporal}' is not one of {list(TEMPORAL)}")
        require(self.temporal_layers >= 1 and self.temporal_heads >= 1, "temporal_layers and temporal_heads >= 1")
        require(self.max_seconds > 0, f"max_seconds must be positive, got {self.max_seconds}")
        require(self.motion in MOTION, f"motion: '{self.motion}' is not one of {list(MOTION)}")
        require(self.motion == "none" or self.frames >= 2, "motion: difference needs frames >= 2")


def frame_indices(span: int, k: int, is_train: bool) -> list[int]:
    """K frame indices in [0, span): one per equal segment, at a random place in it (training; Python's `random`,
    which the loader seeds per sample) or at its middle (evaluation: always the same frames)."""
    if is_train:
        return [min(span - 1, int((i + random.random()) * span / k)) for i in range(k)]
    # segment middles on the frames' own time axis [0, span - 1], rounded: a clip and its time reversal give mirror
    # frames, so an order-blind tower sees exactly the same frames in both
    return [min(span - 1, math.floor((i + 0.5) * (span - 1) / k + 0.5)) for i in range(k)]


class VideoTransform:
    """A decoded video -> (K, 3, H, W): K sampled frames, each through the image tower's transform with one draw
    of its randomness (every frame of a clip gets the same crop). Picklable for loader workers."""

    def __init__(self, image_transform, frames: int, max_seconds: float, is_train: bool):
        self.image_transform, self.k, self.max_seconds, self.is_train = image_transform, frames, max_seconds, is_train

    def __call__(self, video) -> torch.Tensor:
        pictures = video.frames(frame_indices(video.window(self.max_seconds), self.k, self.is_train))
        torch_state, py_state = torch.get_rng_state(), random.getstate()
        out = []
        for picture in pictures:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)
            out.append(self.image_transform(picture))
        return torch.stack(out)


class TemporalTransformer(nn.Module):
    """Pre-norm transformer over (B, K, D) frame features with a learned position per frame, then their mean. Its
    residual branches' output projections start at zero and the positions start centred (their mean over the frames
    is zero): at initialisation it is the frames' mean exactly. The positions start random (unit normal, as
    CLIP4Clip's), not zero: with zero positions as well, every gradient of a clip's score against its reversal is
    zero at the start (the tower sees the same set of frames either way) and an order-sensitive loss never leaves
    that saddle."""

    def __init__(self, width: int, frames: int, layers: int, heads: int):
        super().__init__()
        require(width % heads == 0, f"temporal_heads {heads} does not divide the frame feature width {width}")
        positions = torch.randn(frames, width)
        self.positions = nn.Parameter(positions - positions.mean(0))
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        for block in self.blocks.layers:
            for proj in (block.self_attn.out_proj, block.linear2):
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)

    def forward(self, x_BKD: torch.Tensor) -> torch.Tensor:
        return self.blocks(x_BKD + self.positions[: x_BKD.shape[1]]).mean(1)


class OpenClipVideoEncoder(Encoder):
    """open_clip's vision tower per frame, pooled over time -> (B, output_dim)."""

    config_cls = OpenClipVideoConfig
    # (B, K, 3, H, W): the frames' axis. Evaluation samples frames symmetrically over the clip (`frame_indices`), so
    # the flipped batch holds the frames of the reversed clips (for an odd K the middle one may be a frame apart)
    time_axis = 1

    def __init__(self, cfg: OpenClipVideoConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.frames = OpenClipImageEncoder(cfg, embed_dim)
        self.output_dim = self.frames.output_dim
        self.motion = OpenClipImageEncoder(cfg, embed_dim) if cfg.motion == "difference" else None
        tokens = cfg.frames + (cfg.frames - 1 if self.motion is not None else 0)
        self.temporal = (
            TemporalTransformer(self.output_dim, tokens, cfg.temporal_layers, cfg.temporal_heads)
            if cfg.temporal == "transformer"
            else None
        )

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        B, K = videos.shape[:2]
        frames = self.frames.normalized(videos.flatten(0, 1))
        x_BKD = self.frames(frames).view(B, K, -1)
        if self.motion is not None:  # K-1 more tokens: each two consecutive frames as one image
            grey_BKHW = frames.unflatten(0, (B, K)).mean(2)
            pairs = torch.stack([grey_BKHW[:, :-1], grey_BKHW[:, 1:], grey_BKHW[:, 1:] - grey_BKHW[:, :-1]], dim=2)
            x_BKD = torch.cat([x_BKD, self.motion(pairs.flatten(0, 1)).view(B, K - 1, -1)], dim=1)
        return x_BKD.mean(1) if self.temporal is None else self.temporal(x_BKD)

    def transform(self, is_train: bool) -> VideoTransform:
        return VideoTransform(self.frames.transform(is_train), self.cfg.frames, self.cfg.max_seconds, is_train)

    def compact_transform(self, is_train: bool) -> VideoTransform:
        """Frames as uint8, normalised on the device by the image tower (see OpenClipImageEncoder)."""
        return VideoTransform(self.frames.compact_transform(is_train), self.cfg.frames, self.cfg.max_seconds, is_train)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.frames.set_grad_checkpointing(enable)
        if self.motion is not None:
            self.motion.set_grad_checkpointing(enable)

    def clip_checkpoint(self) -> str | None:
        return self.frames.clip_checkpoint()

    def clip_temperature(self) -> dict[str, torch.Tensor]:
        return self.frames.clip_temperature()

    def lora_targets(self) -> list[str]:
        return [*self.frames.lora_targets(), *(TEMPORAL_TARGETS if self.temporal is not None else [])]

    def lora_unreachable(self) -> tuple[str, ...]:
        towers = ("frames", "motion") if self.motion is not None else ("frames",)
        return tuple(f"{t}.{p}" for t in towers for p in self.frames.lora_unreachable())
