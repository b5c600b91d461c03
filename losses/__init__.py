"""Tessera's losses: every tiled objective over the global batch, exact, with memory linear in the batch.

    ring.py          the ranks' ring, the layout of the global batch over them, gathers
    tiles.py         the tile engine every objective walks (and where a fused kernel plugs in)
    options.py       what a contrastive loss is asked (kind, DCL, label smoothing) and its input checks
    contrastive.py   InfoNCE and SigLIP, with labels as positives, DCL and label smoothing
    matryoshka.py    the contrastive loss at every nested prefix of the embedding, from one pass
    higher_order.py  Symile and GRAM, for samples with three or more modalities
    distill.py       logit distillation: the KL of a teacher's similarity matrix from the student's, tiled
    reference.py     every objective with whole matrices: the yardsticks of the tests, and impl="full"

The package imports torch only: a model's user can take the loss without DeepSpeed, the loader or the trainer.
"""

from .contrastive import contrastive_loss, count_flops
from .distill import DISTILL_KINDS, distill_loss
from .higher_order import gram_loss, symile_loss
from .matryoshka import check_dims, matryoshka_losses, prefix_inverse_norms
from .options import KINDS, LossOptions
from .reference import (
    contrastive_loss_reference,
    distill_reference,
    gram_reference,
    gram_volume,
    infonce_reference,
    matryoshka_reference,
    symile_reference,
)
from .ring import gather_with_grad, register_host_group
from .tiles import DEFAULT_TILE, GPU_TILE, default_tile

__all__ = [
    "DEFAULT_TILE",
    "DISTILL_KINDS",
    "GPU_TILE",
    "KINDS",
    "LossOptions",
    "check_dims",
    "contrastive_loss",
    "contrastive_loss_reference",
    "count_flops",
    "default_tile",
    "distill_loss",
    "distill_reference",
    "gather_with_grad",
    "gram_loss",
    "gram_reference",
    "gram_volume",
    "infonce_reference",
    "matryoshka_losses",
    "matryoshka_reference",
    "prefix_inverse_norms",
    "register_host_group",
    "symile_loss",
    "symile_reference",
]
