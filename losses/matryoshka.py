"""Matryoshka contrastive losses: the loss at every nested prefix of the embedding, from one pass over the tiles.

Shape legend as in `contrastive`: B local rows, G global batch, D width, T tile edge; K prefixes d_1 < ... < d_K = D.

Prefix k compares the first d_k features, each prefix renormalised as retrieval at that width would use it:
z^k_ij = s * a_i[:d_k] . b_j[:d_k] / (|a_i[:d_k]| |b_j[:d_k]|) (+ bias), and L_k is the loss `contrastive_loss`
takes of those prefix features (any of its options). The function returns the K losses; the caller weighs them.

One pass for all prefixes. With C^k = a[:, :d_k] b[:, :d_k]^T,
    C^k = C^{k-1} + a[:, d_{k-1}:d_k] b[:, d_{k-1}:d_k]^T,
so a tile's K logit matrices cost K slice GEMMs whose widths add up to D (one full-width GEMM): the engine's K
operand pairs are the slices. Then z^k = diag(r^a_k) C^k diag(r^b_k) with the row scales r^a_ik = s / |a_i[:d_k]|
and r^b_jk = 1 / |b_j[:d_k]|. With g^k = dL/dz^k:
    H^k := dL/dC^k = diag(r^a_k) g^k diag(r^b_k)     dL/d(slice m's product) = sum_{k>=m} H^k
    dL/dr^a_ik = sum_j g^k_ij C^k_ij r^b_jk            (and the same for b and r^b by symmetry)
so backward too is one full-width GEMM per operand (the engine's, one per slice), plus O(K T^2) elementwise work per
tile. The scales are computed outside with autograd, which carries their gradients on to s and to the prefix
norms. Held per tile in backward: K fp32 T x T matrices (the H^k).

Across ranks: the engine's ring. The column block travels with its scales (and, in backward, its K column
log-sum-exps); its gradient and its scales' gradient travel back as one (n, D + K) accumulator.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .contrastive import positive_weights
from .options import LossOptions, check_impl, check_inputs
from .reference import matryoshka_reference
from .ring import gather_batch, is_distributed
from .tiles import DEFAULT_GATHER_BUDGET, Plan, TiledObjective, TileEngine, resolve_tile, wide

_NORM_EPS = 1e-12  # as F.normalize


def check_dims(dims, width: int) -> tuple[int, ...]:
    """The prefix widths as a strictly increasing tuple ending at `width` (the full embedding)."""
    dims = tuple(int(d) for d in dims)
    if not dims or any(d < 1 for d in dims) or any(x >= y for x, y in zip(dims, dims[1:])) or dims[-1] != width:
        raise ValueError(f"matryoshka widths must increase strictly and end at the embedding width {width}, got {dims}")
    return dims


def _slices(dims: tuple[int, ...]) -> list[slice]:
    return [slice(lo, hi) for lo, hi in zip((0, *dims[:-1]), dims)]


def prefix_inverse_norms(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """(B, K): 1 / |x_i[:d_k]| in the loss's accumulation dtype, differentiable."""
    sq = wide(x).square()
    parts = torch.stack([sq[:, s].sum(1) for s in _slices(dims)], 1)
    return parts.cumsum(1).sqrt().clamp_min(_NORM_EPS).reciprocal()


class _Matryoshka(TiledObjective):
    """The K prefix losses on the logits z^k = diag(ra_k) C^k diag(rb_k) (+ bias).

    Payload of a column block: [b, rb] in forward; [b, rb, its (n, K) column LSEs] in InfoNCE's backward. Row state:
    row_lse (K, B); totals (K, 2) [softplus terms, linear terms]."""

    def __init__(self, opts: LossOptions, layout, a, ra, bias, slices, row_lse, totals=None):
        self.opts, self.layout, self.a, self.ra, self.slices = opts, layout, a, ra, slices
        self.bias = None if bias is None else wide(bias)
        self.row_lse, self.totals = row_lse, totals
        self.col_state_shape = (len(slices),) if opts.kind == "infonce" else None

    def start_backward(self, coef: torch.Tensor, need_bias: bool) -> None:
        acc = self.ra.dtype
        self.coef = coef
        self.grad_a = torch.zeros(self.a.shape, dtype=acc, device=self.a.device)
        self.grad_ra = torch.zeros(self.ra.shape, dtype=acc, device=self.a.device)
        self.grad_bias = torch.zeros((), dtype=acc, device=self.a.device) if need_bias else None

    def rows(self):
        return [self.a[:, s] for s in self.slices]

    def cols(self, payload):
        return [payload[0][:, s] for s in self.slices]

    def row_grads(self):
        return [self.grad_a[:, s] for s in self.slices]

    def col_grads(self, grad):  # [d(b) | d(rb)]: the slices of d(b) take the GEMMs
        return [grad[:, s] for s in self.slices]

    def _prefixes(self, tile, products):
        """(k, C^k, z^k) for each prefix, z^k a fresh tensor."""
        ra, rb = self.ra[tile.rows], tile.payload[1][tile.cols]
        C = None
        for k, part in enumerate(products):
            C = part if C is None else C.add_(part)
            z = C * ra[:, k, None] * rb[None, :, k]
            if self.bias is not None:
                z += self.bias
            yield k, C, z

    def _positives(self, tile):
        pos = self.layout.positives(tile.block, tile.r, tile.c, self.a.device)
        return pos, (None, None) if pos is None else positive_weights(self.opts, self.layout, tile, self.ra)

    def forward_tile(self, tile, products):
        o, totals, G = self.opts, self.totals, self.layout.total
        pos, (w_row, w_col) = self._positives(tile)
        for k, _, z in self._prefixes(tile, products):
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
            rows, cols = self.row_lse[k, tile.rows], tile.col_state[tile.cols, k]
            torch.logaddexp(rows, torch.logsumexp(z, 1), out=rows)
            cols.copy_(torch.logaddexp(cols, torch.logsumexp(z, 0)))

    def backward_tile(self, tile, products):
        o, G, D = self.opts, self.layout.total, self.a.shape[1]
        ra, rb = self.ra[tile.rows], tile.payload[1][tile.cols]
        pos, (w_row, w_col) = self._positives(tile)
        H = []
        for k, C, z in self._prefixes(tile, products):
            if o.kind == "siglip":
                g = z.sigmoid_()
            else:
                if o.dcl and pos is not None:
                    z.masked_fill_(pos, float("-inf"))
                g = torch.sub(z, self.row_lse[k, tile.rows, None]).exp_()
                g += z.sub_(tile.payload[2][None, tile.cols, k]).exp_()
            if pos is not None:
                g -= torch.where(pos, w_row[:, None] + w_col[None, :], 0.0)
            if o.label_smoothing:
                g -= 2 * o.label_smoothing / G
            g *= self.coef[k]
            if self.grad_bias is not None:
                self.grad_bias += g.sum()
            gc = g * C
            self.grad_ra[tile.rows, k] += gc @ rb[:, k]
            if tile.col_grad is not None:
                tile.col_grad[tile.cols, D + k] += gc.T @ ra[:, k]
            H.append(g.mul_(ra[:, k, None]).mul_(rb[None, :, k]))
        for k in range(len(H) - 2, -1, -1):  # slice m of the features enters every prefix k >= m
            H[k] += H[k + 1]
        return H


class _TiledMatryoshka(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, ra, rb, bias, labels, opts: LossOptions, dims, plan: Plan, group):
        acc = wide(a[:0]).dtype
        engine = TileEngine(group, a.shape[0], labels, a.device, acc, plan)
        layout = engine.layout
        opts.check_batch(layout.distinct)
        K, infonce = len(dims), opts.kind == "infonce"
        ra, rb = ra.to(acc), rb.to(acc)
        totals = torch.zeros(K, 2, dtype=acc, device=a.device)
        row_lse = torch.full((K, a.shape[0]), float("-inf"), dtype=acc, device=a.device) if infonce else None
        obj = _Matryoshka(opts, layout, a, ra, bias, _slices(dims), row_lse, totals)
        col_lse = engine.forward(obj, [b, rb])
        if infonce:
            local = row_lse.sum(1) + col_lse.sum(0) - totals[:, 1]
        else:
            local = totals[:, 0] - totals[:, 1]
        if engine.ring.world > 1:
            dist.all_reduce(local, group=group)
        empty = a.new_zeros(0)
        ctx.save_for_backward(
            a, b, ra, rb, empty if bias is None else bias, *((row_lse, col_lse) if infonce else (empty, empty))
        )
        ctx.opts, ctx.dims, ctx.engine = opts, dims, engine
        ctx.has_bias, ctx.norm = bias is not None, (2 if infonce else 1) * layout.total
        return local / ctx.norm

    @staticmethod
    def backward(ctx, grad_out):
        a, b, ra, rb, bias, row_lse, col_lse = ctx.saved_tensors
        engine, K, D = ctx.engine, len(ctx.dims), a.shape[1]
        infonce, need_b = ctx.opts.kind == "infonce", ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        bias = bias if ctx.has_bias else None
        obj = _Matryoshka(ctx.opts, engine.layout, a, ra, bias, _slices(ctx.dims), row_lse)
        obj.start_backward(grad_out.to(ra.dtype) / ctx.norm, ctx.has_bias)  # (K,), on the device: no host sync
        payload = [b, rb, col_lse] if infonce else [b, rb]
        grad_brb = engine.backward(obj, payload, (D + K,) if need_b else None)
        W = engine.ring.world  # the gradient convention of `contrastive`: DeepSpeed/DDP divide by W
        grad_a, grad_ra = obj.grad_a * W, obj.grad_ra * W
        grad_b = grad_rb = grad_bias = None
        if need_b:
            grad_b, grad_rb = (grad_brb[:, :D] * W).to(b.dtype), grad_brb[:, D:] * W
        if bias is not None:
            grad_bias = (obj.grad_bias * W).reshape(bias.shape).to(bias.dtype)
        return grad_a.to(a.dtype), grad_b, grad_ra, grad_rb, grad_bias, *(None,) * 5


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
    uniform_batches: bool = False,
    gather_budget: int | None = DEFAULT_GATHER_BUDGET,
) -> torch.Tensor:
    """(K,) contrastive losses of the global batch at the prefix widths `dims` (increasing, the last one the full
    width D), each prefix renormalised; the arguments are `contrastive_loss`'s. impl="full" computes each prefix
    on its own with the full-matrix reference."""
    opts = LossOptions(kind, dcl, float(label_smoothing))
    opts.check(logit_bias is not None, labels is not None)
    labels = check_inputs(a, b, labels)
    dims = check_dims(dims, a.shape[1])
    check_impl(impl)
    if impl == "full":
        a, b, labels = gather_batch(a, b, labels, process_group)
        bias = None if logit_bias is None else logit_bias.squeeze()
        options = dict(kind=kind, labels=labels, dcl=dcl, label_smoothing=label_smoothing)
        return matryoshka_reference(a, b, logit_scale.squeeze(), bias, dims, **options)
    tile_size = resolve_tile(tile_size, a.device)
    ra = prefix_inverse_norms(a, dims) * wide(logit_scale.reshape(()))
    rb = prefix_inverse_norms(b, dims)
    bias = None if logit_bias is None else logit_bias.reshape(())
    group = process_group if is_distributed(process_group) else None
    a, b = a.contiguous(), b.contiguous()
    plan = Plan(tile_size, uniform_batches, gather_budget)
    return _TiledMatryoshka.apply(a, b, ra, rb, bias, labels, opts, dims, plan, group)
