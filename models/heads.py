"""Projection heads: encoder features (B, D_enc) -> shared embedding space (B, D)."""

from __future__ import annotations

from torch import nn

from tessera.config import require

from .config import HeadConfig


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
