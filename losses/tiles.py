"""The tile engine: every tiled objective walks its tiles through here, on one process or round the ring.

Shape legend: B local rows, G global batch, D width, T tile edge, n the rows of one column block.

An objective's logits over a tile come from one or more GEMMs of its row operands against a column block's:
P_m = rows_m[r] @ cols_m[c]^T, in fp32 (fp64 for fp64 operands). Contrastive losses and Symile have one pair (the
scaled rows against the column block), Matryoshka one per prefix slice, GRAM one per modality beside the anchor.

The engine owns what every objective shares: the spans, those GEMMs in forward and in backward, the ring and what
travels on it, and the precision rules (low-precision operands, fp32 accumulation). An objective supplies what is
particular to it (`TiledObjective`):
- `forward_tile(tile, products)`: fold the tile's terms into its statistics: its rows' in its own state, the
  block's columns' log-sum-exps in `tile.col_state`, which travels with the block and comes home at the end;
- `backward_tile(tile, products)`: the tile's gradient coefficients dL/dP_m, and any gradient of its own (row
  or column scales, a bias), the column ones into `tile.col_grad`, which travels home the same way.
The engine then adds dL/dP_m @ cols_m to the rows' gradient and dL/dP_m^T @ rows_m to the block's.

`products` is an iterator that computes each GEMM when it is taken, so an objective that folds them one by one
(Matryoshka's running prefix sums) holds one T x T product at a time.

The two walks over a block's tiles (`_walk_forward`, `_walk_backward`) are the one place where tiles are visited.
An objective that runs a fused kernel (`fused` true: `kernels.py`, which keeps the logits on chip) takes each tile
whole instead, as its operands' row and column slices, and adds the gradients itself; the ring, the layout and its
bookkeeping stay as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .options import tell_once
from .ring import Layout, Ring

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


DEFAULT_GATHER_BUDGET = 2**30  # bytes of every rank's blocks (and their accumulators) a rank may hold at once


@dataclass(frozen=True)
class Plan:
    """How an engine call runs, not what it computes: the tile edge; `uniform`: every rank passes the same number
    of rows (no sizes are exchanged); `gather_budget`: the bytes of every rank's blocks, and of the accumulators
    they fill, that a rank may hold at once, to gather them with collectives rather than pass them round the ring
    (None: always the ring)."""

    tile: int
    uniform: bool = False
    gather_budget: int | None = None


def wide(x: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype of the loss: fp64 for fp64 inputs, fp32 for everything else."""
    return x if x.dtype == torch.float64 else x.float()


def is_low(x: torch.Tensor) -> bool:
    """Whether `x` is a low-precision operand (bf16, fp16): its GEMMs accumulate in fp32."""
    return x.dtype not in (torch.float32, torch.float64)


def mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y with an fp32 result. Low-precision inputs accumulate in fp32 inside the GEMM; on CPU the result is
    rounded to their dtype on the way out (there is no mixed-output GEMM there), then widened."""
    if not is_low(x):
        return x @ y
    if x.is_cuda:
        return torch.mm(x, y, out_dtype=torch.float32)
    return (x @ y).float()


def upstream_coefficients(upstream: torch.Tensor, norm: int, dtype: torch.dtype) -> tuple:
    """(coef, upstream) for an objective's gradient sweep: coef multiplies the tiles' gradient coefficients, and
    upstream (the gradient reaching the loss, kept on the device: no host sync reads it) is multiplied in last
    (the same numbers as 1/norm when it is 1.0), except for fp16 inputs: their 5 exponent
    bits need the loss scale inside the tiles, before the cast, or the ~1/(2 G^2) entries underflow."""
    if dtype == torch.float16:
        return upstream / norm, None
    return 1.0 / norm, upstream


def spans(n: int, tile: int) -> list[tuple[int, int]]:
    return [(s, min(s + tile, n)) for s in range(0, n, tile)]


@dataclass
class Tile:
    """One tile: this rank's rows r against the columns c of the block that rank `block` owns."""

    block: int
    r: tuple[int, int]
    c: tuple[int, int]
    payload: list[torch.Tensor]  # the block's tensors as they travel (the objective's payload)
    col_state: torch.Tensor | None = None  # forward: the block's column log-sum-exps, (n, ...)
    col_grad: torch.Tensor | None = None  # backward: the block's gradient accumulator, (n, ...)

    @property
    def rows(self) -> slice:
        return slice(*self.r)

    @property
    def cols(self) -> slice:
        return slice(*self.c)


class TiledObjective:
    """What an objective tells the engine. Operands are listed pairwise: rows()[m] meets cols(payload)[m]."""

    # the trailing shape of a block's column log-sum-exps ((): one per column); None: the objective keeps none
    col_state_shape: tuple[int, ...] | None = None
    # True: the tiles go to forward_fused/backward_fused (a fused kernel) instead of forward_tile/backward_tile
    fused = False

    def rows(self) -> list[torch.Tensor]:
        """This rank's row operands, (B, d_m) each."""
        raise NotImplementedError

    def cols(self, payload: list[torch.Tensor]) -> list[torch.Tensor]:
        """A column block's operands, (n, d_m) each, taken from the block's payload."""
        raise NotImplementedError

    def row_grads(self) -> list[torch.Tensor]:
        """Where the row operands' gradients accumulate: views of the objective's fp32 buffers, as rows()."""
        raise NotImplementedError

    def col_grads(self, grad: torch.Tensor) -> list[torch.Tensor]:
        """The views of a block's gradient accumulator that take the column operands' gradients, as cols()."""
        raise NotImplementedError

    def forward_tile(self, tile: Tile, products: Iterator[torch.Tensor]) -> None:
        raise NotImplementedError

    def backward_tile(self, tile: Tile, products: Iterator[torch.Tensor]) -> list[torch.Tensor | None]:
        raise NotImplementedError

    def forward_fused(self, tile: Tile, rows: list[torch.Tensor], cols: list[torch.Tensor]) -> None:
        """forward_tile, given the tile's operand slices rather than their products."""
        raise NotImplementedError

    def backward_fused(self, tile: Tile, rows, cols, row_grads, col_grads) -> None:
        """Add the tile's gradients into the slices row_grads and col_grads (None: the columns need none)."""
        raise NotImplementedError


class ScaledRows:
    """What objectives on scaled rows a_s = s * a against columns b share (contrastive, distillation): their
    backward's fp32 buffers for d(a_s) and d(bias), and `finish_gradients`."""

    a_s: torch.Tensor

    def start_backward(self, coef, need_bias: bool) -> None:
        """The coefficient of the tiles' gradients, and zeroed d(a_s) and d(bias) buffers for the backward sweep."""
        acc = wide(self.a_s[:0]).dtype
        self.coef = coef
        self.grad_as = torch.zeros(self.a_s.shape, dtype=acc, device=self.a_s.device)
        self.grad_bias = torch.zeros((), dtype=acc, device=self.a_s.device) if need_bias else None


def finish_gradients(world: int, upstream, needs, a, b, scale, bias, grad_as, grad_b, grad_bias) -> tuple:
    """d(a), d(b), d(scale), d(bias) from the sweep's d(a_s), d(b) and d(bias), as the ranks' convention wants them
    (every rank's W times its share: DeepSpeed/DDP average over the W ranks; see `contrastive`'s docstring), times
    `upstream` (the gradient reaching the loss, a device scalar multiplied in last: no host sync reads it)."""
    W = world if upstream is None else upstream * world
    grad_s = ((grad_as.view(-1) @ wide(a).view(-1)) * W).reshape(scale.shape).to(scale.dtype) if needs[2] else None
    grad_a = grad_as.mul_(wide(scale) * W).to(a.dtype) if needs[0] else None
    grad_b = grad_b.mul_(W).to(b.dtype) if needs[1] and grad_b is not None else None
    grad_bias = (grad_bias * W).reshape(bias.shape).to(bias.dtype) if grad_bias is not None and needs[3] else None
    return grad_a, grad_b, grad_s, grad_bias


def _products(rows: list[torch.Tensor], cols: list[torch.Tensor], r: tuple, c: tuple) -> Iterator[torch.Tensor]:
    for x, y in zip(rows, cols):
        yield mm(x[r[0] : r[1]], y[c[0] : c[1]].T)


def _slices(tensors: list[torch.Tensor], span: tuple[int, int]) -> list[torch.Tensor]:
    return [t[span[0] : span[1]] for t in tensors]


def _add_product(out: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """out += g @ x, accumulated in out's dtype; a low-precision x takes g rounded to its dtype (one fp32-accumulating
    GEMM), a full-precision one accumulates inside the GEMM with no temporary."""
    if is_low(x):
        out += mm(g.to(x.dtype), x)
    else:
        out.addmm_(g, x)


class TileEngine:
    """The ring, the layout of the global batch and the tile edge of one loss call (kept from forward for backward:
    none of them holds a transfer)."""

    def __init__(self, group, local_size: int, labels, device, acc: torch.dtype, plan: Plan):
        self.ring = Ring(group)
        self.layout = Layout(self.ring, local_size, labels, device, acc, plan.uniform)
        self.tile, self.acc, self.plan = plan.tile, acc, plan

    def _shapes(self, payload: list[torch.Tensor]):
        return lambda blk: [(self.layout.sizes[blk], *t.shape[1:]) for t in payload]

    def _gathers(self, payload: list[torch.Tensor], acc_row: tuple[int, ...] | None, what: str) -> bool:
        """Whether this call gathers every rank's blocks (they and their accumulators fit the plan's budget) or
        passes them round the ring; the log says which, once per choice."""
        budget = self.plan.gather_budget
        if self.ring.world == 1 or budget is None:
            return False
        rows = max(self.layout.sizes) * self.ring.world
        row_bytes = sum(t[:1].numel() * t.element_size() for t in payload)
        if acc_row is not None:
            row_bytes += math.prod(acc_row) * torch.finfo(self.acc).bits // 8
        need = rows * row_bytes
        gathers = need <= budget
        how = "gathers every rank's blocks" if gathers else "passes the blocks round the ring"
        size = f"{need / 2**20:.1f} MiB of them, loss.gather_budget {budget / 2**20:.0f} MiB"
        tell_once(f"loss {what}: {how} ({size})", key=f"{what}: {how}")
        return gathers

    def forward(self, obj: TiledObjective, payload: list[torch.Tensor]) -> torch.Tensor | None:
        """Every tile of the global batch's rows (this rank's) against its columns (every rank's, round the ring)
        once. Returns this rank's columns' log-sum-exps, merged over every rank's rows (None if it keeps none)."""
        keeps = obj.col_state_shape is not None

        def compute(blk: int, block: list[torch.Tensor]) -> torch.Tensor | None:
            n = block[0].shape[0]
            col_state = None
            if keeps:
                col_state = torch.full((n, *obj.col_state_shape), float("-inf"), dtype=self.acc, device=block[0].device)
            self._walk_forward(obj, blk, block, col_state)
            return col_state

        if self._gathers(payload, obj.col_state_shape, "forward"):
            return self.ring.gathered(payload, self.layout.sizes, compute, "lse" if keeps else None)
        return self.ring.run(
            payload,
            self._shapes(payload),
            compute,
            acc_shape=(lambda blk: (self.layout.sizes[blk], *obj.col_state_shape)) if keeps else None,
            merge=lambda mine, theirs: torch.logaddexp(mine, theirs, out=mine),
            acc_dtype=self.acc,
        )

    def backward(
        self, obj: TiledObjective, payload: list[torch.Tensor], col_grad_shape: tuple[int, ...] | None
    ) -> torch.Tensor | None:
        """Recompute every tile once, adding the row operands' gradients into obj.row_grads(). With
        `col_grad_shape` (the trailing shape of a block's gradient accumulator), returns this rank's columns'
        accumulator, summed over every rank's rows."""

        def compute(blk: int, block: list[torch.Tensor]) -> torch.Tensor | None:
            n = block[0].shape[0]
            grad = None
            if col_grad_shape is not None:
                grad = torch.zeros((n, *col_grad_shape), dtype=self.acc, device=block[0].device)
            self._walk_backward(obj, blk, block, grad)
            return grad

        if self._gathers(payload, col_grad_shape, "backward"):
            reduce = "sum" if col_grad_shape is not None else None
            return self.ring.gathered(payload, self.layout.sizes, compute, reduce)
        return self.ring.run(
            payload,
            self._shapes(payload),
            compute,
            acc_shape=(lambda blk: (self.layout.sizes[blk], *col_grad_shape)) if col_grad_shape is not None else None,
            acc_dtype=self.acc,
        )

    def _walk_forward(self, obj: TiledObjective, blk: int, block: list[torch.Tensor], col_state) -> None:
        rows, cols = obj.rows(), obj.cols(block)
        for r in spans(rows[0].shape[0], self.tile):
            for c in spans(block[0].shape[0], self.tile):
                tile = Tile(blk, r, c, block, col_state=col_state)
                if obj.fused:
                    obj.forward_fused(tile, _slices(rows, r), _slices(cols, c))
                else:
                    obj.forward_tile(tile, _products(rows, cols, r, c))

    def _walk_backward(self, obj: TiledObjective, blk: int, block: list[torch.Tensor], grad) -> None:
        rows, cols, row_grads = obj.rows(), obj.cols(block), obj.row_grads()
        col_grads = obj.col_grads(grad) if grad is not None else None
        for r in spans(rows[0].shape[0], self.tile):
            for c in spans(block[0].shape[0], self.tile):
                tile = Tile(blk, r, c, block, col_grad=grad)
                if obj.fused:
                    column_grads = None if col_grads is None else _slices(col_grads, c)
                    obj.backward_fused(tile, _slices(rows, r), _slices(cols, c), _slices(row_grads, r), column_grads)
                    continue
                coefficients = obj.backward_tile(tile, _products(rows, cols, r, c))
                for m, g in enumerate(coefficients):
                    if g is None:
                        continue
                    _add_product(row_grads[m][r[0] : r[1]], g, cols[m][c[0] : c[1]])
                    if col_grads is not None:
                        _add_product(col_grads[m][c[0] : c[1]], g.T, rows[m][r[0] : r[1]])
