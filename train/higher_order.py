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

GRAM (Cicchetti et al., ICLR 2025) scores an anchor (the tuple's first modality) against the rest of a sample by the
volume of the parallelotope their normalised embeddings span, sqrt|det G| of their k x k Gram matrix: small when
all k point the same way. Its loss is the symmetric InfoNCE over the logits z_ij = -s * volume(anchor_i, rest_j).
A tile's Gram entries are k - 1 GEMMs of the anchor rows against the column block's other modalities, the anchor
rows' squared norms, and the column samples' own k - 1 x k - 1 Gram matrices (which travel with the block); the
volume is elementwise on them (a closed-form 3 x 3 determinant for three modalities, a batched one beyond), and
backward takes its derivatives by autograd on the tile's entries, then back through the same GEMMs. Memory per tile:
O(k^2 T^2) beyond three modalities (the batched Gram matrices), O(k T^2) for three.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_reduce as all_reduce_with_grad

from .losses import LossOptions, _Layout, _mm, _Ring, _spans, _TileContext, _wide, is_distributed, resolve_tile


class _OneWayWithPositives(torch.autograd.Function):
    """L = 1/G sum_i [logaddexp(LSE_{j != i} a_s_i . u_j, p_i) - p_i] over the global batch, tiled."""

    @staticmethod
    def forward(ctx, a_s, u, p, tile: int, group):
        ring = _Ring(group)
        acc = _wide(a_s[:0]).dtype
        layout = _Layout(ring, a_s.shape[0], None, a_s.device, acc)
        diagonal = _TileContext(LossOptions(), layout, ring.rank, None)  # its positives: the diagonal's mask
        lse = torch.full((a_s.shape[0],), float("-inf"), dtype=acc, device=a_s.device)

        def compute(blk, payload):
            for r in _spans(a_s.shape[0], tile):
                for c in _spans(payload[0].shape[0], tile):
                    z = _mm(a_s[r[0] : r[1]], payload[0][c[0] : c[1]].T)
                    diag = diagonal.positives(blk, r, c, z.device)
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
        diagonal = _TileContext(LossOptions(), layout, ring.rank, None)
        acc = lse.dtype
        coef = grad_out.to(acc) * ring.world / layout.total  # W: see `losses` (DeepSpeed/DDP divide by W)
        grad_a = torch.zeros(a_s.shape, dtype=acc, device=a_s.device)

        def compute(blk, payload):
            ub = payload[0]
            grad_u = torch.zeros(ub.shape, dtype=acc, device=ub.device)
            for r in _spans(a_s.shape[0], tile):
                for c in _spans(ub.shape[0], tile):
                    z = _mm(a_s[r[0] : r[1]], ub[c[0] : c[1]].T)
                    diag = diagonal.positives(blk, r, c, z.device)
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


def _check_tuple(features: list[torch.Tensor], name: str) -> None:
    if len(features) < 3:
        raise ValueError(f"{name} scores three or more modalities at once, got {len(features)}")
    if any(f.ndim != 2 or f.shape != features[0].shape for f in features):
        raise ValueError(f"{name} needs (B, D) features of one shape, got {[tuple(f.shape) for f in features]}")


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
    _check_tuple(features, "Symile")
    shape = features[0].shape
    tile = resolve_tile(tile_size, features[0].device)
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


# --------------------------------------------------------------------------------------------------------------
# GRAM
# --------------------------------------------------------------------------------------------------------------


def gram_volume(gram: torch.Tensor) -> torch.Tensor:
    """sqrt(|det|) of (..., k, k) Gram matrices: the k-volume their vectors span, as GRAM defines it. The eps keeps
    the square root's gradient finite where the volume is zero (vectors that coincide)."""
    return torch.sqrt(torch.linalg.det(gram).abs() + _VOLUME_EPS)


_VOLUME_EPS = 1e-8


def _tile_logits(scale, anchor_sq, P, C):
    """z_ij = -s * the volume spanned by {anchor_i, x^1_j, ..., x^m_j}, from anchor_sq (T,) = |anchor_i|^2,
    P (m, T, T') = anchor_i . x^a_j and C (T', m, m) = x^a_j . x^b_j."""
    if P.shape[0] == 2:  # three modalities: the 3 x 3 determinant, entry by entry, without (T, T', 3, 3) tensors
        a00, a01, a02 = anchor_sq[:, None], P[0], P[1]
        a11, a12, a22 = C[None, :, 0, 0], C[None, :, 0, 1], C[None, :, 1, 1]
        det = a00 * (a11 * a22 - a12 * a12) - a01 * (a01 * a22 - a12 * a02) + a02 * (a01 * a12 - a11 * a02)
        return -scale * torch.sqrt(det.abs() + _VOLUME_EPS)
    m, T, Tc = P.shape
    rows = torch.cat([anchor_sq[:, None, None].expand(T, Tc, 1), P.permute(1, 2, 0)], 2)  # (T, T', k)
    lower = torch.cat([P.permute(1, 2, 0)[..., None], C[None].expand(T, Tc, m, m)], 3)  # (T, T', m, k)
    return -scale * gram_volume(torch.cat([rows[:, :, None], lower], 2))


class _TiledGram(torch.autograd.Function):
    """The symmetric InfoNCE numerator's log-sum-exp part, sum_i LSE_j z_ij + sum_j LSE_i z_ij, over the global
    batch, for the volume logits of `_tile_logits` (the positives' term is added outside)."""

    @staticmethod
    def forward(ctx, anchor, others, anchor_sq, cross, scale, tile: int, group):
        ring = _Ring(group)
        acc = _wide(anchor[:0]).dtype
        layout = _Layout(ring, anchor.shape[0], None, anchor.device, acc)
        m, D = others.shape[1], others.shape[2]
        row_lse = torch.full((anchor.shape[0],), float("-inf"), dtype=acc, device=anchor.device)

        def compute(blk, payload):
            xs, cc = payload
            col_lse = row_lse.new_full((xs.shape[0],), float("-inf"))
            for r in _spans(anchor.shape[0], tile):
                for c in _spans(xs.shape[0], tile):
                    P = torch.stack([_mm(anchor[r[0] : r[1]], xs[c[0] : c[1], i].T) for i in range(m)])
                    z = _tile_logits(scale, anchor_sq[r[0] : r[1]], P, cc[c[0] : c[1]])
                    torch.logaddexp(row_lse[r[0] : r[1]], torch.logsumexp(z, 1), out=row_lse[r[0] : r[1]])
                    torch.logaddexp(col_lse[c[0] : c[1]], torch.logsumexp(z, 0), out=col_lse[c[0] : c[1]])
            return col_lse

        col_lse = ring.run(
            [others, cross],
            lambda blk: [(layout.sizes[blk], m, D), (layout.sizes[blk], m, m)],
            compute,
            acc_shape=lambda blk: (layout.sizes[blk],),
            merge=lambda mine, theirs: torch.logaddexp(mine, theirs, out=mine),
            acc_dtype=acc,
        )
        local = row_lse.sum() + col_lse.sum()
        if ring.world > 1:
            dist.all_reduce(local, group=group)
        ctx.save_for_backward(anchor, others, anchor_sq, cross, scale, row_lse, col_lse)
        ctx.tile, ctx.group, ctx.layout = tile, group, layout
        return local

    @staticmethod
    def backward(ctx, grad_out):
        anchor, others, anchor_sq, cross, scale, row_lse, col_lse = ctx.saved_tensors
        ring, layout, tile = _Ring(ctx.group), ctx.layout, ctx.tile
        acc = row_lse.dtype
        m, D = others.shape[1], others.shape[2]
        coef = grad_out.to(acc) * ring.world  # W: see `losses` (DeepSpeed/DDP divide by W)
        grad_anchor = torch.zeros(anchor.shape, dtype=acc, device=anchor.device)
        grad_sq = torch.zeros(anchor_sq.shape, dtype=acc, device=anchor.device)
        grad_scale = torch.zeros((), dtype=acc, device=anchor.device)

        def compute(blk, payload):
            xs, cc, lse_c = payload
            out = torch.zeros((xs.shape[0], m * D + m * m), dtype=acc, device=xs.device)
            g_xs, g_cc = out[:, : m * D].view(-1, m, D), out[:, m * D :].view(-1, m, m)
            for r in _spans(anchor.shape[0], tile):
                for c in _spans(xs.shape[0], tile):
                    P = torch.stack([_mm(anchor[r[0] : r[1]], xs[c[0] : c[1], i].T) for i in range(m)])
                    leaves = [t.detach().requires_grad_() for t in (P, anchor_sq[r[0] : r[1]], cc[c[0] : c[1]], scale)]
                    with torch.enable_grad():  # the volume's derivatives, by autograd on the tile's few entries
                        z = _tile_logits(leaves[3], leaves[1], leaves[0], leaves[2])
                        zd = z.detach()
                        g = torch.sub(zd, row_lse[r[0] : r[1], None]).exp_()
                        g += zd.sub(lse_c[None, c[0] : c[1]]).exp_()
                        dP, dsq, dcc, ds = torch.autograd.grad(z, leaves, g)
                    grad_sq[r[0] : r[1]] += dsq
                    g_cc[c[0] : c[1]] += dcc
                    grad_scale.add_(ds)
                    for i in range(m):
                        grad_anchor[r[0] : r[1]] += _mm(dP[i].to(anchor.dtype), xs[c[0] : c[1], i])
                        g_xs[c[0] : c[1], i] += _mm(dP[i].T.to(anchor.dtype), anchor[r[0] : r[1]])
            return out

        back = ring.run(
            [others, cross, col_lse],
            lambda blk: [(layout.sizes[blk], m, D), (layout.sizes[blk], m, m), (layout.sizes[blk],)],
            compute,
            acc_shape=lambda blk: (layout.sizes[blk], m * D + m * m),
            acc_dtype=acc,
        )
        grad_others = (back[:, : m * D].reshape(others.shape) * coef).to(others.dtype)
        grad_cross = (back[:, m * D :].reshape(cross.shape) * coef).to(cross.dtype)
        return (
            (grad_anchor * coef).to(anchor.dtype),
            grad_others,
            (grad_sq * coef).to(anchor_sq.dtype),
            grad_cross,
            (grad_scale * coef).to(scale.dtype),
            None,
            None,
        )


def gram_loss(
    features: list[torch.Tensor],
    logit_scale: torch.Tensor,
    tile_size: int | None = None,
    process_group=None,
) -> torch.Tensor:
    """GRAM's contrastive loss over the global batch: the symmetric InfoNCE whose logits are -s times the volume
    spanned by the anchor (features[0]) of sample i and the other modalities of sample j (see the module docstring).

    features: k >= 3 (B, D) tensors of this rank (normalised, as GRAM uses them), the anchor first."""
    _check_tuple(features, "GRAM")
    tile = resolve_tile(tile_size, features[0].device)
    distributed = is_distributed(process_group)
    group = process_group if distributed else None
    anchor, rest = features[0], features[1:]
    others = torch.stack(rest, 1)  # (B, m, D)
    acc = _wide(anchor[:0]).dtype
    anchor_sq = _wide(anchor).square().sum(1)
    cross = torch.einsum("bid,bjd->bij", _wide(others), _wide(others))
    scale = _wide(logit_scale.reshape(()))
    lse = _TiledGram.apply(anchor, others.contiguous(), anchor_sq, cross, scale, tile, group)
    # the positives, -s vol(anchor_i, others_i), summed over the global batch (differentiably: every rank's
    # gradient is W times its share, the convention of `losses`)
    ax = torch.einsum("bd,bjd->bj", _wide(anchor), _wide(others))  # (B, m)
    top = torch.cat([anchor_sq[:, None], ax], 1)[:, None]  # (B, 1, k)
    gram = torch.cat([top, torch.cat([ax[:, :, None], cross], 2)], 1)  # (B, k, k)
    positives = (-scale * gram_volume(gram)).sum()
    total = anchor.new_tensor([anchor.shape[0]], dtype=acc)
    if distributed:
        positives = all_reduce_with_grad(positives, group=group or dist.group.WORLD)
        dist.all_reduce(total, group=group)
    return (lse - 2 * positives) / (2 * total[0])


def gram_reference(features: list[torch.Tensor], logit_scale: torch.Tensor) -> torch.Tensor:
    """GRAM's loss with whole matrices (its own code's form, a batched determinant), for tests."""
    anchor, rest = features[0], features[1:]
    n = anchor.shape[0]
    vectors = torch.stack([anchor[:, None].expand(n, n, -1), *[x[None].expand(n, n, -1) for x in rest]], 2)
    volume = torch.sqrt(torch.linalg.det(vectors @ vectors.transpose(-1, -2)).abs() + _VOLUME_EPS)
    logits = -logit_scale * volume
    labels = torch.arange(n)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


__all__ = ["gram_loss", "gram_reference", "gram_volume", "symile_loss", "symile_reference"]
