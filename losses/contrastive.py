"""Contrastive losses over the global batch: tiled, exact, with memory linear in the batch.

Shape legend: B local batch (rows a rank owns), G global batch (sum of B over ranks), D embedding width,
T tile edge. `a` holds one modality's features, `b` the other's; row i of `a` is paired with row i of `b`.

Two losses, both over every (a_i, b_j) of the global batch, with logits z_ij = s * a_i . b_j (+ bias):
- InfoNCE (CLIP), symmetric: L = 1/(2G) [sum_i (LSE_j z_ij - z_ii) + sum_j (LSE_i z_ij - z_jj)], with the
  options DCL (positives left out of the log-sum-exp), multi-positive labels (SupCon's L_out: samples sharing a
  label are positives for each other, the target is spread evenly over them) and label smoothing.
- SigLIP: L = -1/G sum_ij log sigmoid(y_ij z_ij), y_ij = +1 for positives and -1 otherwise.

The tiles are walked by the engine (`tiles`). Forward visits each T x T tile once and keeps, for InfoNCE, the
row and the column log-sum-exps of the same tile (fp32, whatever the features' dtype); it saves only the
features and those two vectors. Backward recomputes every tile once and gets d(a), d(b), d(scale), d(bias) in
that one pass: 1 GEMM forward and 3 backward, 8 G^2 D FLOPs in all (Inf-CL's two one-way passes: about 20).
SigLIP on one process needs no global statistic first, so its forward takes the loss and the gradients from the
same tiles (6 G^2 D, as open_clip's full-matrix SigLipLoss) and backward only scales them.

Across ranks the features stay where they are. Column blocks (b, and in backward their column LSEs) travel
round a ring with P2P send/recv, overlapped with the tiles being computed (`ring`).

Gradient convention, as open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)` and `SigLipLoss`: every
rank returns the same value, the loss of the global batch. Its backward gives a rank's features W times the
global loss's gradient with respect to them, and scale/bias the rank's share of theirs times W, so that once
DeepSpeed/DDP average gradients over the W ranks, every parameter holds the single-process gradient of the
global loss. (Inf-CL's released code sums the temperature's gradient instead and gets it W times too large.)
Every objective of this package follows it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .options import LossOptions, check_impl, check_inputs, fused_kernel
from .reference import contrastive_loss_reference
from .ring import Layout, gather_batch, is_distributed
from .tiles import (
    DEFAULT_GATHER_BUDGET,
    Plan,
    ScaledRows,
    Tile,
    TiledObjective,
    TileEngine,
    finish_gradients,
    resolve_tile,
    upstream_coefficients,
    wide,
)


def positive_weights(opts: LossOptions, layout: Layout, tile: Tile, like: torch.Tensor) -> tuple:
    """The loss's numerator holds -(w_row[i] + w_col[j]) z_ij for each positive pair of the tile (with labels, or on
    the diagonal without them: every sample is then its label's only member). `like`: the dtype and device."""
    n_rows, n_cols = tile.r[1] - tile.r[0], tile.c[1] - tile.c[0]
    if opts.kind == "siglip":
        return like.new_ones(n_rows), like.new_zeros(n_cols)
    k = 1 - opts.label_smoothing
    if layout.labels is None:
        return like.new_full((n_rows,), k), like.new_full((n_cols,), k)
    counts = layout.counts
    return k / counts[layout.rows(layout.rank, tile.r)], k / counts[layout.rows(tile.block, tile.c)]


class _Contrastive(ScaledRows, TiledObjective):
    """InfoNCE or SigLIP with their options, on the logits z = a_s @ b^T (+ bias), a_s = s * a.

    Payload of a column block: [b] in forward; [b, its column LSEs] in InfoNCE's backward. `totals` holds [the
    softplus terms (SigLIP), the weighted positive logits (labels)]."""

    def __init__(self, opts: LossOptions, layout: Layout, a_s, bias, row_lse=None, totals=None, fused=False):
        self.opts, self.layout, self.a_s, self.row_lse, self.totals = opts, layout, a_s, row_lse, totals
        self.bias = None if bias is None else wide(bias)
        self.col_state_shape = () if opts.kind == "infonce" else None
        self.masked = opts.dcl or layout.labels is not None  # tiles need their positives' mask
        self.coef = self.grad_as = self.grad_bias = None
        self.fused = fused
        if fused:
            import tessera.losses.kernels as kernels

            self.kernels = kernels
            self.kind = kernels.INFONCE if opts.kind == "infonce" else kernels.SIGLIP
            self.tf32 = torch.get_float32_matmul_precision() != "highest"

    def rows(self):
        return [self.a_s]

    def cols(self, payload):
        return [payload[0]]

    def row_grads(self):
        return [self.grad_as]

    def col_grads(self, grad):
        return [grad]

    def _positives(self, tile: Tile, z: torch.Tensor) -> torch.Tensor | None:
        return self.layout.positives(tile.block, tile.r, tile.c, z.device) if self.masked else None

    def forward_tile(self, tile, products):
        o, totals, labelled = self.opts, self.totals, self.layout.labels is not None
        z = next(products)
        pos = self._positives(tile, z)
        if labelled:
            w_row, w_col = positive_weights(o, self.layout, tile, totals)
            zp = torch.where(pos, z, 0.0)
            totals[1] += (zp.sum(1) @ w_row) + (zp.sum(0) @ w_col)
        if o.kind == "siglip":
            z += self.bias
            totals[0] -= F.logsigmoid(-z).sum()
            if labelled:
                totals[1] += pos.sum() * self.bias  # positives' bias: -log sig(z) = -log sig(-z) - z
            return
        if o.dcl and pos is not None:
            z.masked_fill_(pos, float("-inf"))
        rows, cols = self.row_lse[tile.rows], tile.col_state[tile.cols]
        torch.logaddexp(rows, torch.logsumexp(z, 1), out=rows)
        torch.logaddexp(cols, torch.logsumexp(z, 0), out=cols)

    def backward_tile(self, tile, products):
        o, coef = self.opts, self.coef
        z = next(products)
        pos = self._positives(tile, z)
        if o.kind == "siglip":
            z.add_(self.bias)
            if self.totals is not None:
                self.totals[0] -= F.logsigmoid(-z).sum()
                if pos is not None:
                    self.totals[1] += torch.where(pos, z, 0.0).sum()
            g = z.sigmoid_().mul_(coef)
        else:
            if o.dcl and pos is not None:
                z.masked_fill_(pos, float("-inf"))
            g = torch.sub(z, self.row_lse[tile.rows, None]).exp_()
            g += z.sub_(tile.payload[1][None, tile.cols]).exp_()
            g *= coef
        if self.layout.labels is not None:
            w_row, w_col = positive_weights(o, self.layout, tile, self.grad_as)
            g -= torch.where(pos, w_row[:, None] + w_col[None, :], 0.0).mul_(coef)
        if self.grad_bias is not None:
            self.grad_bias += g.sum()
        return [g]

    # --- the fused kernel (kernels.py): no labels, so the positives are the diagonal of this rank's own block ---
    def _shift(self, tile: Tile) -> int | None:
        """Where DCL's mask (the global diagonal) lies in the tile: column = row + shift (a shift past the tile
        masks nothing); None: no mask."""
        if not self.opts.dcl:
            return None
        layout = self.layout
        return layout.offset(layout.rank) + tile.r[0] - layout.offset(tile.block) - tile.c[0]

    def forward_fused(self, tile, rows, cols):
        k = self.kernels
        if self.kind == k.SIGLIP:
            self.totals[0] += k.forward(rows[0], cols[0], k.SIGLIP, self.bias, None, self.tf32)
            return
        row, col = k.forward(rows[0], cols[0], k.INFONCE, None, self._shift(tile), self.tf32)
        torch.logaddexp(self.row_lse[tile.rows], row, out=self.row_lse[tile.rows])
        torch.logaddexp(tile.col_state[tile.cols], col, out=tile.col_state[tile.cols])

    def backward_fused(self, tile, rows, cols, row_grads, col_grads):
        k, shift = self.kernels, self._shift(tile)
        lse_row = lse_col = None
        if self.kind == k.INFONCE:
            lse_row, lse_col = self.row_lse[tile.rows], tile.payload[1][tile.cols]
        args = (self.kind, self.coef)
        g_sum = k.backward_rows(rows[0], cols[0], row_grads[0], *args, lse_row, lse_col, self.bias, shift, self.tf32)
        if col_grads is not None:  # the transposed tile: z^T, with the row and column statistics swapped
            back = None if shift is None else -shift
            k.backward_rows(cols[0], rows[0], col_grads[0], *args, lse_col, lse_row, self.bias, back, self.tf32)
        if self.grad_bias is not None:
            self.grad_bias += g_sum


class _TiledContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, bias, labels, opts: LossOptions, plan: Plan, group, fused: bool):
        acc = wide(a[:0]).dtype
        engine = TileEngine(group, a.shape[0], labels, a.device, acc, plan)
        layout, world = engine.layout, engine.ring.world
        opts.check_batch(layout.distinct)
        G = layout.total
        a_s = (wide(a) * wide(scale)).to(a.dtype)  # the scale folded into the rows: z = a_s @ b.T
        totals = torch.zeros(2, dtype=acc, device=a.device)
        infonce = opts.kind == "infonce"
        row_lse = torch.full((a.shape[0],), float("-inf"), dtype=acc, device=a.device) if infonce else None
        norm = 2 * G if infonce else G
        ctx.fused = None
        if not infonce and world == 1 and not fused and any(ctx.needs_input_grad[:4]):
            # SigLIP needs no global statistic before its gradient: on one process, take the loss and the
            # gradients from the same tiles (3 GEMMs, not 4), and let backward only scale them.
            obj = _Contrastive(opts, layout, a_s, bias, totals=totals)
            ctx.fused = _gradients(engine, obj, ctx.needs_input_grad, a, b, scale, bias, None, None, 1.0 / norm)
            return _local_terms(opts, layout, a_s, b, bias, None, None, totals) / norm
        obj = _Contrastive(opts, layout, a_s, bias, row_lse, totals, fused)
        col_lse = engine.forward(obj, [b])
        local = _local_terms(opts, layout, a_s, b, bias, row_lse, col_lse, totals)
        sums_ab = None
        if opts.label_smoothing:
            sums_ab = torch.stack([wide(a_s).sum(0), wide(b).sum(0)])
            if world > 1:
                dist.all_reduce(sums_ab, group=group)
            # smoothing pulls every logit of a row (and of a column) toward the mean: eps/G * sum_ij z_ij, twice
            local = local - opts.label_smoothing / G * (wide(a_s).sum(0) @ sums_ab[1] + wide(b).sum(0) @ sums_ab[0])
        if world > 1:
            dist.all_reduce(local, group=group)
        empty = a.new_zeros(0)
        ctx.save_for_backward(
            a,
            b,
            scale,
            empty if bias is None else bias,
            empty if row_lse is None else row_lse,
            empty if col_lse is None else col_lse,
            empty if sums_ab is None else sums_ab,
        )
        ctx.opts, ctx.engine, ctx.norm, ctx.has_bias, ctx.kernel = opts, engine, norm, bias is not None, fused
        return local / norm

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.fused is not None:  # computed in forward for a loss of 1; scale by what came back
            return tuple(None if g is None else g * grad_out.to(g.dtype) for g in ctx.fused) + (None,) * 5
        a, b, scale, bias, row_lse, col_lse, sums_ab = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        engine = ctx.engine
        coef, upstream = upstream_coefficients(wide(grad_out), ctx.norm, a.dtype)
        a_s = (wide(a) * wide(scale)).to(a.dtype)  # recomputed rather than kept from forward: B x D less held
        obj = _Contrastive(ctx.opts, engine.layout, a_s, bias, row_lse, fused=ctx.kernel)
        needs = ctx.needs_input_grad
        return _gradients(engine, obj, needs, a, b, scale, bias, col_lse, sums_ab, coef, upstream) + (None,) * 5


def _gradients(engine, obj: _Contrastive, needs, a, b, scale, bias, col_lse, sums_ab, coef, upstream=None) -> tuple:
    """d(a), d(b), d(scale), d(bias) of coef * (the loss's numerator), as the ranks' convention wants them, times
    `upstream` (the gradient reaching the loss: a device scalar, multiplied in last, so no host sync reads it).
    Where `obj` holds `totals` (SigLIP on one process), the sweep also adds the loss's terms to them."""
    opts, layout, world = obj.opts, engine.layout, engine.ring.world
    obj.start_backward(coef, bias is not None)
    need_b, infonce = needs[1], opts.kind == "infonce"
    grad_b = engine.backward(obj, [b, col_lse] if infonce else [b], (b.shape[1],) if need_b else None)
    grad_as, grad_bias = obj.grad_as, obj.grad_bias
    # The positives' linear term, where there are no labels: the diagonal, which is all on this rank.
    if layout.labels is None:
        w = (1 - opts.label_smoothing) * 2 * coef if infonce else coef
        _sub_scaled(grad_as, wide(b), w)
        if need_b:
            _sub_scaled(grad_b, wide(obj.a_s), w)
        if grad_bias is not None:
            grad_bias -= w * a.shape[0]
    if opts.label_smoothing:
        w = opts.label_smoothing / layout.total * 2 * coef
        grad_as.sub_(w * sums_ab[1])
        if need_b:
            grad_b.sub_(w * sums_ab[0])
    return finish_gradients(world, upstream, needs, a, b, scale, bias, grad_as, grad_b, grad_bias)


def _sub_scaled(y: torch.Tensor, x: torch.Tensor, w: float | torch.Tensor) -> None:
    """y -= w * x, in one fused op where w is a number."""
    if isinstance(w, torch.Tensor):
        y.sub_(x * w)
    else:
        y.add_(x, alpha=-w)


def _local_terms(opts, layout, a_s, b, bias, row_lse, col_lse, totals) -> torch.Tensor:
    """This rank's share of the loss's numerator (before the 1/(2G) or 1/G)."""
    if opts.kind == "siglip":
        local = totals[0]
        if layout.labels is None:  # the diagonal: -log sig(z) = -log sig(-z) - z
            local = local - ((wide(a_s) * wide(b)).sum() + wide(bias) * a_s.shape[0])
        return (local - totals[1]).reshape(())
    local = row_lse.sum() + col_lse.sum()
    if layout.labels is None:
        local = local - 2 * (1 - opts.label_smoothing) * (wide(a_s) * wide(b)).sum()
    else:
        local = local - totals[1]
    return local.reshape(())


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias=None,
    kind: str = "infonce",
    tile_size: int | None = None,
    process_group=None,
    labels: torch.Tensor | None = None,
    dcl: bool = False,
    label_smoothing: float = 0.0,
    impl: str = "tiled",
    kernel: str = "auto",
    uniform_batches: bool = False,
    gather_budget: int | None = DEFAULT_GATHER_BUDGET,
) -> torch.Tensor:
    """Mean contrastive loss over the global batch (see the module docstring for the exact definition and the
    gradient convention across ranks).

    a, b: (B, D) features of this rank, row i of one paired with row i of the other (any float dtype; the
    loss accumulates in fp32). logit_scale: the multiplier s (already exponentiated), a scalar or shape (1,).
    logit_bias: SigLIP's bias. labels: (B,) integer ids; samples sharing an id are positives for each other.
    impl="full" gathers the features and builds the whole matrix (the reference: G^2 memory, and every rank
    must pass the same B). kernel: "auto" (the fused Triton kernel on CUDA where it covers the options), "triton"
    or "torch" (see options.fused_kernel). uniform_batches: every rank passes the same B (as the training
    loader's batches do), so the ranks need not exchange their sizes first. gather_budget: across ranks, gather
    every rank's features (forward) and reduce-scatter their gradients (backward) where they fit this many bytes
    per rank, else pass them round the ring (None: always the ring); both are exact and give the same numbers.
    """
    opts = LossOptions(kind, dcl, float(label_smoothing))
    opts.check(logit_bias is not None, labels is not None)
    labels = check_inputs(a, b, labels)
    check_impl(impl)
    tile_size = resolve_tile(tile_size, a.device)
    distributed = is_distributed(process_group)
    if impl == "full":
        a, b, labels = gather_batch(a, b, labels, process_group)
        bias = None if logit_bias is None else logit_bias.squeeze()
        return contrastive_loss_reference(a, b, logit_scale.squeeze(), bias, kind, labels, dcl, label_smoothing)
    scale = logit_scale.reshape(())
    bias = None if logit_bias is None else logit_bias.reshape(())
    group = process_group if distributed else None
    not_covered = "label positives need a mask per tile (loss.positives=label)" if labels is not None else None
    fused = fused_kernel(kernel, a, f"the {kind} loss", not_covered)
    a, b = a.contiguous(), b.contiguous()
    plan = Plan(int(tile_size), uniform_batches, gather_budget)
    return _TiledContrastive.apply(a, b, scale, bias, labels, opts, plan, group, fused)


def count_flops(kind: str, global_batch: int, dim: int, world: int = 1) -> int:
    """GEMM FLOPs of one forward + backward of the tiled loss, recomputation included."""
    gemms = 3 if kind == "siglip" and world == 1 else 4
    return gemms * 2 * global_batch * global_batch * dim
