"""Logit distillation over the global batch: the student's similarity matrix pulled toward a teacher's, tiled and
exact, never a G x G matrix, round the ring across ranks.

Shape legend: B local rows, G global batch, D the student's width, E the teacher's (any), T tile edge.

Student logits z_ij = s * a_i . b_j (+ bias), teacher logits t_ij = s_t * ta_i . tb_j (+ bias_t), over every pair
(i, j) of the global batch. The teacher takes no gradient; the student's features, scale and bias do.

- InfoNCE students (open_clip's DistillClipLoss, as a KL): the mean over rows of KL(softmax_j t_ij || softmax_j
  z_ij) and the mean over columns of KL(softmax_i t_ij || softmax_i z_ij), averaged:
      L = 1/(2G) [sum_i KL_i + sum_j KL_j],  KL_i = sum_j p_ij (t_ij - z_ij) - LSE_j t_ij + LSE_j z_ij,
  p_ij = softmax_j t_ij. (DistillClipLoss takes the cross-entropy, which differs by the teacher's entropy: the
  same gradients, but a KL is 0 where the student matches the teacher.)
- SigLIP students: each pair's Bernoulli KL, KL(sigmoid t_ij || sigmoid z_ij), summed and divided by G as SigLIP's
  own loss is.

Tiled in one forward sweep. The cross term sum_j p_ij (t_ij - z_ij) needs the teacher's LSE of the whole row, which
a tile does not know yet; it is kept in log space, split by sign, as two more log-sum-exps:
  sum_j e^t_ij (t_ij - z_ij) = e^{LSE_j(t_ij + log relu(t_ij - z_ij))} - e^{LSE_j(t_ij + log relu(z_ij - t_ij))},
so each row and each column keeps four log-sum-exps (student, teacher, positive and negative cross terms), all
merged by logaddexp: the engine's ring and gathered paths carry them as they carry InfoNCE's one. Backward
recomputes each tile: dL/dz_ij = coef * (softmax_j z - softmax_j t + softmax_i z - softmax_i t). Gradient convention
across ranks: as `contrastive` (every rank returns the global loss).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .reference import distill_reference
from .ring import gather_batch, is_distributed
from .tiles import (
    DEFAULT_GATHER_BUDGET,
    Plan,
    ScaledRows,
    TiledObjective,
    TileEngine,
    finish_gradients,
    resolve_tile,
    upstream_coefficients,
    wide,
)

DISTILL_KINDS = ("infonce", "siglip")
# the four log-sum-exps each row and column keeps: student, teacher, and the cross term's two signs
STUDENT, TEACHER, ABOVE, BELOW = range(4)


def _fold_stats(z: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
    """Fold a tile's four log-sum-exps into its rows' (r, 4) and its columns' (c, 4) running ones. Overwrites z and
    t (fresh products): beside them it holds one more tile and log-sum-exp's temporary."""
    for k, x in ((STUDENT, z), (TEACHER, t)):
        torch.logaddexp(rows[:, k], torch.logsumexp(x, 1), out=rows[:, k])
        torch.logaddexp(cols[:, k], torch.logsumexp(x, 0), out=cols[:, k])
    d = z.neg_().add_(t)  # t - z
    above = d.clamp_min(0.0).log_().add_(t)  # t + log relu(t - z)
    below = d.neg_().clamp_min_(0.0).log_().add_(t)  # t + log relu(z - t), in z's place
    for k, x in ((ABOVE, above), (BELOW, below)):
        torch.logaddexp(rows[:, k], torch.logsumexp(x, 1), out=rows[:, k])
        torch.logaddexp(cols[:, k], torch.logsumexp(x, 0), out=cols[:, k])


def _kl(stats: torch.Tensor) -> torch.Tensor:
    """Each row's (or column's) KL from its four log-sum-exps."""
    lse_t = stats[:, TEACHER]
    cross = (stats[:, ABOVE] - lse_t).exp() - (stats[:, BELOW] - lse_t).exp()
    return cross - lse_t + stats[:, STUDENT]


def _bernoulli_kl(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """KL(sigmoid t || sigmoid z), elementwise."""
    p = torch.sigmoid(t)
    return p * (F.logsigmoid(t) - F.logsigmoid(z)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-z))


class _Distill(ScaledRows, TiledObjective):
    """The operands: the student's scaled rows a_s against its columns b, the teacher's scaled rows ta_s against
    its tb. A forward block's payload is [b, tb]; InfoNCE's backward adds the block's column log-sum-exps (n, 2)."""

    def __init__(self, kind: str, a_s, ta_s, bias, teacher_bias, row_stats=None, total=None):
        self.kind, self.a_s, self.ta_s, self.row_stats, self.total = kind, a_s, ta_s, row_stats, total
        self.bias = None if bias is None else wide(bias)
        self.teacher_bias = None if teacher_bias is None else wide(teacher_bias)
        self.col_state_shape = (4,) if kind == "infonce" else None
        self.coef = self.grad_as = self.grad_bias = None

    def rows(self):
        return [self.a_s, self.ta_s]

    def cols(self, payload):
        return [payload[0], payload[1]]

    def row_grads(self):
        return [self.grad_as, None]  # the teacher takes no gradient

    def col_grads(self, grad):
        return [grad, None]

    def _logits(self, products):
        z, t = next(products), next(products)
        if self.kind == "siglip":
            z += self.bias
            t += self.teacher_bias
        return z, t

    def forward_tile(self, tile, products):
        z, t = self._logits(products)
        if self.kind == "siglip":
            self.total += _bernoulli_kl(z, t).sum()
            return
        _fold_stats(z, t, self.row_stats[tile.rows], tile.col_state[tile.cols])

    def backward_tile(self, tile, products):
        z, t = self._logits(products)
        if self.kind == "siglip":
            g = z.sigmoid_().sub_(t.sigmoid_())
        else:
            rows, cols = self.row_stats[tile.rows], tile.payload[2][tile.cols]
            # softmax_j z - softmax_j t + softmax_i z - softmax_i t, with one tile beside z and t
            g = torch.sub(z, rows[:, None, STUDENT]).exp_()
            g += z.sub_(cols[None, :, STUDENT]).exp_()
            g -= z.copy_(t).sub_(rows[:, None, TEACHER]).exp_()
            g -= t.sub_(cols[None, :, TEACHER]).exp_()
        g *= self.coef
        if self.grad_bias is not None:
            self.grad_bias += g.sum()
        return [g, None]


class _TiledDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, bias, ta, tb, teacher_scale, teacher_bias, kind: str, plan: Plan, group):
        acc = wide(a[:0]).dtype
        engine = TileEngine(group, a.shape[0], None, a.device, acc, plan)
        G, world = engine.layout.total, engine.ring.world
        a_s = (wide(a) * wide(scale)).to(a.dtype)
        ta_s = (wide(ta) * wide(teacher_scale)).to(ta.dtype)
        infonce = kind == "infonce"
        row_stats = torch.full((a.shape[0], 4), float("-inf"), dtype=acc, device=a.device) if infonce else None
        total = torch.zeros((), dtype=acc, device=a.device)
        obj = _Distill(kind, a_s, ta_s, bias, teacher_bias, row_stats, total)
        col_stats = engine.forward(obj, [b, tb])
        local = _kl(row_stats).sum() + _kl(col_stats).sum() if infonce else total
        if world > 1:
            dist.all_reduce(local, group=group)
        norm = 2 * G if infonce else G
        empty = a.new_zeros(0)
        ctx.save_for_backward(
            a,
            b,
            scale,
            empty if bias is None else bias,
            ta,
            tb,
            teacher_scale,
            empty if teacher_bias is None else teacher_bias,
            empty if row_stats is None else row_stats[:, :2].contiguous(),
            empty if col_stats is None else col_stats[:, :2].contiguous(),
        )
        ctx.kind, ctx.engine, ctx.norm, ctx.has_bias = kind, engine, norm, bias is not None
        return local / norm

    @staticmethod
    def backward(ctx, grad_out):
        a, b, scale, bias, ta, tb, teacher_scale, teacher_bias, row_lse, col_lse = ctx.saved_tensors
        bias, teacher_bias = (bias, teacher_bias) if ctx.has_bias else (None, None)
        engine, needs = ctx.engine, ctx.needs_input_grad
        coef, upstream = upstream_coefficients(wide(grad_out), ctx.norm, a.dtype)
        a_s = (wide(a) * wide(scale)).to(a.dtype)
        ta_s = (wide(ta) * wide(teacher_scale)).to(ta.dtype)
        infonce = ctx.kind == "infonce"
        obj = _Distill(ctx.kind, a_s, ta_s, bias, teacher_bias, row_lse if infonce else None)
        obj.start_backward(coef, bias is not None and needs[3])
        payload = [b, tb, col_lse] if infonce else [b, tb]
        grad_b = engine.backward(obj, payload, (b.shape[1],) if needs[1] else None)
        world = engine.ring.world
        grads = finish_gradients(world, upstream, needs, a, b, scale, bias, obj.grad_as, grad_b, obj.grad_bias)
        return grads + (None,) * 7


def distill_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    teacher_a: torch.Tensor,
    teacher_b: torch.Tensor,
    teacher_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | float | None = None,
    kind: str = "infonce",
    tile_size: int | None = None,
    process_group=None,
    impl: str = "tiled",
    uniform_batches: bool = False,
    gather_budget: int | None = DEFAULT_GATHER_BUDGET,
) -> torch.Tensor:
    """Mean KL of the student's similarity matrix from the teacher's over the global batch (see the module
    docstring).

    a, b: (B, D) the student's paired features of this rank; teacher_a, teacher_b: (B, E) the teacher's of the same
    samples (any width E; no gradient reaches them). logit_scale / teacher_scale: the multipliers (already
    exponentiated). kind: "infonce" (softmax over rows and columns) or "siglip" (sigmoid per pair; needs both biases).
    impl="full": the whole-matrix reference on the gathered batch (G^2 memory). The other arguments are
    `contrastive_loss`'s.
    """
    if kind not in DISTILL_KINDS:
        raise ValueError(f"distillation kind '{kind}' is not one of {DISTILL_KINDS}")
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"student features must be two (B, D) tensors of one shape, got {tuple(a.shape)}, {b.shape}")
    if teacher_a.ndim != 2 or teacher_a.shape != teacher_b.shape or teacher_a.shape[0] != a.shape[0]:
        raise ValueError(
            f"teacher features must be two (B, E) tensors of one shape with the student's B={a.shape[0]} rows, got "
            f"{tuple(teacher_a.shape)} and {tuple(teacher_b.shape)}"
        )
    if (kind == "siglip") != (logit_bias is not None) or (logit_bias is None) != (teacher_bias is None):
        raise ValueError("the siglip form needs logit_bias and teacher_bias; the infonce form takes neither")
    if impl not in ("tiled", "full"):
        raise ValueError(f"impl must be 'tiled' or 'full', got '{impl}'")
    teacher_a, teacher_b = teacher_a.detach(), teacher_b.detach()
    teacher_scale = torch.as_tensor(teacher_scale, dtype=torch.float32, device=a.device).detach().reshape(())
    if teacher_bias is not None:
        teacher_bias = torch.as_tensor(teacher_bias, dtype=torch.float32, device=a.device).detach().reshape(())
    distributed = is_distributed(process_group)
    if impl == "full":
        a, b, _ = gather_batch(a, b, None, process_group)
        teacher_a, teacher_b, _ = gather_batch(teacher_a, teacher_b, None, process_group)
        bias = None if logit_bias is None else logit_bias.reshape(())
        return distill_reference(a, b, logit_scale.reshape(()), teacher_a, teacher_b, teacher_scale, bias, teacher_bias)
    scale = logit_scale.reshape(())
    bias = None if logit_bias is None else logit_bias.reshape(())
    plan = Plan(int(resolve_tile(tile_size, a.device)), uniform_batches, gather_budget)
    group = process_group if distributed else None
    return _TiledDistill.apply(
        a.contiguous(),
        b.contiguous(),
        scale,
        bias,
        teacher_a.contiguous(),
        teacher_b.contiguous(),
        teacher_scale,
        teacher_bias,
        kind,
        plan,
        group,
    )
