"""Compile the loss's Triton kernels ahead of time for NVIDIA targets, on a machine without a GPU (triton's wheel
brings ptxas): every variant the loss launches, per operand dtype. Prints one line per kernel with its shared
memory; exits non-zero on the first that does not compile.

    python tests/compile_kernels.py 80 90           # A100 and H100, every operand dtype
    python tests/compile_kernels.py 90 bf16 fp32    # H100, two dtypes
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not for the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tessera.losses import kernels  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def variants(dtypes: list[str]):
    """(name, kernel, signature, constexprs, options) of every launch `kernels.forward` and `backward_rows` make."""
    for name in dtypes:
        dtype = DTYPES[name]
        BM, BN, BK, BD, warps, stages = kernels.blocks(512, dtype)
        options = {"num_warps": warps, "num_stages": stages}
        ieee = dtype == torch.float32
        for kind in (kernels.INFONCE, kernels.SIGLIP):
            forward = dict.fromkeys(["rows", "cols"], f"*{name}")
            forward |= dict.fromkeys(["row_part", "col_part", "softplus_part", "bias_ptr"], "*fp32")
            forward |= dict.fromkeys(["M", "N", "K"], "i32") | {"shift": "i64", "s_rm": "i32", "s_cn": "i32"}
            constants = {"KIND": kind, "DCL": kind == kernels.INFONCE, "IEEE": ieee, "BM": BM, "BN": BN, "BK": BK}
            yield f"forward {name} kind {kind}", kernels._forward_kernel, forward, constants, options
            backward = dict.fromkeys(["rows", "cols"], f"*{name}")
            backward |= dict.fromkeys(["grad", "lse_row", "lse_col"], "*fp32") | {"coef": "fp32"}
            backward |= dict.fromkeys(["upstream", "bias_ptr", "bias_part"], "*fp32")
            backward |= dict.fromkeys(["M", "N", "K"], "i32") | {"shift": "i64"}
            backward |= dict.fromkeys(["s_rm", "s_cn", "s_g"], "i32")
            for upstream in (False, True):
                constants = {"KIND": kind, "DCL": kind == kernels.INFONCE, "IEEE": ieee, "UPSTREAM": upstream}
                constants |= {"BM": BM, "BN": BN, "BK": BK, "BD": BD}
                yield (
                    f"backward {name} kind {kind} upstream {upstream}",
                    kernels._backward_kernel,
                    backward,
                    constants,
                    options,
                )


def main(capabilities: list[int], dtypes: list[str]) -> None:
    for capability in capabilities:
        target = GPUTarget("cuda", capability, 32)
        for name, fn, signature, constants, options in variants(dtypes):
            signature = signature | dict.fromkeys(constants, "constexpr")
            compiled = triton.compile(ASTSource(fn, signature, constants), target=target, options=options)
            print(f"sm_{capability} {name}: {compiled.metadata.shared} bytes of shared memory", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    main([int(a) for a in args if a.isdigit()] or [90], [a for a in args if not a.isdigit()] or list(DTYPES))
