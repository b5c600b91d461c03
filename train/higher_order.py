"""Objectives over samples that carry three or more modalities at once.

Symile (Saporta et al., NeurIPS 2024) scores a tuple by the multilinear inner product MIP(x, y, z) = sum_d x_d y_d z_d
of its modalities' normalised embeddings. Each modality in turn is the anchor; its loss is a one-way cross-entropy
in which row i holds the positive MIP(x_i, y_i, z_i) and the negatives MIP(x_i, y_pi(j), z_sigma(j)) for j != i,
with y and z shuffled independently: O(N) negatives per positive whose non-anchor parts are mixed, so that the
score learns the joint, not only pairs. The loss is the mean over the anchors.

Tiled: with u_j = y_pi(j) * z_sigma(j) (elementwise), the negatives are the logits s * x @ u^T off the diagonal and
the positives are s * MIP(x_i, y_i, z_i), one per row. Forward keeps the row log-sum-exps over the off-diagonal
tiles (the ring carries the column blocks of u, as in `losses`), backward recomputes each tile once: memory linear
in the batch at any size. Across ranks each rank shuffles its own rows, so the negatives of a row come from every
rank's mixed products. The gradient convention is `losses`': every rank returns the global loss; its gradients are
W times its share.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from .losses import _Layout, _mm, _Ring, _spans, _wide, default_tile, is_distributed


def _diagonal(layout: _Layout, rank: int, col_block: int, r, c, device) -> torch.Tensor | None:
    """The mask of a tile's global-diagonal entries, or None where the tile has none."""
    row0, col0 = layout.offsets[rank] + r[0], layout.offsets[col_block] + c[0]
    if row0 >= col0 + (c[1] - c[0]) or col0 >= row0 + (r[1] - r[0]):
        return None
    rows = torch.arange(row0, row0 + r[1] - r[0], device=device)
    return rows[:, None] == torch.arange(col0, col0 + c[1] - c[0], device=device)[None, :]


class _OneWayWithPositives(torch.autograd.Function):
    """L = 1/G sum_i [logaddexp(LSE_{j != i} a_s_i . u_j, p_i) - p_i] over the global batch, tiled."""

    @staticmethod
    def forward(ctx, a_s, u, p, tile: int, group):
        ring = _Ring(group)
        acc = _wide(a_s[:0]).dtype
        layout = _Layout(ring, a_s.shape[0], None, a_s.device, acc)
        lse = torch.full((a_s.shape[0],), float("-inf"), dtype=acc, device=a_s.device)

        def compute(blk, payload):
            for r in _spans(a_s.shape[0], tile):
                for c in _spans(payload[0].shape[0], tile):
                    z = _mm(a_s[r[0] : r[1]], payload[0][c[0] : c[1]].T)
                    diag = _diagonal(layout, ring.rank, blk, r, c, z.device)
                    if diag is not None:
                        z.masked_fill_(diag, float("-inf"))
                    torch.logaddexp(lse[r[0] : r[1]], torch.logsumexp(z, 1), out=lse[r[0] : r[1]])

        ring.run([u], lambda blk: [(layout.sizes[blk], u.shape[1])], compute)
        torch.logaddexp(lse, _wide(p), out=lse)
        local = (lse - _wide(p)).sum()
        if ring.world > 1:
            dist.all_reduce(local, group=group)
        ctx.save_for_backward(a_s, u, p, lse)
        ctx.tile, ctx.group, ctx.layout = tile, group, layout
        return local / layout.total

    @staticmethod
    def backward(ctx, grad_out):
        a_s, u, p, lse = ctx.saved_tensors
        ring, layout, tile = _Ring(ctx.group), ctx.layout, ctx.tile
        acc = lse.dtype
        coef = grad_out.to(acc) * ring.world / layout.total  # W: see `losses` (DeepSpeed/DDP divide by W)
        grad_a = torch.zeros(a_s.shape, dtype=acc, device=a_s.device)

        def compute(blk, payload):
            ub = payload[0]
            grad_u = torch.zeros(ub.shape, dtype=acc, device=ub.device)
            for r in _spans(a_s.shape[0], tile):
                for c in _spans(ub.shape[0], tile):
                    z = _mm(a_s[r[0] : r[1]], ub[c[0] : c[1]].T)
                    diag = _diagonal(layout, ring.rank, blk, r, c, z.device)
                    if diag is not None:
                        z.masked_fill_(diag, float("-inf"))
                    g = z.sub_(lse[r[0] : r[1], None]).exp_()
                    grad_a[r[0] : r[1]] += _mm(g.to(a_s.dtype), ub[c[0] : c[1]])
                    grad_u[c[0] : c[1]] += _mm(g.T.to(a_s.dtype), a_s[r[0] : r[1]])
            return grad_u

        grad_u = ring.run(
            [u],
            lambda blk: [(layout.sizes[blk], u.shape[1])],
            compute,
            acc_shape=lambda blk: (layout.sizes[blk], u.shape[1]),
            acc_dtype=acc,
        )
        grad_p = (torch.exp(_wide(p) - lse) - 1) * coef
        return (grad_a * coef).to(a_s.dtype), (grad_u * coef).to(u.dtype), grad_p.to(p.dtype), None, None


def symile_loss(
    features: list[torch.Tensor],
    logit_scale: torch.Tensor,
    tile_size: int | None = None,
    process_group=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Symile's loss with O(N) negatives over the global batch: the mean over anchors of the one-way cross-entropy
    of the positive MIP against MIPs with independently shuffled non-anchor rows (see the module docstring).

    features: k >= 3 (B, D) tensors of this rank, one per modality, row i of each from sample i (normalised, as
    Symile uses them). logit_scale: the multiplier. generator: the source of the shuffles (on the features'
    device); the shuffles stay within a rank."""
    if len(features) < 3:
        raise ValueError(f"Symile scores three or more modalities at once, got {len(features)}")
    shape = features[0].shape
    if any(f.ndim != 2 or f.shape != shape for f in features):
        raise ValueError(f"Symile needs (B, D) features of one shape, got {[tuple(f.shape) for f in features]}")
    tile = default_tile(features[0].device) if tile_size is None else int(tile_size)
    group = process_group if is_distributed(process_group) else None
    scale = _wide(logit_scale.reshape(()))
    n = shape[0]
    losses = []
    for anchor, x in enumerate(features):
        others = [f for i, f in enumerate(features) if i != anchor]
        mixed = functools.reduce(
            torch.mul, [f[torch.randperm(n, generator=generator, device=f.device)] for f in others]
        )
        positive = (x * functools.reduce(torch.mul, others)).sum(1)
        a_s = (_wide(x) * scale).to(x.dtype)
        losses.append(_OneWayWithPositives.apply(a_s, mixed.contiguous(), _wide(positive) * scale, tile, group))
    return torch.stack(losses).mean()


def symile_reference(features: list[torch.Tensor], logit_scale: torch.Tensor, permutations: list[list[torch.Tensor]]):
    """The same loss with whole matrices (as Symile's own code computes it), for tests: `permutations[anchor]` holds
    the shuffles of the other modalities, in order."""
    n = features[0].shape[0]
    labels = torch.arange(n)
    losses = []
    for anchor, x in enumerate(features):
        others = [f for i, f in enumerate(features) if i != anchor]
        mixed = functools.reduce(torch.mul, [f[perm] for f, perm in zip(others, permutations[anchor])])
        logits = x @ mixed.T
        positive = (x * functools.reduce(torch.mul, others)).sum(1)
        logits = torch.where(torch.eye(n, dtype=torch.bool), positive[:, None], logits)
        losses.append(torch.nn.functional.cross_entropy(logit_scale * logits, labels))
    return torch.stack(losses).mean()


__all__ = ["symile_loss", "symile_reference"]
