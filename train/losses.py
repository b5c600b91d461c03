"""Contrastive losses over the global batch: tiled, exact, with memory linear in the batch.

Shape legend: B local batch (rows a rank owns), G global batch (sum of B over ranks), D embedding width,
T tile edge. `a` holds one modality's features, `b` the other's; row i of `a` is paired with row i of `b`.

Two losses, both over every (a_i, b_j) of the global batch, with logits z_ij = s * a_i . b_j (+ bias):
- InfoNCE (CLIP), symmetric: L = 1/(2G) [sum_i (LSE_j z_ij - z_ii) + sum_j (LSE_i z_ij - z_jj)], with the
  options DCL (positives left out of the log-sum-exp), multi-positive labels (SupCon's L_out: samples sharing a
  label are positives for each other, the target is spread evenly over them) and label smoothing.
- SigLIP: L = -1/G sum_ij log sigmoid(y_ij z_ij), y_ij = +1 for positives and -1 otherwise.

The tiled path never builds the G x G matrix. Forward visits each T x T tile once and keeps, for InfoNCE, the
row and the column log-sum-exps of the same tile (fp32, whatever the features' dtype); it saves only the
features and those two vectors. Backward recomputes every tile once and gets d(a), d(b), d(scale), d(bias) in
that one pass: 1 GEMM forward and 3 backward, 8 G^2 D FLOPs in all (Inf-CL's two one-way passes: about 20).
SigLIP on one process needs no global statistic first, so its forward takes the loss and the gradients from the
same tiles (6 G^2 D, as open_clip's full-matrix SigLipLoss) and backward only scales them.

Across ranks the features stay where they are. Column blocks (b, and in backward their column LSEs) travel
round a ring with P2P send/recv, overlapped with the tiles being computed; what a block accumulates on its way
(its column LSEs forward, its gradient backward) is sent on when the tile is done and comes home at the end.

Gradient convention, as open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)` and `SigLipLoss`: every
rank returns the same value, the loss of the global batch. Its backward gives a rank's features W times the
global loss's gradient with respect to them, and scale/bias the rank's share of theirs times W, so that once
DeepSpeed/DDP average gradients over the W ranks, every parameter holds the single-process gradient of the
global loss. (Inf-CL's released code sums the temperature's gradient instead and gets it W times too large.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

KINDS = ("infonce", "siglip")
DEFAULT_TILE = 1024
# On a GPU a 1024-edge tile is a few microseconds of work per kernel, so launches dominate (measured on an H200:
# about 2% of its bf16 GEMM rate at B = 262,144). A larger edge keeps each kernel busy; its fp32 temporaries are
# a few hundred MiB, small beside a GPU's memory.
GPU_TILE = 8192


def default_tile(device: torch.device) -> int:
    """The tile edge used when none is given: DEFAULT_TILE on CPU, GPU_TILE on an accelerator."""
    return DEFAULT_TILE if device.type == "cpu" else GPU_TILE


def resolve_tile(tile_size: int | None, device: torch.device) -> int:
    """The tile edge to use: `tile_size`, checked, or the device's default."""
    if tile_size is None:
        return default_tile(device)
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    return int(tile_size)


@dataclass(frozen=True)
class LossOptions:
    """What changes the loss's value (kept apart from how it is computed)."""

    kind: str = "infonce"
    dcl: bool = False
    label_smoothing: float = 0.0

    def check(self, has_bias: bool, has_labels: bool) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"loss kind '{self.kind}' is not one of {KINDS}")
        if self.kind == "siglip":
            if not has_bias:
                raise ValueError("the siglip loss needs logit_bias (a learnable scalar; SigLIP starts it at -10)")
            if self.dcl or self.label_smoothing:
                raise ValueError("dcl and label_smoothing are InfoNCE options; the siglip loss takes neither")
        elif has_bias:
            raise ValueError("logit_bias is a siglip parameter; InfoNCE is invariant to it, so it would never train")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.dcl and self.label_smoothing:
            raise ValueError(
                "dcl removes the positives from the denominator; label smoothing puts them back: choose one"
            )


# --------------------------------------------------------------------------------------------------------------
# Plain full-matrix reference (one process, whole batch): for tests, and for small batches.
# --------------------------------------------------------------------------------------------------------------


def positives_mask(labels: torch.Tensor | None, n: int, device) -> torch.Tensor:
    if labels is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    return labels[:, None] == labels[None, :]


def contrastive_loss_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias=None,
    kind: str = "infonce",
    labels: torch.Tensor | None = None,
    dcl: bool = False,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The loss of one whole batch, computed with the full G x G matrix and ordinary autograd."""
    opts = LossOptions(kind, dcl, label_smoothing)
    opts.check(logit_bias is not None, labels is not None)
    logits = logit_scale * a @ b.T
    pos = positives_mask(labels, a.shape[0], a.device)
    if kind == "siglip":
        logits = logits + logit_bias
        sign = pos.to(logits.dtype) * 2 - 1
        return -F.logsigmoid(sign * logits).sum() / a.shape[0]

    def one_direction(z: torch.Tensor) -> torch.Tensor:  # rows are the queries
        target = pos.to(z.dtype) / pos.sum(1, keepdim=True)
        target = (1 - label_smoothing) * target + label_smoothing / z.shape[1]
        denominator = z.masked_fill(pos, float("-inf")) if dcl else z
        return (torch.logsumexp(denominator, 1) - (target * z).sum(1)).mean()

    return 0.5 * (one_direction(logits) + one_direction(logits.T))


def infonce_reference(a_BD: torch.Tensor, b_BD: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP InfoNCE, as open_clip writes it (cross-entropy both ways over the full matrix)."""
    logits_BB = logit_scale * a_BD @ b_BD.T
    labels = torch.arange(a_BD.shape[0], device=a_BD.device)
    return 0.5 * (F.cross_entropy(logits_BB, labels) + F.cross_entropy(logits_BB.T, labels))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (any backend)."""

    @staticmethod
    def forward(ctx, x_BD: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out_GD = x_BD.new_empty((world * x_BD.shape[0], *x_BD.shape[1:]))
        dist.all_gather_into_tensor(out_GD, x_BD.contiguous(), group=group)
        return out_GD

    @staticmethod
    def backward(ctx, grad_GD: torch.Tensor):
        grad_GD = grad_GD.contiguous()
        dist.all_reduce(grad_GD, group=ctx.group)  # gloo has no reduce_scatter; sum everything, keep our slice
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        b = grad_GD.shape[0] // world
        return grad_GD[rank * b : (rank + 1) * b], None


def gather_with_grad(x_BD: torch.Tensor, group=None) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x_BD
    return _GatherWithGrad.apply(x_BD, group)


def _gather_no_grad(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


# --------------------------------------------------------------------------------------------------------------
# The ring
# --------------------------------------------------------------------------------------------------------------


class _Ring:
    """Rank r receives from r-1 and sends to r+1. At step k it holds the column block of rank (r - k) mod W."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if self.world > 1 else 0
        if self.world > 1:
            self.next = (
                dist.get_global_rank(group, (self.rank + 1) % self.world)
                if group is not None
                else (self.rank + 1) % self.world
            )
            self.prev = (
                dist.get_global_rank(group, (self.rank - 1) % self.world)
                if group is not None
                else (self.rank - 1) % self.world
            )

    def block(self, step: int) -> int:
        return (self.rank - step) % self.world

    def post(self, sends: list[torch.Tensor], recvs: list[torch.Tensor], tag: int) -> list:
        """One `batch_isend_irecv` group: sends to the next rank, receives from the previous one. The i-th send
        and the i-th receive carry tag + i; NCCL ignores tags and pairs messages between two ranks by order."""
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(sends)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i) for i, t in enumerate(recvs)]
        return dist.batch_isend_irecv(ops) if ops else []

    def run(
        self,
        payload: list[torch.Tensor],
        payload_shapes: Callable[[int], list[tuple]],
        compute: Callable[[int, list[torch.Tensor]], torch.Tensor | None],
        acc_shape: Callable[[int], tuple] | None = None,
        merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.Tensor.add_,
        acc_dtype=torch.float32,
    ) -> torch.Tensor | None:
        """Visit every column block once. `compute(block, payload)` returns this rank's contribution to the
        block's travelling accumulator, which `merge(contribution, received)` folds into what earlier ranks
        sent (in place). Returns the accumulator of this rank's own block once it has been round the ring.

        Safe under NCCL by construction: at step k every rank posts one group that sends the payload of step k
        and the accumulator of step k - 1 to the next rank, and receives the same two from the previous one, so
        each send is in the same group as the receive its peer posts at that step (NCCL blocks a large send until
        its receive is posted; a send in a group of its own, ahead of the group holding the peer's receive,
        deadlocks the ring). The group is waited for after the step's tiles, which it overlaps; then its sent
        buffers are dropped. The last group returns each accumulator home."""
        W = self.world
        if W == 1:
            contribution = compute(self.block(0), payload)
            return contribution if acc_shape is not None else None
        current, outgoing = payload, None
        for step in range(W):
            block = self.block(step)
            sends, recvs, incoming, acc_in = [], [], [], None
            if step < W - 1:  # start moving the next block while this one is computed
                incoming = [
                    torch.empty(shape, dtype=t.dtype, device=t.device)
                    for shape, t in zip(payload_shapes(self.block(step + 1)), current)
                ]
                sends, recvs = list(current), list(incoming)
            if outgoing is not None:  # the previous step's accumulator, on to the rank that visits its block next
                sends.append(outgoing)
            if acc_shape is not None and step > 0:
                acc_in = torch.empty(acc_shape(block), dtype=acc_dtype, device=current[0].device)
                recvs.append(acc_in)
            transfers = self.post(sends, recvs, tag=8 * step)
            contribution = compute(block, current)
            for work in transfers:
                work.wait()
            outgoing = None  # sent: freed
            if acc_shape is not None:
                outgoing = contribution if acc_in is None else merge(contribution, acc_in)
            current = incoming
        if acc_shape is None:
            return None
        result = torch.empty(acc_shape(self.rank), dtype=acc_dtype, device=payload[0].device)
        for work in self.post([outgoing], [result], tag=8 * W):
            work.wait()
        return result


# --------------------------------------------------------------------------------------------------------------
# Tiled loss
# --------------------------------------------------------------------------------------------------------------


def _wide(x: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype of the loss: fp64 for fp64 inputs, fp32 for everything else."""
    return x if x.dtype == torch.float64 else x.float()


def _mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y with an fp32 result. Low-precision inputs accumulate in fp32 inside the GEMM; on CPU the result is
    rounded to their dtype on the way out (there is no mixed-output GEMM there), then widened."""
    if x.dtype in (torch.float32, torch.float64):
        return x @ y
    if x.is_cuda:
        return torch.mm(x, y, out_dtype=torch.float32)
    return (x @ y).float()


def _spans(n: int, tile: int) -> list[tuple[int, int]]:
    return [(s, min(s + tile, n)) for s in range(0, n, tile)]


_HOST_GROUPS: dict = {}


def register_host_group(group, host_group) -> None:
    """A gloo group over the same ranks as `group` (None: the world), for the loss's one size exchange per call:
    on an NCCL group that exchange would copy device to host, a sync of the GPU stream."""
    _HOST_GROUPS[group] = host_group


def _exchange_sizes(local_size: int, group, device) -> list[int]:
    """Every rank's batch size, in rank order: on the CPU through a gloo group where there is one, else through
    the group's own device (one device-to-host copy)."""
    host = _HOST_GROUPS.get(group)
    if host is None and dist.get_backend(group) == dist.Backend.GLOO:
        host = group
    mine = torch.tensor([local_size], dtype=torch.int64, device="cpu" if host is not None else device)
    return _gather_no_grad(mine, host if host is not None else group).tolist()


class _Layout:
    """Who owns which rows of the global batch, and the labels of all of them."""

    def __init__(self, ring: _Ring, local_size: int, labels: torch.Tensor | None, device, acc: torch.dtype):
        sizes = _exchange_sizes(local_size, ring.group, device) if ring.world > 1 else [local_size]
        self.sizes = sizes
        self.offsets = [sum(sizes[:r]) for r in range(len(sizes))]
        self.total = sum(sizes)
        self.labels = None
        self.counts = None  # per global sample: how many samples share its label (itself included)
        self.distinct = self.total  # how many distinct label ids (or samples)
        if labels is not None:
            if ring.world > 1:
                padded = torch.full((max(sizes),), -1, dtype=torch.int64, device=device)
                padded[:local_size] = labels
                gathered = _gather_no_grad(padded, ring.group).view(ring.world, -1)
                labels = torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])
            self.labels = labels
            _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
            self.counts = counts[inverse].to(acc)
            self.distinct = counts.numel()

    def rows(self, rank: int, lo: int, hi: int) -> slice:
        return slice(self.offsets[rank] + lo, self.offsets[rank] + hi)


class _TileContext:
    """Everything a tile computation needs besides the two blocks."""

    def __init__(self, opts: LossOptions, layout: _Layout, rank: int, bias):
        self.opts, self.layout, self.rank = opts, layout, rank
        self.bias = None if bias is None else _wide(bias)

    def positives(self, col_block: int, r: tuple[int, int], c: tuple[int, int], device) -> torch.Tensor | None:
        """Positive mask of one tile, or None where there are none outside the labels-free diagonal."""
        L = self.layout
        if L.labels is not None:
            return L.labels[L.rows(self.rank, *r)][:, None] == L.labels[L.rows(col_block, *c)][None, :]
        row0, col0 = L.offsets[self.rank] + r[0], L.offsets[col_block] + c[0]
        if row0 >= col0 + (c[1] - c[0]) or col0 >= row0 + (r[1] - r[0]):
            return None
        rows = torch.arange(row0, row0 + r[1] - r[0], device=device)
        cols = torch.arange(col0, col0 + c[1] - c[0], device=device)
        return rows[:, None] == cols[None, :]

    def positive_weights(self, col_block: int, r, c, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss's numerator holds -(w_row[i] + w_col[j]) z_ij for each positive pair (with labels, or on the
        diagonal without them: every sample is then its label's only member). `like`: the dtype and device."""
        L, o = self.layout, self.opts
        n_rows, n_cols = r[1] - r[0], c[1] - c[0]
        if o.kind == "siglip":
            return like.new_ones(n_rows), like.new_zeros(n_cols)
        k = 1 - o.label_smoothing
        if L.labels is None:
            return like.new_full((n_rows,), k), like.new_full((n_cols,), k)
        return k / L.counts[L.rows(self.rank, *r)], k / L.counts[L.rows(col_block, *c)]


def _forward_tiles(
    ctx: _TileContext,
    a_s: torch.Tensor,
    b: torch.Tensor,
    col_block: int,
    tile: int,
    row_lse: torch.Tensor | None,
    totals: torch.Tensor,
) -> torch.Tensor | None:
    """One column block against this rank's rows. Updates `row_lse` in place (InfoNCE); adds to `totals`
    [sum of softplus terms (siglip), weighted positive logits (labels)]; returns the block's column LSEs."""
    o = ctx.opts
    col_lse = row_lse.new_full((b.shape[0],), float("-inf")) if o.kind == "infonce" else None
    for r in _spans(a_s.shape[0], tile):
        for c in _spans(b.shape[0], tile):
            z = _mm(a_s[r[0] : r[1]], b[c[0] : c[1]].T)
            pos = ctx.positives(col_block, r, c, z.device) if (o.dcl or ctx.layout.labels is not None) else None
            if ctx.layout.labels is not None:
                w_row, w_col = ctx.positive_weights(col_block, r, c, totals)
                zp = torch.where(pos, z, 0.0)
                totals[1] += (zp.sum(1) @ w_row) + (zp.sum(0) @ w_col)
            if o.kind == "siglip":
                z += ctx.bias
                totals[0] -= F.logsigmoid(-z).sum()
                if ctx.layout.labels is not None:
                    totals[1] += pos.sum() * ctx.bias  # positives' bias: -log sig(z) = -log sig(-z) - z
                continue
            if o.dcl and pos is not None:
                z.masked_fill_(pos, float("-inf"))
            torch.logaddexp(row_lse[r[0] : r[1]], torch.logsumexp(z, 1), out=row_lse[r[0] : r[1]])
            torch.logaddexp(col_lse[c[0] : c[1]], torch.logsumexp(z, 0), out=col_lse[c[0] : c[1]])
    return col_lse


def _backward_tiles(
    ctx: _TileContext,
    a_s: torch.Tensor,
    b: torch.Tensor,
    col_lse: torch.Tensor | None,
    col_block: int,
    tile: int,
    row_lse,
    coef: float | torch.Tensor,
    grad_a: torch.Tensor,
    grad_bias: torch.Tensor,
    need_b: bool,
    totals: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Recompute each tile once; add its share to d(a_s) (in place) and return d(b) of the block (fp32).
    With `totals` (SigLIP on one process), also add the tile's loss terms, as _forward_tiles would."""
    o = ctx.opts
    grad_b = grad_a.new_zeros(b.shape) if need_b else None
    low = a_s.dtype not in (torch.float32, torch.float64)
    for r in _spans(a_s.shape[0], tile):
        for c in _spans(b.shape[0], tile):
            z = _mm(a_s[r[0] : r[1]], b[c[0] : c[1]].T)
            pos = ctx.positives(col_block, r, c, z.device) if (o.dcl or ctx.layout.labels is not None) else None
            if o.kind == "siglip":
                z.add_(ctx.bias)
                if totals is not None:
                    totals[0] -= F.logsigmoid(-z).sum()
                    if pos is not None:
                        totals[1] += torch.where(pos, z, 0.0).sum()
                g = z.sigmoid_().mul_(coef)
            else:
                if o.dcl and pos is not None:
                    z.masked_fill_(pos, float("-inf"))
                g = torch.sub(z, row_lse[r[0] : r[1], None]).exp_()
                g += z.sub_(col_lse[None, c[0] : c[1]]).exp_()
                g *= coef
            if ctx.layout.labels is not None:
                w_row, w_col = ctx.positive_weights(col_block, r, c, grad_a)
                g -= torch.where(pos, w_row[:, None] + w_col[None, :], 0.0).mul_(coef)
            if grad_bias is not None:
                grad_bias += g.sum()
            if low:
                g = g.to(a_s.dtype)
                grad_a[r[0] : r[1]] += _mm(g, b[c[0] : c[1]])
                if need_b:
                    grad_b[c[0] : c[1]] += _mm(g.T, a_s[r[0] : r[1]])
            else:  # accumulate inside the GEMM, no temporary
                grad_a[r[0] : r[1]].addmm_(g, b[c[0] : c[1]])
                if need_b:
                    grad_b[c[0] : c[1]].addmm_(g.T, a_s[r[0] : r[1]])
    return grad_b


class _TiledContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, bias, labels, opts: LossOptions, tile: int, group):
        ring = _Ring(group)
        acc = _wide(a[:0]).dtype
        layout = _Layout(ring, a.shape[0], labels, a.device, acc)
        if opts.dcl and layout.distinct < 2:
            raise ValueError("dcl=True needs at least one negative for every sample: this batch has none")
        tc = _TileContext(opts, layout, ring.rank, bias)
        G, D = layout.total, a.shape[1]
        a_s = (_wide(a) * _wide(scale)).to(a.dtype)  # the scale folded into the rows: z = a_s @ b.T
        totals = torch.zeros(2, dtype=acc, device=a.device)
        row_lse = (
            torch.full((a.shape[0],), float("-inf"), dtype=acc, device=a.device) if opts.kind == "infonce" else None
        )
        norm = 2 * G if opts.kind == "infonce" else G
        ctx.fused = None
        if opts.kind == "siglip" and ring.world == 1 and any(ctx.needs_input_grad[:4]):
            # SigLIP needs no global statistic before its gradient: on one process, take the loss and the
            # gradients from the same tiles (3 GEMMs, not 4), and let backward only scale them.
            ctx.fused = _gradients(
                opts, layout, ring, tile, ctx.needs_input_grad, a, b, scale, bias, None, None, None, 1.0 / norm, totals
            )
            return _local_terms(opts, layout, a_s, b, bias, None, None, totals) / norm
        col_lse = ring.run(
            [b],
            lambda blk: [(layout.sizes[blk], D)],
            lambda blk, payload: _forward_tiles(tc, a_s, payload[0], blk, tile, row_lse, totals),
            acc_shape=(lambda blk: (layout.sizes[blk],)) if opts.kind == "infonce" else None,
            merge=lambda mine, theirs: torch.logaddexp(mine, theirs, out=mine),
            acc_dtype=acc,
        )
        local = _local_terms(opts, layout, a_s, b, bias, row_lse, col_lse, totals)
        sums_ab = None
        if opts.label_smoothing:
            sums_ab = torch.stack([_wide(a_s).sum(0), _wide(b).sum(0)])
            if ring.world > 1:
                dist.all_reduce(sums_ab, group=group)
            # smoothing pulls every logit of a row (and of a column) toward the mean: eps/G * sum_ij z_ij, twice
            local = local - opts.label_smoothing / G * (_wide(a_s).sum(0) @ sums_ab[1] + _wide(b).sum(0) @ sums_ab[0])
        if ring.world > 1:
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
        ctx.opts, ctx.tile, ctx.group, ctx.layout, ctx.norm = opts, tile, group, layout, norm
        ctx.has_bias = bias is not None
        return local / norm

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.fused is not None:  # computed in forward for a loss of 1; scale by what came back
            return tuple(None if g is None else g * grad_out.to(g.dtype) for g in ctx.fused) + (None,) * 4
        a, b, scale, bias, row_lse, col_lse, sums_ab = ctx.saved_tensors
        coef, upstream = _coefficients(_wide(grad_out), ctx.norm, a.dtype)
        return (
            _gradients(
                ctx.opts,
                ctx.layout,
                _Ring(ctx.group),
                ctx.tile,
                ctx.needs_input_grad,
                a,
                b,
                scale,
                bias if ctx.has_bias else None,
                row_lse,
                col_lse,
                sums_ab,
                coef,
                upstream=upstream,
            )
            + (None,) * 4
        )


def _coefficients(upstream: torch.Tensor, norm: int, dtype: torch.dtype) -> tuple:
    """(coef, upstream) for `_gradients`, with the gradient reaching the loss kept on the device (no host sync).
    It is multiplied in last (the same numbers as 1/norm when it is 1.0), except for fp16 inputs: their 5 exponent
    bits need the loss scale inside the tiles, before the cast, or the ~1/(2 G^2) entries underflow."""
    if dtype == torch.float16:
        return upstream / norm, None
    return 1.0 / norm, upstream


def _gradients(
    opts, layout, ring, tile, needs, a, b, scale, bias, row_lse, col_lse, sums_ab, coef, totals=None, upstream=None
) -> tuple:
    """d(a), d(b), d(scale), d(bias) of coef * (the loss's numerator), as the ranks' convention wants them, times
    `upstream` (the gradient reaching the loss: a device scalar, multiplied in last, so no host sync reads it)."""
    a_s = (_wide(a) * _wide(scale)).to(a.dtype)  # recomputed rather than kept from forward: B x D less held
    tc = _TileContext(opts, layout, ring.rank, bias)
    need_b = needs[1]
    acc = _wide(a[:0]).dtype
    grad_as = torch.zeros(a.shape, dtype=acc, device=a.device)
    grad_bias = torch.zeros((), dtype=acc, device=a.device) if bias is not None else None
    D = a.shape[1]
    infonce = opts.kind == "infonce"

    def payload_shapes(blk):
        return [(layout.sizes[blk], D)] + ([(layout.sizes[blk],)] if infonce else [])

    def compute(blk, payload):
        return _backward_tiles(
            tc,
            a_s,
            payload[0],
            payload[1] if infonce else None,
            blk,
            tile,
            row_lse,
            coef,
            grad_as,
            grad_bias,
            need_b,
            totals,
        )

    grad_b = ring.run(
        [b] + ([col_lse] if infonce else []),
        payload_shapes,
        compute,
        acc_shape=(lambda blk: (layout.sizes[blk], D)) if need_b else None,
        acc_dtype=acc,
    )
    # The positives' linear term, where there are no labels: the diagonal, which is all on this rank.
    if layout.labels is None:
        w = (1 - opts.label_smoothing) * 2 * coef if infonce else coef
        _sub_scaled(grad_as, _wide(b), w)
        if need_b:
            _sub_scaled(grad_b, _wide(a_s), w)
        if grad_bias is not None:
            grad_bias -= w * a.shape[0]
    if opts.label_smoothing:
        w = opts.label_smoothing / layout.total * 2 * coef
        grad_as.sub_(w * sums_ab[1])
        if need_b:
            grad_b.sub_(w * sums_ab[0])
    W = ring.world if upstream is None else upstream * ring.world  # see the module docstring: DeepSpeed/DDP divide by W
    grad_s = ((grad_as.view(-1) @ _wide(a).view(-1)) * W).reshape(scale.shape).to(scale.dtype) if needs[2] else None
    grad_a = grad_as.mul_(_wide(scale) * W).to(a.dtype) if needs[0] else None
    grad_b = grad_b.mul_(W).to(b.dtype) if need_b else None
    grad_bias = (grad_bias * W).reshape(bias.shape).to(bias.dtype) if bias is not None and needs[3] else None
    return grad_a, grad_b, grad_s, grad_bias


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
            local = local - ((_wide(a_s) * _wide(b)).sum() + _wide(bias) * a_s.shape[0])
        return (local - totals[1]).reshape(())
    local = row_lse.sum() + col_lse.sum()
    if layout.labels is None:
        local = local - 2 * (1 - opts.label_smoothing) * (_wide(a_s) * _wide(b)).sum()
    else:
        local = local - totals[1]
    return local.reshape(())


def check_inputs(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Check two (B, D) feature tensors and their (B,) integer labels; return the labels as int64 on a's device."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"features must be two (B, D) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if labels is None:
        return None
    if labels.shape != (a.shape[0],) or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be ({a.shape[0]},) integers, got {tuple(labels.shape)} {labels.dtype}")
    return labels.to(device=a.device, dtype=torch.int64)


def is_distributed(process_group) -> bool:
    """Whether the loss spreads over more than one process (`process_group` None: the default group)."""
    return dist.is_initialized() and dist.get_world_size(process_group) > 1


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
) -> torch.Tensor:
    """Mean contrastive loss over the global batch (see the module docstring for the exact definition and the
    gradient convention across ranks).

    a, b: (B, D) features of this rank, row i of one paired with row i of the other (any float dtype; the
    loss accumulates in fp32). logit_scale: the multiplier s (already exponentiated), a scalar or shape (1,).
    logit_bias: SigLIP's bias. labels: (B,) integer ids; samples sharing an id are positives for each other.
    impl="full" gathers the features and builds the whole matrix (the reference: G^2 memory, and every rank
    must pass the same B).
    """
    opts = LossOptions(kind, dcl, float(label_smoothing))
    opts.check(logit_bias is not None, labels is not None)
    labels = check_inputs(a, b, labels)
    tile_size = resolve_tile(tile_size, a.device)
    distributed = is_distributed(process_group)
    if impl == "full":
        if distributed:
            a, b = gather_with_grad(a, process_group), gather_with_grad(b, process_group)
            labels = None if labels is None else _gather_no_grad(labels, process_group)
        return contrastive_loss_reference(
            a,
            b,
            logit_scale.squeeze(),
            None if logit_bias is None else logit_bias.squeeze(),
            kind,
            labels,
            dcl,
            label_smoothing,
        )
    if impl != "tiled":
        raise ValueError(f"impl must be 'tiled' or 'full', got '{impl}'")
    scale = logit_scale.reshape(())
    bias = None if logit_bias is None else logit_bias.reshape(())
    return _TiledContrastive.apply(
        a.contiguous(),
        b.contiguous(),
        scale,
        bias,
        labels,
        opts,
        int(tile_size),
        process_group if distributed else None,
    )


def count_flops(kind: str, global_batch: int, dim: int, world: int = 1) -> int:
    """GEMM FLOPs of one forward + backward of the tiled loss, recomputation included."""
    gemms = 3 if kind == "siglip" and world == 1 else 4
    return gemms * 2 * global_batch * global_batch * dim


__all__ = [
    "contrastive_loss",
    "contrastive_loss_reference",
    "infonce_reference",
    "gather_with_grad",
    "LossOptions",
    "KINDS",
    "DEFAULT_TILE",
    "GPU_TILE",
    "default_tile",
    "count_flops",
    "register_host_group",
]
