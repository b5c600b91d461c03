"""Where the global batch lives and how its blocks move: the ring of ranks, the layout of rows over them, and the
gathers the loss needs.

Shape legend: B local rows (what a rank owns), G global batch (sum of B over ranks), D embedding width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def is_distributed(process_group) -> bool:
    """Whether the loss spreads over more than one process (`process_group` None: the default group)."""
    return dist.is_initialized() and dist.get_world_size(process_group) > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (any backend)."""

    @staticmethod
    def forward(ctx, x_BD: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return gather(x_BD, group)

    @staticmethod
    def backward(ctx, grad_GD: torch.Tensor):
        grad_GD = grad_GD.contiguous()
        dist.all_reduce(grad_GD, group=ctx.group)  # gloo has no reduce_scatter; sum everything, keep our slice
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        b = grad_GD.shape[0] // world
        return grad_GD[rank * b : (rank + 1) * b], None


def gather_with_grad(x_BD: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's rows, in rank order (every rank must pass the same B); gradients flow back to their owners."""
    if not is_distributed(group):
        return x_BD
    return _GatherWithGrad.apply(x_BD, group)


def gather(x: torch.Tensor, group) -> torch.Tensor:
    """Every rank's `x` (of one shape), concatenated in rank order along the first dimension, without autograd."""
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


class Ring:
    """Rank r receives from r-1 and sends to r+1. At step k it holds the column block of rank (r - k) mod W."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if self.world > 1 else 0
        if self.world > 1:
            neighbour = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
            self.next = neighbour((self.rank + 1) % self.world)
            self.prev = neighbour((self.rank - 1) % self.world)

    def block(self, step: int) -> int:
        return (self.rank - step) % self.world

    def post(self, sends: list[torch.Tensor], recvs: list[torch.Tensor], tag: int) -> list:
        """One `batch_isend_irecv` group: sends to the next rank, receives from the previous one. The i-th send
        and the i-th receive carry tag + i; NCCL ignores tags and pairs messages between two ranks by order."""
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(sends)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i) for i, t in enumerate(recvs)]
        return dist.batch_isend_irecv(ops) if ops else []

    def run(
        self,
        payload: list[torch.Tensor],
        payload_shapes: Callable[[int], list[tuple]],
        compute: Callable[[int, list[torch.Tensor]], torch.Tensor | None],
        acc_shape: Callable[[int], tuple] | None = None,
        merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.Tensor.add_,
        acc_dtype=torch.float32,
    ) -> torch.Tensor | None:
        """Visit every column block once. `compute(block, payload)` returns this rank's contribution to the
        block's travelling accumulator, which `merge(contribution, received)` folds into what earlier ranks
        sent (in place). Returns the accumulator of this rank's own block once it has been round the ring.

        Safe under NCCL by construction: at step k every rank posts one group that sends the payload of step k
        and the accumulator of step k - 1 to the next rank, and receives the same two from the previous one, so
        each send is in the same group as the receive its peer posts at that step (NCCL blocks a large send until
        its receive is posted; a send in a group of its own, ahead of the group holding the peer's receive,
        deadlocks the ring). The group is waited for after the step's tiles, which it overlaps; then its sent
        buffers are dropped. The last group returns each accumulator home."""
        W = self.world
        if W == 1:
            contribution = compute(self.block(0), payload)
            return contribution if acc_shape is not None else None
        current, outgoing = payload, None
        for step in range(W):
            block = self.block(step)
            sends, recvs, incoming, acc_in = [], [], [], None
            if step < W - 1:  # start moving the next block while this one is computed
                incoming = [
                    torch.empty(shape, dtype=t.dtype, device=t.device)
                    for shape, t in zip(payload_shapes(self.block(step + 1)), current)
                ]
                sends, recvs = list(current), list(incoming)
            if outgoing is not None:  # the previous step's accumulator, on to the rank that visits its block next
                sends.append(outgoing)
            if acc_shape is not None and step > 0:
                acc_in = torch.empty(acc_shape(block), dtype=acc_dtype, device=current[0].device)
                recvs.append(acc_in)
            transfers = self.post(sends, recvs, tag=8 * step)
            contribution = compute(block, current)
            for work in transfers:
                work.wait()
            outgoing = None  # sent: freed
            if acc_shape is not None:
                outgoing = contribution if acc_in is None else merge(contribution, acc_in)
            current = incoming
        if acc_shape is None:
            return None
        result = torch.empty(acc_shape(self.rank), dtype=acc_dtype, device=payload[0].device)
        for work in self.post([outgoing], [result], tag=8 * W):
            work.wait()
        return result

    def gathered(
        self,
        payload: list[torch.Tensor],
        sizes: list[int],
        compute: Callable[[int, list[torch.Tensor]], torch.Tensor | None],
        reduce: str | None,
    ) -> torch.Tensor | None:
        """What `Ring.run` returns, by collectives instead of the ring: every rank's payload gathered at once into
        one block of the whole global batch (`ALL`), computed here in one walk (so its tiles are not bounded by a
        rank's block), then the accumulators reduced to their owners: `reduce` "lse" merges them by log-sum-exp
        across ranks (forward's column statistics), "sum" adds them (backward's column gradients), None: there are
        none. Holds every rank's payload and accumulators at once."""
        top, equal = max(sizes), len(set(sizes)) == 1
        whole = []
        for t in payload:
            every = gather(_padded(t, top), self.group)  # (W * top, ...), each block padded to the largest
            if not equal:
                every = torch.cat([every[r * top : r * top + n] for r, n in enumerate(sizes)])
            whole.append(every)
        acc = compute(ALL, whole)
        del whole
        if reduce is None:
            return None
        if reduce == "lse":
            peak = acc.clone()
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.group)
            peak = torch.where(torch.isfinite(peak), peak, 0.0)
            acc = acc.sub_(peak).exp_()
        offset = sum(sizes[: self.rank])
        mine = slice(offset, offset + sizes[self.rank])
        if equal and dist.get_backend(self.group) != dist.Backend.GLOO:
            out = acc.new_empty((top, *acc.shape[1:]))
            dist.reduce_scatter_tensor(out, acc.contiguous(), group=self.group)
        else:  # gloo has no reduce-scatter, and unequal blocks do not split evenly: sum everything, keep ours
            dist.all_reduce(acc, group=self.group)
            out = acc[mine]
        if reduce == "lse":
            out = out.log_().add_(peak[mine])
        return out


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    out = x.new_zeros((rows, *x.shape[1:]))
    out[: x.shape[0]] = x
    return out


_HOST_GROUPS: dict = {}


def register_host_group(group, host_group) -> None:
    """A gloo group over the same ranks as `group` (None: the world), for the loss's one size exchange per call:
    on an NCCL group that exchange would copy device to host, a sync of the GPU stream."""
    _HOST_GROUPS[group] = host_group


def has_host_group(group) -> bool:
    """Whether `group` (None: the world) can run collectives of CPU tensors, which never wait for a GPU: it is gloo,
    or a gloo group was registered beside it."""
    return group in _HOST_GROUPS or dist.get_backend(group) == dist.Backend.GLOO


def host_group_of(group):
    """The group that runs `group`'s collectives of CPU tensors (where `has_host_group`)."""
    return _HOST_GROUPS.get(group, group)


def _exchange_sizes(local_size: int, group, device) -> list[int]:
    """Every rank's batch size, in rank order: on the CPU through a gloo group where there is one, else through
    the group's own device (one device-to-host copy)."""
    if has_host_group(group):
        return gather(torch.tensor([local_size], dtype=torch.int64), host_group_of(group)).tolist()
    return gather(torch.tensor([local_size], dtype=torch.int64, device=device), group).tolist()


ALL = -1  # the block of the whole global batch, every rank's rows in rank order (`Ring.gathered`)


class Layout:
    """Who owns which rows of the global batch, and the labels of all of them (`acc`: the dtype of the counts).
    A block is a rank's rows, or ALL: the whole global batch."""

    def __init__(self, ring: Ring, local_size: int, labels, device, acc: torch.dtype, uniform: bool = False):
        """`uniform`: every rank passes `local_size` rows (the training loader's batches), so no sizes travel."""
        if ring.world == 1 or uniform:
            sizes = [local_size] * ring.world
        else:
            sizes = _exchange_sizes(local_size, ring.group, device)
        self.rank = ring.rank
        self.sizes = sizes
        self.offsets = [sum(sizes[:r]) for r in range(len(sizes))]
        self.total = sum(sizes)
        self.labels = None
        self.counts = None  # per global sample: how many samples share its label (itself included)
        self.distinct = self.total  # how many distinct label ids (or samples)
        if labels is not None:
            if ring.world > 1:
                padded = torch.full((max(sizes),), -1, dtype=torch.int64, device=device)
                padded[:local_size] = labels
                gathered = gather(padded, ring.group).view(ring.world, -1)
                labels = torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])
            self.labels = labels
            _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
            self.counts = counts[inverse].to(acc)
            self.distinct = counts.numel()

    def offset(self, block: int) -> int:
        """Where `block` starts in the global batch."""
        return 0 if block == ALL else self.offsets[block]

    def rows(self, block: int, span: tuple[int, int]) -> slice:
        """Where rows span[0]:span[1] of `block` sit in the global batch."""
        return slice(self.offset(block) + span[0], self.offset(block) + span[1])

    def positives(self, col_block: int, r: tuple[int, int], c: tuple[int, int], device) -> torch.Tensor | None:
        """The positive mask of a tile (this rank's rows r against block `col_block`'s columns c): samples sharing a
        label, or without labels the global diagonal; None where a label-free tile misses the diagonal."""
        if self.labels is not None:
            return self.labels[self.rows(self.rank, r)][:, None] == self.labels[self.rows(col_block, c)][None, :]
        row0, col0 = self.offset(self.rank) + r[0], self.offset(col_block) + c[0]
        if row0 >= col0 + (c[1] - c[0]) or col0 >= row0 + (r[1] - r[0]):
            return None
        rows = torch.arange(row0, row0 + r[1] - r[0], device=device)
        cols = torch.arange(col0, col0 + c[1] - c[0], device=device)
        return rows[:, None] == cols[None, :]


def gather_batch(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor | None, group):
    """The global batch on every rank, for the whole-matrix paths: (a, b) with gradients back to their owners, and
    the labels. Every rank must pass the same B."""
    if not is_distributed(group):
        return a, b, labels
    labels = None if labels is None else gather(labels, group)
    return gather_with_grad(a, group), gather_with_grad(b, group), labels
