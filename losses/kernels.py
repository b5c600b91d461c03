"""Fused Triton kernels for the contrastive tile: the logits live in on-chip memory only, never in GPU memory.

Shape legend: M a tile's rows, N its columns, D the width; BM x BN the block one program computes, BK the slice of
D one GEMM step takes, BD the slice of D a gradient block accumulates.

For a tile of z = rows @ cols^T (+ bias), with rows the scaled features a_s and cols a block of b:
- `forward`: one sweep gives both directions. Each program computes one BM x BN block of z and writes its rows'
  and its columns' log-sum-exps over the block (InfoNCE), or its softplus sum (SigLIP); torch merges those
  partials (a (N/BN, M) and an (M/BM, N) array, 1/BN and 1/BM of the tile).
- `backward`: one program owns BM rows and walks every column block: it recomputes z, forms the gradient
  coefficients g = dL/dz on chip (InfoNCE: coef * (exp(z - lse_row) + exp(z - lse_col)); SigLIP:
  coef * sigmoid(z + bias)) and adds g @ cols to its rows' gradient, BD columns of D at a time. The columns'
  gradient is the same kernel on the transposed tile, so each gradient row has one writer: no atomics, and the
  result does not depend on the schedule. That recomputes z twice (5 GEMMs of the tile in forward and backward,
  against 4 for the torch path, which writes z to memory instead).

Operands are bf16, fp16 or fp32; every GEMM accumulates in fp32 and every log-sum-exp is fp32. fp32 operands use
IEEE fp32 products unless TF32 is asked for. The positives' linear terms stay with the caller (they are O(B D)).
DCL (the positive left out of the denominator) is a diagonal mask: `shift` places the diagonal, column = row +
shift, and a shift outside the tile masks nothing.

This module imports triton when it is imported: the engine imports it only when a loss runs the fused path.
Under TRITON_INTERPRET=1 (set before the import) the kernels run on CPU tensors, in fp32, for the tests.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .options import interpreted

INFONCE, SIGLIP = 0, 1
NO_DIAGONAL = 1 << 40  # a shift no tile reaches: nothing is masked


@triton.jit
def _logits(rows, cols, offs_m, offs_n, M, N, K, s_rm, s_cn, BK: tl.constexpr, IEEE: tl.constexpr):
    """The BM x BN block of rows @ cols^T, fp32-accumulated."""
    acc = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        x = tl.load(rows + offs_m[:, None] * s_rm + offs_k[None, :], (offs_m[:, None] < M) & (offs_k[None, :] < K), 0.0)
        y = tl.load(cols + offs_n[:, None] * s_cn + offs_k[None, :], (offs_n[:, None] < N) & (offs_k[None, :] < K), 0.0)
        if IEEE:
            acc = tl.dot(x, tl.trans(y), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(y), acc)
    return acc


@triton.jit
def _lse(z, axis: tl.constexpr):
    """log-sum-exp along `axis`, -inf where every entry is -inf."""
    m = tl.max(z, axis)
    safe = tl.where(m == float("-inf"), 0.0, m)
    if axis == 1:
        s = tl.sum(tl.exp(z - safe[:, None]), 1)
    else:
        s = tl.sum(tl.exp(z - safe[None, :]), 0)
    return tl.where(m == float("-inf"), m, safe + tl.log(tl.maximum(s, 1.0)))  # s >= 1 where m is finite


@triton.jit
def _forward_kernel(
    rows, cols, row_part, col_part, softplus_part, bias_ptr,
    M, N, K, shift, s_rm, s_cn,
    KIND: tl.constexpr, DCL: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    valid = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    z = _logits(rows, cols, offs_m, offs_n, M, N, K, s_rm, s_cn, BK, IEEE)
    if KIND == 0:
        if DCL:
            valid = valid & (offs_n[None, :] != offs_m[:, None] + shift)
        z = tl.where(valid, z, float("-inf"))
        tl.store(row_part + pid_n * M + offs_m, _lse(z, 1), offs_m < M)
        tl.store(col_part + pid_m * N + offs_n, _lse(z, 0), offs_n < N)
    else:
        z += tl.load(bias_ptr)
        softplus = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))  # -log sigmoid(-z)
        tl.store(softplus_part + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.where(valid, softplus, 0.0)))


@triton.jit
def _backward_kernel(
    rows, cols, grad, lse_row, lse_col, coef, upstream, bias_ptr, bias_part,
    M, N, K, shift, s_rm, s_cn, s_g,
    KIND: tl.constexpr, DCL: tl.constexpr, IEEE: tl.constexpr, UPSTREAM: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_m = pid * BM + tl.arange(0, BM)
    in_m = offs_m < M
    if UPSTREAM:
        coef = coef * tl.load(upstream)
    if KIND == 0:
        r = tl.load(lse_row + offs_m, in_m, 0.0)
    else:
        bias = tl.load(bias_ptr)
    g_sum = 0.0
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        in_n = offs_n < N
        valid = in_m[:, None] & in_n[None, :]
        z = _logits(rows, cols, offs_m, offs_n, M, N, K, s_rm, s_cn, BK, IEEE)
        if KIND == 0:
            if DCL:
                valid = valid & (offs_n[None, :] != offs_m[:, None] + shift)
            c = tl.load(lse_col + offs_n, in_n, 0.0)
            g = tl.exp(z - r[:, None]) + tl.exp(z - c[None, :])
        else:
            g = tl.sigmoid(z + bias)
            g_sum += tl.sum(tl.where(valid, g, 0.0))
        g = tl.where(valid, g * coef, 0.0).to(cols.dtype.element_ty)
        for d0 in range(0, K, BD):
            offs_d = d0 + tl.arange(0, BD)
            in_d = offs_d < K
            y = tl.load(cols + offs_n[:, None] * s_cn + offs_d[None, :], in_n[:, None] & in_d[None, :], 0.0)
            out = grad + offs_m[:, None] * s_g + offs_d[None, :]
            here = in_m[:, None] & in_d[None, :]
            if IEEE:
                acc = tl.dot(g, y, tl.load(out, here, 0.0), input_precision="ieee")
            else:
                acc = tl.dot(g, y, tl.load(out, here, 0.0))
            tl.store(out, acc, here)
    if KIND == 1:
        tl.store(bias_part + pid, g_sum * coef)


@functools.cache
def blocks(dim: int, dtype: torch.dtype) -> tuple[int, int, int, int, int, int]:
    """(BM, BN, BK, BD, warps, stages) for a width and an operand dtype. The interpreter takes the smallest blocks
    tl.dot allows (it runs them in numpy, so fewer, larger ones are no faster); on a GPU, 128 x 128 output blocks
    with 64-wide GEMM steps for 2-byte operands and 32-wide for fp32, which keep the operands of a few pipelined
    steps in shared memory."""
    if interpreted():
        return 16, 16, 16, 16, 1, 1
    bk = 64 if dtype in (torch.bfloat16, torch.float16) else 32
    return 128, 128, min(bk, triton.next_power_of_2(dim)), min(64, triton.next_power_of_2(dim)), 8, 3


def _ieee(x: torch.Tensor, tf32: bool) -> bool:
    return x.dtype == torch.float32 and not tf32


def forward(rows, cols, kind: int, bias, shift: int | None, tf32: bool = False):
    """One tile's statistics. InfoNCE: (row lse (M,), col lse (N,)); SigLIP: the softplus sum (a 0-d tensor)."""
    M, K = rows.shape
    N = cols.shape[0]
    BM, BN, BK, _, warps, stages = blocks(K, rows.dtype)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    f32 = dict(dtype=torch.float32, device=rows.device)
    infonce = kind == INFONCE
    row_part = torch.empty((grid[1], M), **f32) if infonce else rows.new_empty(0, dtype=torch.float32)
    col_part = torch.empty((grid[0], N), **f32) if infonce else row_part
    softplus = torch.empty(grid, **f32) if not infonce else row_part
    _forward_kernel[grid](
        rows, cols, row_part, col_part, softplus, bias if bias is not None else row_part,
        M, N, K, NO_DIAGONAL if shift is None else shift, rows.stride(0), cols.stride(0),
        KIND=kind, DCL=shift is not None, IEEE=_ieee(rows, tf32), BM=BM, BN=BN, BK=BK,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if infonce:
        return torch.logsumexp(row_part, 0), torch.logsumexp(col_part, 0)
    return softplus.sum()


def backward_rows(rows, cols, grad, kind: int, coef, lse_row, lse_col, bias, shift, tf32: bool = False):
    """grad (M, D) fp32 += g @ cols, g the tile's gradient coefficients times `coef` (a number, or a device scalar:
    read by the kernel, so no host sync); returns SigLIP's sum of g (else None)."""
    M, K = rows.shape
    N = cols.shape[0]
    BM, BN, BK, BD, warps, stages = blocks(K, rows.dtype)
    grid = (triton.cdiv(M, BM),)
    dummy = grad.new_empty(1)
    bias_part = grad.new_empty(grid[0]) if kind == SIGLIP else dummy
    _backward_kernel[grid](
        rows, cols, grad,
        dummy if lse_row is None else lse_row, dummy if lse_col is None else lse_col,
        float(coef) if not isinstance(coef, torch.Tensor) else 1.0, coef if isinstance(coef, torch.Tensor) else dummy,
        dummy if bias is None else bias, bias_part,
        M, N, K, NO_DIAGONAL if shift is None else shift, rows.stride(0), cols.stride(0), grad.stride(0),
        KIND=kind, DCL=shift is not None, IEEE=_ieee(rows, tf32), UPSTREAM=isinstance(coef, torch.Tensor),
        BM=BM, BN=BN, BK=BK, BD=BD,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return bias_part.sum() if kind == SIGLIP else None
