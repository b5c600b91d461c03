"""Objectives over samples that carry three or more modalities at once.

Symile (Saporta et al., NeurIPS 2024) scores a tuple by the multilinear inner product MIP(x, y, z) = sum_d x_d y_d z_d
of its modalities' normalised embeddings. Each modality in turn is the anchor; its loss is a one-way cross-entropy
in which row i holds the positive MIP(x_i, y_i, z_i) and the negatives MIP(x_i, y_pi(j), z_sigma(j)) for j != i,
with y and z shuffled independently: O(N) negatives per positive whose non-anchor parts are mixed, so that the
score learns the joint, not only pairs. The loss is the mean over the anchors.

Tiled: with u_j = y_pi(j) * z_sigma(j) (elementwise), the negatives are the logits s * x @ u^T off the diagonal and
the positives are s * MIP(x_i, y_i, z_i), one per row. The engine walks the tiles of x against u (round the ring):
forward keeps the row log-sum-exps over the off-diagonal tiles, backward recomputes each tile once. Across ranks
each rank shuffles its own rows, so the negatives of a row come from every rank's mixed products.

GRAM (Cicchetti et al., ICLR 2025) scores an anchor (the tuple's first modality) against the rest of a sample by the
volume of the parallelotope their normalised embeddings span, sqrt|det G| of their k x k Gram matrix: small when
all k point the same way. Its loss is the symmetric InfoNCE over the logits z_ij = -s * volume(anchor_i, rest_j).
A tile's Gram entries are the engine's k - 1 GEMMs of the anchor rows against the column block's other modalities,
the anchor rows' squared norms, and the column samples' own k - 1 x k - 1 Gram matrices (which travel with the
block); the volume is elementwise on them (a closed-form 3 x 3 determinant for three modalities, a batched one
beyond), and backward takes its derivatives by autograd on the tile's entries, then hands them to the engine's
GEMMs. Memory per tile: O(k^2 T^2) beyond three modalities (the batched Gram matrices), O(k T^2) for three.

Both follow the gradient convention of `contrastive`: every rank returns the global loss; its gradients are W times
its share.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce as all_reduce_with_grad

from .reference import VOLUME_EPS, gram_volume
from .ring import is_distributed
from .tiles import DEFAULT_GATHER_BUDGET, Plan, TiledObjective, TileEngine, resolve_tile, wide


class _OffDiagonal(TiledObjective):
    """Symile's negatives: the row log-sum-exps of a_s @ u^T over the global batch, its diagonal left out."""

    def __init__(self, layout, a_s, lse, grad_a=None):
        self.layout, self.a_s, self.lse, self.grad_a = layout, a_s, lse, grad_a

    def rows(self):
        return [self.a_s]

    def cols(self, payload):
        return [payload[0]]

    def row_grads(self):
        return [self.grad_a]

    def col_grads(self, grad):
        return [grad]

    def _logits(self, tile, products):
        z = next(products)
        diagonal = self.layout.positives(tile.block, tile.r, tile.c, z.device)
        return z if diagonal is None else z.masked_fill_(diagonal, float("-inf"))

    def forward_tile(self, tile, products):
        rows = self.lse[tile.rows]
        torch.logaddexp(rows, torch.logsumexp(self._logits(tile, products), 1), out=rows)

    def backward_tile(self, tile, products):
        return [self._logits(tile, products).sub_(self.lse[tile.rows, None]).exp_()]


class _OneWayWithPositives(torch.autograd.Function):
    """L = 1/G sum_i [logaddexp(LSE_{j != i} a_s_i . u_j, p_i) - p_i] over the global batch, tiled."""

    @staticmethod
    def forward(ctx, a_s, u, p, tile: Plan, group):
        acc = wide(a_s[:0]).dtype
        engine = TileEngine(group, a_s.shape[0], None, a_s.device, acc, tile)
        lse = torch.full((a_s.shape[0],), float("-inf"), dtype=acc, device=a_s.device)
        engine.forward(_OffDiagonal(engine.layout, a_s, lse), [u])
        torch.logaddexp(lse, wide(p), out=lse)
        local = (lse - wide(p)).sum()
        if engine.ring.world > 1:
            dist.all_reduce(local, group=group)
        ctx.save_for_backward(a_s, u, p, lse)
        ctx.engine = engine
        return local / engine.layout.total

    @staticmethod
    def backward(ctx, grad_out):
        a_s, u, p, lse = ctx.saved_tensors
        engine = ctx.engine
        coef = grad_out.to(lse.dtype) * engine.ring.world / engine.layout.total  # W: the convention of `contrastive`
        obj = _OffDiagonal(engine.layout, a_s, lse, torch.zeros(a_s.shape, dtype=lse.dtype, device=a_s.device))
        grad_u = engine.backward(obj, [u], (u.shape[1],))
        grad_p = (torch.exp(wide(p) - lse) - 1) * coef
        return (obj.grad_a * coef).to(a_s.dtype), (grad_u * coef).to(u.dtype), grad_p.to(p.dtype), None, None


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
    gather_budget: int | None = DEFAULT_GATHER_BUDGET,
) -> torch.Tensor:
    """Symile's loss with O(N) negatives over the global batch: the mean over anchors of the one-way cross-entropy
    of the positive MIP against MIPs with independently shuffled non-anchor rows (see the module docstring).

    features: k >= 3 (B, D) tensors of this rank, one per modality, row i of each from sample i (normalised, as
    Symile uses them). logit_scale: the multiplier. generator: the source of the shuffles (on the features'
    device); the shuffles stay within a rank. gather_budget: as `contrastive_loss`'s."""
    _check_tuple(features, "Symile")
    tile = Plan(resolve_tile(tile_size, features[0].device), gather_budget=gather_budget)
    group = process_group if is_distributed(process_group) else None
    scale = wide(logit_scale.reshape(()))
    n = features[0].shape[0]
    losses = []
    for anchor, x in enumerate(features):
        others = [f for i, f in enumerate(features) if i != anchor]
        mixed = functools.reduce(
            torch.mul, [f[torch.randperm(n, generator=generator, device=f.device)] for f in others]
        )
        positive = (x * functools.reduce(torch.mul, others)).sum(1)
        a_s = (wide(x) * scale).to(x.dtype)
        losses.append(_OneWayWithPositives.apply(a_s, mixed.contiguous(), wide(positive) * scale, tile, group))
    return torch.stack(losses).mean()


def _tile_logits(scale, anchor_sq, P, C):
    """z_ij = -s * the volume spanned by {anchor_i, x^1_j, ..., x^m_j}, from anchor_sq (T,) = |anchor_i|^2,
    P (m, T, T') = anchor_i . x^a_j and C (T', m, m) = x^a_j . x^b_j."""
    if P.shape[0] == 2:  # three modalities: the 3 x 3 determinant, entry by entry, without (T, T', 3, 3) tensors
        a00, a01, a02 = anchor_sq[:, None], P[0], P[1]
        a11, a12, a22 = C[None, :, 0, 0], C[None, :, 0, 1], C[None, :, 1, 1]
        det = a00 * (a11 * a22 - a12 * a12) - a01 * (a01 * a22 - a12 * a02) + a02 * (a01 * a12 - a11 * a02)
        return -scale * torch.sqrt(det.abs() + VOLUME_EPS)
    m, T, Tc = P.shape
    rows = torch.cat([anchor_sq[:, None, None].expand(T, Tc, 1), P.permute(1, 2, 0)], 2)  # (T, T', k)
    lower = torch.cat([P.permute(1, 2, 0)[..., None], C[None].expand(T, Tc, m, m)], 3)  # (T, T', m, k)
    return -scale * gram_volume(torch.cat([rows[:, :, None], lower], 2))


class _Gram(TiledObjective):
    """GRAM's volume logits. Payload of a column block: [others (n, m, D), their Gram matrices (n, m, m)], and in
    backward their column LSEs (n,). A block's gradient accumulator: [d(others) | d(Gram matrices)], (n, mD + m^2)."""

    col_state_shape = ()

    def __init__(self, anchor, anchor_sq, scale, row_lse, m: int):
        self.anchor, self.anchor_sq, self.scale, self.row_lse, self.m = anchor, anchor_sq, scale, row_lse, m

    def start_backward(self) -> None:
        acc = self.row_lse.dtype
        self.grad_anchor = torch.zeros(self.anchor.shape, dtype=acc, device=self.anchor.device)
        self.grad_sq = torch.zeros(self.anchor_sq.shape, dtype=acc, device=self.anchor.device)
        self.grad_scale = torch.zeros((), dtype=acc, device=self.anchor.device)

    def rows(self):
        return [self.anchor] * self.m

    def cols(self, payload):
        return list(payload[0].unbind(1))

    def row_grads(self):
        return [self.grad_anchor] * self.m

    def col_grads(self, grad):
        D = self.anchor.shape[1]
        return list(grad[:, : self.m * D].view(-1, self.m, D).unbind(1))

    def forward_tile(self, tile, products):
        z = _tile_logits(self.scale, self.anchor_sq[tile.rows], torch.stack(list(products)), tile.payload[1][tile.cols])
        rows, cols = self.row_lse[tile.rows], tile.col_state[tile.cols]
        torch.logaddexp(rows, torch.logsumexp(z, 1), out=rows)
        torch.logaddexp(cols, torch.logsumexp(z, 0), out=cols)

    def backward_tile(self, tile, products):
        P = torch.stack(list(products))
        leaves = [t.detach().requires_grad_() for t in (P, self.anchor_sq[tile.rows], tile.payload[1][tile.cols])]
        scale = self.scale.detach().requires_grad_()
        with torch.enable_grad():  # the volume's derivatives, by autograd on the tile's few entries
            z = _tile_logits(scale, leaves[1], leaves[0], leaves[2])
            zd = z.detach()
            g = torch.sub(zd, self.row_lse[tile.rows, None]).exp_()
            g += zd.sub(tile.payload[2][None, tile.cols]).exp_()
            dP, dsq, dcc, ds = torch.autograd.grad(z, [*leaves, scale], g)
        self.grad_sq[tile.rows] += dsq
        self.grad_scale.add_(ds)
        m, D = self.m, self.anchor.shape[1]
        tile.col_grad[tile.cols, m * D :] += dcc.reshape(dcc.shape[0], -1)
        return list(dP)


class _TiledGram(torch.autograd.Function):
    """The symmetric InfoNCE numerator's log-sum-exp part, sum_i LSE_j z_ij + sum_j LSE_i z_ij, over the global
    batch, for the volume logits of `_tile_logits` (the positives' term is added outside)."""

    @staticmethod
    def forward(ctx, anchor, others, anchor_sq, cross, scale, tile: Plan, group):
        acc = wide(anchor[:0]).dtype
        engine = TileEngine(group, anchor.shape[0], None, anchor.device, acc, tile)
        row_lse = torch.full((anchor.shape[0],), float("-inf"), dtype=acc, device=anchor.device)
        obj = _Gram(anchor, anchor_sq, scale, row_lse, others.shape[1])
        col_lse = engine.forward(obj, [others, cross])
        local = row_lse.sum() + col_lse.sum()
        if engine.ring.world > 1:
            dist.all_reduce(local, group=group)
        ctx.save_for_backward(anchor, others, anchor_sq, cross, scale, row_lse, col_lse)
        ctx.engine = engine
        return local

    @staticmethod
    def backward(ctx, grad_out):
        anchor, others, anchor_sq, cross, scale, row_lse, col_lse = ctx.saved_tensors
        engine = ctx.engine
        m, D = others.shape[1], others.shape[2]
        coef = grad_out.to(row_lse.dtype) * engine.ring.world  # W: the convention of `contrastive`
        obj = _Gram(anchor, anchor_sq, scale, row_lse, m)
        obj.start_backward()
        back = engine.backward(obj, [others, cross, col_lse], (m * D + m * m,))
        return (
            (obj.grad_anchor * coef).to(anchor.dtype),
            (back[:, : m * D].reshape(others.shape) * coef).to(others.dtype),
            (obj.grad_sq * coef).to(anchor_sq.dtype),
            (back[:, m * D :].reshape(cross.shape) * coef).to(cross.dtype),
            (obj.grad_scale * coef).to(scale.dtype),
            None,
            None,
        )


def gram_loss(
    features: list[torch.Tensor],
    logit_scale: torch.Tensor,
    tile_size: int | None = None,
    process_group=None,
    gather_budget: int | None = DEFAULT_GATHER_BUDGET,
) -> torch.Tensor:
    """GRAM's contrastive loss over the global batch: the symmetric InfoNCE whose logits are -s times the volume
    spanned by the anchor (features[0]) of sample i and the other modalities of sample j (see the module docstring).

    features: k >= 3 (B, D) tensors of this rank (normalised, as GRAM uses them), the anchor first. gather_budget:
    as `contrastive_loss`'s."""
    _check_tuple(features, "GRAM")
    tile = Plan(resolve_tile(tile_size, features[0].device), gather_budget=gather_budget)
    distributed = is_distributed(process_group)
    group = process_group if distributed else None
    anchor, rest = features[0], features[1:]
    others = torch.stack(rest, 1)  # (B, m, D)
    acc = wide(anchor[:0]).dtype
    anchor_sq = wide(anchor).square().sum(1)
    cross = torch.einsum("bid,bjd->bij", wide(others), wide(others))
    scale = wide(logit_scale.reshape(()))
    lse = _TiledGram.apply(anchor, others.contiguous(), anchor_sq, cross, scale, tile, group)
    # the positives, -s vol(anchor_i, others_i), summed over the global batch (differentiably: every rank's
    # gradient is W times its share, the convention of `contrastive`)
    ax = torch.einsum("bd,bjd->bj", wide(anchor), wide(others))  # (B, m)
    top = torch.cat([anchor_sq[:, None], ax], 1)[:, None]  # (B, 1, k)
    gram = torch.cat([top, torch.cat([ax[:, :, None], cross], 2)], 1)  # (B, k, k)
    positives = (-scale * gram_volume(gram)).sum()
    total = torch.full((1,), anchor.shape[0], dtype=acc, device=anchor.device)  # a fill, not a host-to-device copy
    if distributed:
        positives = all_reduce_with_grad(positives, group=group or dist.group.WORLD)
        dist.all_reduce(total, group=group)
    return (lse - 2 * positives) / (2 * total[0])
