"""What `train.precision` means on this machine: the dtypes a run casts inputs to and computes in, and `auto`.

The run config (`tessera.train.recipes.config`) holds the name only, so that reading a recipe (and `--help`)
needs no torch.
"""

from __future__ import annotations

import torch

# train.precision -> the dtype floating inputs are cast to: the weights' dtype where DeepSpeed holds them in half
# precision (fp16, with its loss scaler); fp32 and bf16 leave inputs as they are
DTYPES = {"bf16": None, "fp16": torch.float16, "fp32": None}
# train.precision -> the dtype the towers compute in under autocast. bf16 is mixed precision, as open_clip's
# amp_bf16: weights, gradients, their accumulation and reduction across ranks, and the optimizer all stay fp32 at
# every ZeRO stage (DeepSpeed's own bf16 mode accumulates and all-reduces bf16 gradients at stage 0, and turns the
# temperatures into bf16 parameters whose steps near a scale of 100 are 3% of it)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": None, "fp32": None}


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


def input_dtype(precision: str) -> torch.dtype | None:
    """The dtype floating inputs are cast to (None: as they are)."""
    return DTYPES[resolve(precision)]


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype the towers compute in under autocast (None: no autocast)."""
    return AUTOCAST[resolve(precision)]
