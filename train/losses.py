"""Contrastive losses over the global batch.

Shape legend: B local batch, G = W*B global batch, D embedding width.

Gradient convention (as open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)`): each rank
returns the loss of its own rows against every column of the global batch. Once DeepSpeed/DDP averages
gradients over the W ranks, every parameter's gradient equals the single-process gradient of the loss
over the global batch; so does the mean of the ranks' temperature gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


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
        return grad_GD[rank * b:(rank + 1) * b], None


def gather_with_grad(x_BD: torch.Tensor, group=None) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x_BD
    return _GatherWithGrad.apply(x_BD, group)


def infonce_reference(a_BD: torch.Tensor, b_BD: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) on one process, with the full B x B matrix: the plain reference."""
    logits_BB = logit_scale * a_BD @ b_BD.T
    labels = torch.arange(a_BD.shape[0], device=a_BD.device)
    return 0.5 * (F.cross_entropy(logits_BB, labels) + F.cross_entropy(logits_BB.T, labels))


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, logit_bias=None,
                     kind: str = "infonce", process_group=None) -> torch.Tensor:
    """Mean symmetric InfoNCE over the global batch; `logit_scale` is the multiplier (already exp'd).

    Every rank must pass the same local batch size.
    """
    if kind != "infonce" or logit_bias is not None:
        raise NotImplementedError(f"loss kind '{kind}' (with bias={logit_bias is not None}) is not available yet")
    if not dist.is_initialized() or dist.get_world_size(process_group) == 1:
        return infonce_reference(a, b, logit_scale)
    rank = dist.get_rank(process_group)
    a_GD = gather_with_grad(a, process_group)
    b_GD = gather_with_grad(b, process_group)
    labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    # Rows: this rank's samples; columns: the global batch.
    logits_ab = logit_scale * a @ b_GD.T
    logits_ba = logit_scale * b @ a_GD.T
    return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))
