"""The yardsticks: every objective of this package written plainly, with whole G x G matrices and ordinary
autograd, on one process. The tests hold the tiled objectives to these; they are also the `impl="full"` paths.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .options import LossOptions

# GRAM's volume: the eps keeps the square root's gradient finite where the volume is zero (vectors that coincide)
VOLUME_EPS = 1e-8


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


def truncated(x: torch.Tensor, width: int) -> torch.Tensor:
    """The first `width` features of each row, renormalised: what a Matryoshka prefix of width `width` compares."""
    return F.normalize(x[..., :width], dim=-1)


def matryoshka_reference(a, b, logit_scale, logit_bias=None, dims=(), **options) -> torch.Tensor:
    """(K,) losses: `contrastive_loss_reference` of each prefix on its own (`options`: its keyword arguments)."""
    return torch.stack(
        [contrastive_loss_reference(truncated(a, d), truncated(b, d), logit_scale, logit_bias, **options) for d in dims]
    )


def symile_reference(features: list[torch.Tensor], logit_scale: torch.Tensor, permutations: list[list[torch.Tensor]]):
    """Symile's loss (as Symile's own code computes it): `permutations[anchor]` holds the shuffles of the other
    modalities, in order."""
    n = features[0].shape[0]
    labels = torch.arange(n)
    losses = []
    for anchor, x in enumerate(features):
        others = [f for i, f in enumerate(features) if i != anchor]
        mixed = functools.reduce(torch.mul, [f[perm] for f, perm in zip(others, permutations[anchor])])
        logits = x @ mixed.T
        positive = (x * functools.reduce(torch.mul, others)).sum(1)
        logits = torch.where(torch.eye(n, dtype=torch.bool), positive[:, None], logits)
        losses.append(F.cross_entropy(logit_scale * logits, labels))
    return torch.stack(losses).mean()


def gram_volume(gram: torch.Tensor) -> torch.Tensor:
    """sqrt(|det|) of (..., k, k) Gram matrices: the k-volume their vectors span, as GRAM defines it."""
    return torch.sqrt(torch.linalg.det(gram).abs() + VOLUME_EPS)


def gram_reference(features: list[torch.Tensor], logit_scale: torch.Tensor) -> torch.Tensor:
    """GRAM's loss (its own code's form, a batched determinant)."""
    anchor, rest = features[0], features[1:]
    n = anchor.shape[0]
    vectors = torch.stack([anchor[:, None].expand(n, n, -1), *[x[None].expand(n, n, -1) for x in rest]], 2)
    logits = -logit_scale * gram_volume(vectors @ vectors.transpose(-1, -2))
    labels = torch.arange(n)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def distill_reference(a, b, logit_scale, teacher_a, teacher_b, teacher_scale, logit_bias=None, teacher_bias=None):
    """Logit distillation with both whole G x G matrices: for InfoNCE students (no biases) the mean row KL and the
    mean column KL of the teacher's softmax from the student's, averaged; for SigLIP students (both biases) every
    pair's Bernoulli KL, summed, over G. The teacher takes no gradient."""
    z = logit_scale * a @ b.T
    t = (teacher_scale * teacher_a @ teacher_b.T).detach()
    if logit_bias is not None:
        z, t = z + logit_bias, t + teacher_bias
        p = torch.sigmoid(t)
        kl = p * (F.logsigmoid(t) - F.logsigmoid(z)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-z))
        return kl.sum() / a.shape[0]

    def one_direction(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # rows are the queries
        log_p = torch.log_softmax(x, 1)
        return (log_p.exp() * (log_p - torch.log_softmax(s, 1))).sum(1).mean()

    return 0.5 * (one_direction(z, t) + one_direction(z.T, t.T))
