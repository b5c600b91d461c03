"""What `train.precision` means on this machine: the dtypes a run casts inputs to and computes in, and `auto`.

The run config (`tessera.train.recipes.config`) holds the name only, so that reading a recipe (and `--help`)
needs no torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# train.precision -> the dtype the towers compute in under autocast. bf16 and fp16 are mixed precision, as
# open_clip's amp_bf16 and amp: weights (temperatures and biases included), gradients, their accumulation and
# reduction across ranks, and the optimizer all stay fp32 at every ZeRO stage. DeepSpeed's own modes would not:
# its bf16 accumulates and all-reduces bf16 gradients at stage 0, and both turn every parameter into a half one,
# the temperatures too (a bf16 scale near 100 moves in steps of 3% of it). fp16 adds a loss scale (`LossScale`).
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def native_precision() -> str:
    """bf16 where this machine computes it natively, else fp32. A CPU without AMX or AVX512-BF16 emulates bf16
    matrix products, at about 1/25 of its fp32 rate (measured: 512 x 512 matmuls on a 2-core AVX2 EPYC), so a bf16
    run there is far slower than the same run in fp32."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = (
        getattr(torch.cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    )
    return "bf16" if any(native) else "fp32"


def resolve(precision: str) -> str:
    """A run's precision: `auto` becomes what this machine computes natively."""
    return native_precision() if precision == "auto" else precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype the towers compute in under autocast (None: no autocast)."""
    return AUTOCAST[resolve(precision)]


class LossScale:
    """Dynamic loss scaling for train.precision=fp16, on the device and exact. The steps backpropagate the loss
    times `scale`, so that the towers' fp16 activation gradients stay clear of fp16's underflow; each trainable
    parameter's gradient is multiplied by 1/scale as it arrives (a tensor hook, before it is accumulated), so
    DeepSpeed accumulates, reduces, clips and applies true fp32 gradients at every ZeRO stage, as it does for bf16
    and fp32. A power-of-two scale makes both multiplications exact.

    `update(found)` follows torch.amp.GradScaler's rule and defaults: a step whose gradients overflowed (the guard
    withholds it) halves the scale; `interval` applied steps in a row double it. No host sync: the scale is read
    only for the log and the checkpoint. The tensors move to the device of the first loss scaled."""

    def __init__(
        self, model: nn.Module, init: float = 2.0**16, growth: float = 2.0, backoff: float = 0.5, interval: int = 2000
    ):
        self.growth, self.backoff, self.interval = growth, backoff, interval
        self.scale = torch.tensor(init)
        self.inverse = torch.tensor(1.0 / init)
        self.good_steps = torch.zeros((), dtype=torch.int32)  # applied steps since the scale last changed
        self._hooks = [p.register_hook(self._unscale) for p in model.parameters() if p.requires_grad]

    def _unscale(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.inverse

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` times the scale, to backpropagate."""
        if self.scale.device != loss.device:
            self.scale, self.inverse, self.good_steps = (
                t.to(loss.device) for t in (self.scale, self.inverse, self.good_steps)
            )
        return loss * self.scale

    @torch.no_grad()
    def update(self, found: torch.Tensor) -> None:
        """After an optimizer step: `found` (a device scalar) is non-zero where the step's gradients were not
        finite and it was withheld."""
        bad = found.to(self.scale.device) != 0
        self.good_steps.copy_(torch.where(bad, 0, self.good_steps + 1))
        grow = self.good_steps >= self.interval
        self.scale.copy_(
            torch.where(bad, self.scale * self.backoff, torch.where(grow, self.scale * self.growth, self.scale))
        )
        self.good_steps.masked_fill_(grow, 0)
        self.inverse.copy_(1.0 / self.scale)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": float(self.scale), "good_steps": int(self.good_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale.fill_(state["scale"])
        self.inverse.copy_(1.0 / self.scale)
        self.good_steps.fill_(state["good_steps"])

    def close(self) -> None:
        """Take the gradient hooks off the parameters."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
