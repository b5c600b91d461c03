"""Projection heads: encoder features (B, D_enc) -> shared embedding space (B, D)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from tessera.config import require


@dataclass
class HeadConfig:
    kind: Literal["auto", "identity", "linear", "mlp"] = field(
        default="auto", metadata={"help": "auto: identity when the encoder already outputs embed_dim, else linear"}
    )
    hidden_dim: int | None = field(default=None, metadata={"help": "mlp hidden width; default: the input width"})
    dropout: float = field(default=0.0, metadata={"help": "dropout before the projection"})

    def __post_init__(self):
        require(0.0 <= self.dropout < 1.0, f"head.dropout must be in [0, 1), got {self.dropout}")


def build_head(cfg: HeadConfig, in_dim: int, out_dim: int) -> nn.Module:
    kind = cfg.kind
    if kind == "auto":
        kind = "identity" if in_dim == out_dim else "linear"
    require(
        kind != "identity" or in_dim == out_dim,
        f"head 'identity' needs the encoder width ({in_dim}) to equal embed_dim ({out_dim}); use 'linear'",
    )
    drop = [nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else []
    if kind == "identity":
        return nn.Sequential(*drop) if drop else nn.Identity()
    if kind == "linear":
        return nn.Sequential(*drop, nn.Linear(in_dim, out_dim, bias=False))
    hidden = cfg.hidden_dim or in_dim
    return nn.Sequential(*drop, nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim, bias=False))
