"""What a contrastive loss is asked to compute, checked before any tile is: its kind and options, its inputs."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

KINDS = ("infonce", "siglip")
KERNELS = ("auto", "triton", "torch")  # how the tiles are computed: see fused_kernel

log = logging.getLogger("tessera.losses")
_told: set[str] = set()


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

    def check_batch(self, distinct: int) -> None:
        """`distinct`: how many distinct labels (or samples) the global batch holds."""
        if self.dcl and distinct < 2:
            raise ValueError("dcl=True needs at least one negative for every sample: this batch has none")


def check_inputs(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Check two (B, D) feature tensors and their (B,) integer labels; return the labels as int64 on a's device."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"features must be two (B, D) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if labels is None:
        return None
    if labels.shape != (a.shape[0],) or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be ({a.shape[0]},) integers, got {tuple(labels.shape)} {labels.dtype}")
    return labels.to(device=a.device, dtype=torch.int64)


def check_impl(impl: str) -> None:
    if impl not in ("tiled", "full"):
        raise ValueError(f"impl must be 'tiled' or 'full', got '{impl}'")


def interpreted() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1: on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_kernel(kernel: str, x: torch.Tensor, what: str, not_covered: str | None = None) -> bool:
    """Whether `what` (an objective) runs the fused Triton kernel for features like `x`. auto: on CUDA, where the
    kernel covers the objective and its options; triton: wherever it can run (a CUDA tensor, or any under the
    interpreter); torch: never. Where the kernel is wanted but cannot run (`not_covered`: why the objective's
    options are not fused), the torch path runs and the log says why, once per reason."""
    if kernel not in KERNELS:
        raise ValueError(f"loss.kernel must be one of {KERNELS}, got '{kernel}'")
    if kernel == "torch" or (kernel == "auto" and not x.is_cuda):
        return False
    reason = not_covered
    if reason is None and importlib.util.find_spec("triton") is None:
        reason = "triton is not installed"
    if reason is None and not (x.is_cuda or interpreted()):
        reason = "the kernel runs on CUDA tensors (on CPU only under TRITON_INTERPRET=1)"
    if reason is None and x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        reason = f"it takes bf16, fp16 or fp32 features, not {x.dtype}"
    if reason is None:
        return True
    level = logging.WARNING if kernel == "triton" else logging.INFO  # asked for by name, or chosen by auto
    tell_once(f"loss.kernel={kernel}: {what} runs the torch path: {reason}", level)
    return False


def tell_once(message: str, level: int = logging.INFO, key: str | None = None) -> None:
    """Log `message` the first time it (or its `key`) comes in this process."""
    key = message if key is None else key
    if key not in _told:
        _told.add(key)
        log.log(level, message)
