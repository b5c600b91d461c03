"""Matryoshka contrastive losses: the loss at every nested prefix of the embedding, from one pass over the tiles.

Shape legend as in `losses`: B local rows, G global batch, D width, T tile edge; K prefixes d_1 < ... < d_K = D.

Prefix k compares the first d_k features, each prefix renormalised as retrieval at that width would use it:
z^k_ij = s * a_i[:d_k] . b_j[:d_k] / (|a_i[:d_k]| |b_j[:d_k]|) (+ bias), and L_k is the loss `contrastive_loss`
takes of those prefix features (any of its options). The function returns the K losses; the caller weighs them.

One pass for all prefixes. With C^k = a[:, :d_k] b[:, :d_k]^T,
    C^k = C^{k-1} + a[:, d_{k-1}:d_k] b[:, d_{k-1}:d_k]^T,
so a tile's K logit matrices cost K slice GEMMs whose widths add up to D (one full-width GEMM), and then
z^k = diag(r^a_k) C^k diag(r^b_k) with the row scales r^a_ik = s / |a_i[:d_k]| and r^b_jk = 1 / |b_j[:d_k]|.
Backward recomputes C^k the same way. With g^k = dL/dz^k:
    H^k := dL/dC^k = diag(r^a_k) g^k diag(r^b_k)     dL/da[:, d_{m-1}:d_m] = (sum_{k>=m} H^k) b[:, d_{m-1}:d_m]
    dL/dr^a_ik = sum_j g^k_ij C^k_ij r^b_jk            (and the same for b and r^b by symmetry)
so backward too is one full-width GEMM per operand (a suffix sum of the H^k, then one GEMM per slice), plus O(K T^2)
elementwise work per tile. The scales are computed outside with autograd, which carries their gradients on to
s and to the prefix norms. Held per tile in backward: K fp32 T x T matrices (the H^k).

Across ranks: the ring of `losses`. The column block travels with its scales (and, in backward, its K column
log-sum-exps); its gradient and its scales' gradient travel back as one (B, D + K) accumulator. The gradient
convention is `losses`': every rank returns the global losses, and its gradients are W times its share.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tessera.models import truncate_embeddings

from .losses import (
    LossOptions,
    _Layout,
    _mm,
    _Ring,
    _spans,
    _TileContext,
    _wide,
    check_inputs,
    contrastive_loss,
    is_distributed,
    resolve_tile,
)

_NORM_EPS = 1e-12  # as F.normalize


def check_dims(dims, width: int) -> tuple[int, ...]:
    """The prefix widths as a strictly increasing tuple ending at `width` (the full embedding)."""
    dims = tuple(int(d) for d in dims)
    if not dims or any(d < 1 for d in dims) or any(x >= y for x, y in zip(dims, dims[1:])) or dims[-1] != width:
        raise ValueError(f"matryoshka widths must increase strictly and end at the embedding width {width}, got {dims}")
    return dims


def _slices(dims: tuple[int, ...]) -> list[tuple[int, int]]:
    return list(zip((0, *dims[:-1]), dims))


def prefix_inverse_norms(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """(B, K): 1 / |x_i[:d_k]| in the loss's accumulation dtype, differentiable."""
    sq = _wide(x).square()
    parts = torch.stack([sq[:, lo:hi].sum(1) for lo, hi in _slices(dims)], 1)
    return parts.cumsum(1).sqrt().clamp_min(_NORM_EPS).reciprocal()


def _prefix_logits(tc, C, ra, rb, k):
    z = C * ra[:, k, None] * rb[None, :, k]
    if tc.bias is not None:
        z += tc.bias
    return z


def _forward_tiles(tc, a, ra, b, rb, col_block, slices, tile, row_lse, totals):
    """One column block against this rank's rows: updates row_lse (K, B) and totals (K, 2) [softplus terms,
    linear terms] in place, returns the block's column LSEs (K, n) (InfoNCE)."""
    o, K, G = tc.opts, len(slices), tc.layout.total
    col_lse = None if row_lse is None else row_lse.new_full((K, b.shape[0]), float("-inf"))
    for r in _spans(a.shape[0], tile):
        for c in _spans(b.shape[0], tile):
            pos = tc.positives(col_block, r, c, a.device)
            w_row, w_col = (None, None) if pos is None else tc.positive_weights(col_block, r, c, totals)
            C = None
            for k, (lo, hi) in enumerate(slices):
                part = _mm(a[r[0] : r[1], lo:hi], b[c[0] : c[1], lo:hi].T)
                C = part if C is None else C.add_(part)
                z = _prefix_logits(tc, C, ra[r[0] : r[1]], rb[c[0] : c[1]], k)
                if pos is not None:
                    zp = torch.where(pos, z, 0.0)
                    totals[k, 1] += zp.sum(1) @ w_row + zp.sum(0) @ w_col
                if o.label_smoothing:  # the target's uniform share, in both directions
                    totals[k, 1] += 2 * o.label_smoothing / G * z.sum()
                if o.kind == "siglip":
                    totals[k, 0] -= F.logsigmoid(-z).sum()
                    continue
                if o.dcl and pos is not None:
                    z.masked_fill_(pos, float("-inf"))
                rows, cols = row_lse[:, r[0] : r[1]], col_lse[:, c[0] : c[1]]
                torch.logaddexp(rows[k], torch.logsumexp(z, 1), out=rows[k])
                torch.logaddexp(cols[k], torch.logsumexp(z, 0), out=cols[k])
    return col_lse


def _backward_tiles(tc, a, ra, b, rb, col_lse, col_block, slices, tile, row_lse, coef, grads, need_b):
    """Recompute each tile's K prefix logits; add to d(a), d(ra) and d(bias) in `grads` (in place) and return the
    block's [d(b) | d(rb)] (n, D + K)."""
    o, K, G, D = tc.opts, len(slices), tc.layout.total, a.shape[1]
    grad_a, grad_ra, grad_bias = grads
    grad_b = grad_a.new_zeros((b.shape[0], D + K)) if need_b else None
    low = a.dtype not in (torch.float32, torch.float64)
    for r in _spans(a.shape[0], tile):
        ra_t = ra[r[0] : r[1]]
        for c in _spans(b.shape[0], tile):
            rb_t = rb[c[0] : c[1]]
            pos = tc.positives(col_block, r, c, a.device)
            w_row, w_col = (None, None) if pos is None else tc.positive_weights(col_block, r, c, grad_a)
            C, H = None, []
            for k, (lo, hi) in enumerate(slices):
                part = _mm(a[r[0] : r[1], lo:hi], b[c[0] : c[1], lo:hi].T)
                C = part if C is None else C.add_(part)
                z = _prefix_logits(tc, C, ra_t, rb_t, k)
                if o.kind == "siglip":
                    g = z.sigmoid_()
                else:
                    if o.dcl and pos is not None:
                        z.masked_fill_(pos, float("-inf"))
                    g = torch.sub(z, row_lse[k, r[0] : r[1], None]).exp_()
                    g += z.sub_(col_lse[k, None, c[0] : c[1]]).exp_()
                if pos is not None:
                    g -= torch.where(pos, w_row[:, None] + w_col[None, :], 0.0)
                if o.label_smoothing:
                    g -= 2 * o.label_smoothing / G
                g *= coef[k]
                if grad_bias is not None:
                    grad_bias += g.sum()
                gc = g * C
                grad_ra[r[0] : r[1], k] += gc @ rb_t[:, k]
                if need_b:
                    grad_b[c[0] : c[1], D + k] += gc.T @ ra_t[:, k]
                H.append(g.mul_(ra_t[:, k, None]).mul_(rb_t[None, :, k]))
            for k in range(K - 2, -1, -1):  # slice m of the features enters every prefix k >= m
                H[k] += H[k + 1]
            for h, (lo, hi) in zip(H, slices):
                if low:
                    h = h.to(a.dtype)
                    grad_a[r[0] : r[1], lo:hi] += _mm(h, b[c[0] : c[1], lo:hi])
                    if need_b:
                        grad_b[c[0] : c[1], lo:hi] += _mm(h.T, a[r[0] : r[1], lo:hi])
                else:
                    grad_a[r[0] : r[1], lo:hi].addmm_(h, b[c[0] : c[1], lo:hi])
                    if need_b:
                        grad_b[c[0] : c[1], lo:hi].addmm_(h.T, a[r[0] : r[1], lo:hi])
    return grad_b


class _TiledMatryoshka(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, ra, rb, bias, labels, opts: LossOptions, dims, tile: int, group):
        ring = _Ring(group)
        acc = _wide(a[:0]).dtype
        layout = _Layout(ring, a.shape[0], labels, a.device, acc)
        if opts.dcl and layout.distinct < 2:
            raise ValueError("dcl=True needs at least one negative for every sample: this batch has none")
        tc = _TileContext(opts, layout, ring.rank, bias)
        slices, K, D = _slices(dims), len(dims), a.shape[1]
        ra, rb = ra.to(acc), rb.to(acc)
        infonce = opts.kind == "infonce"
        totals = torch.zeros(K, 2, dtype=acc, device=a.device)
        row_lse = torch.full((K, a.shape[0]), float("-inf"), dtype=acc, device=a.device) if infonce else None
        col_lse = ring.run(
            [b, rb],
            lambda blk: [(layout.sizes[blk], D), (layout.sizes[blk], K)],
            lambda blk, p: _forward_tiles(tc, a, ra, p[0], p[1], blk, slices, tile, row_lse, totals),
            acc_shape=(lambda blk: (K, layout.sizes[blk])) if infonce else None,
            merge=lambda mine, theirs: torch.logaddexp(mine, theirs, out=mine),
            acc_dtype=acc,
        )
        if infonce:
            local = row_lse.sum(1) + col_lse.sum(1) - totals[:, 1]
        else:
            local = totals[:, 0] - totals[:, 1]
        if ring.world > 1:
            dist.all_reduce(local, group=group)
        empty = a.new_zeros(0)
        ctx.save_for_backward(
            a, b, ra, rb, empty if bias is None else bias, *((row_lse, col_lse) if infonce else (empty, empty))
        )
        ctx.opts, ctx.dims, ctx.tile, ctx.group, ctx.layout = opts, dims, tile, group, layout
        ctx.has_bias, ctx.norm = bias is not None, (2 if infonce else 1) * layout.total
        return local / ctx.norm

    @staticmethod
    def backward(ctx, grad_out):
        a, b, ra, rb, bias, row_lse, col_lse = ctx.saved_tensors
        opts, layout, ring = ctx.opts, ctx.layout, _Ring(ctx.group)
        slices, K, D = _slices(ctx.dims), len(ctx.dims), a.shape[1]
        infonce, need_b = opts.kind == "infonce", ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        tc = _TileContext(opts, layout, ring.rank, bias if ctx.has_bias else None)
        acc = ra.dtype
        coef = grad_out.to(acc) / ctx.norm  # (K,), on the device: no host sync
        grads = (
            torch.zeros(a.shape, dtype=acc, device=a.device),
            torch.zeros(ra.shape, dtype=acc, device=a.device),
            torch.zeros((), dtype=acc, device=a.device) if ctx.has_bias else None,
        )

        def compute(blk, p):
            lse = p[2] if infonce else None
            return _backward_tiles(tc, a, ra, p[0], p[1], lse, blk, slices, ctx.tile, row_lse, coef, grads, need_b)

        grad_brb = ring.run(
            [b, rb] + ([col_lse] if infonce else []),
            lambda blk: [(layout.sizes[blk], D), (layout.sizes[blk], K), (K, layout.sizes[blk])][: 3 if infonce else 2],
            compute,
            acc_shape=(lambda blk: (layout.sizes[blk], D + K)) if need_b else None,
            acc_dtype=acc,
        )
        W = ring.world  # see the module docstring of `losses`: DeepSpeed/DDP divide by W
        grad_a, grad_ra, grad_bias = (None if g is None else g * W for g in grads)
        grad_b = grad_rb = None
        if need_b:
            grad_b, grad_rb = (grad_brb[:, :D] * W).to(b.dtype), grad_brb[:, D:] * W
        if grad_bias is not None:
            grad_bias = grad_bias.reshape(bias.shape).to(bias.dtype)
        return grad_a.to(a.dtype), grad_b, grad_ra, grad_rb, grad_bias, None, None, None, None, None


def matryoshka_losses(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias=None,
    dims=(),
    kind: str = "infonce",
    tile_size: int | None = None,
    process_group=None,
    labels: torch.Tensor | None = None,
    dcl: bool = False,
    label_smoothing: float = 0.0,
    impl: str = "tiled",
) -> torch.Tensor:
    """(K,) contrastive losses of the global batch at the prefix widths `dims` (increasing, the last one the full
    width D), each prefix renormalised; the arguments are `contrastive_loss`'s. impl="full" computes each prefix
    on its own with the full-matrix reference."""
    opts = LossOptions(kind, dcl, float(label_smoothing))
    opts.check(logit_bias is not None, labels is not None)
    labels = check_inputs(a, b, labels)
    dims = check_dims(dims, a.shape[1])
    if impl == "full":
        kw = dict(kind=kind, process_group=process_group, labels=labels, dcl=dcl, label_smoothing=label_smoothing)
        cut = truncate_embeddings
        return torch.stack(
            [contrastive_loss(cut(a, d), cut(b, d), logit_scale, logit_bias, impl="full", **kw) for d in dims]
        )
    if impl != "tiled":
        raise ValueError(f"impl must be 'tiled' or 'full', got '{impl}'")
    tile_size = resolve_tile(tile_size, a.device)
    ra = prefix_inverse_norms(a, dims) * _wide(logit_scale.reshape(()))
    rb = prefix_inverse_norms(b, dims)
    bias = None if logit_bias is None else logit_bias.reshape(())
    group = process_group if is_distributed(process_group) else None
    return _TiledMatryoshka.apply(a.contiguous(), b.contiguous(), ra, rb, bias, labels, opts, dims, tile_size, group)


__all__ = ["matryoshka_losses", "check_dims", "prefix_inverse_norms"]
