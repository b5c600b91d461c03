"""Batches onto the training device, the copy overlapping the step.

On CUDA a batch's host-to-device copy is issued on a side stream while the step before it runs; the step waits on an
event recorded after the copy (the GPU waits, the host does not), and the tensors are recorded on the compute stream
so that the caching allocator does not hand their memory to the side stream while the step still reads it. Off
CUDA, a batch is moved when it is taken.

A two-pass step's `Chunks` are moved whole when they take at most `RESIDENT_SHARE` of the device's memory, so that
each chunk crosses once and both passes read it there; a larger batch stays on the host and the step copies chunk
i+1 on the side stream while chunk i runs (`chunks_on`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .loader import to_device

RESIDENT_SHARE = 1 / 16  # of the device's memory: what a two-pass batch's inputs may take to stay there


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _tensors(v)
    elif getattr(batch, "stores", None) is not None:
        for store in batch.stores:
            yield from _tensors(dict(store))


def nbytes(batch: Any) -> int:
    """The bytes of the tensors in a batch (dicts, lists, PyG batches)."""
    return sum(t.numel() * t.element_size() for t in _tensors(batch))


class _Copy:
    """One item's copy onto a CUDA device (`_move`), issued on `stream`; `take()` makes the current stream wait for
    it."""

    def __init__(self, item: Any, device: torch.device, dtype, stream, resident_bytes: int = 1 << 62) -> None:
        with torch.cuda.stream(stream):
            self.moved = _move(item, device, dtype, resident_bytes)
            self.done = torch.cuda.Event()
            self.done.record(stream)

    def take(self) -> Any:
        current = torch.cuda.current_stream()
        current.wait_event(self.done)
        for t in _tensors(self.moved):
            if t.is_cuda:
                t.record_stream(current)
        return self.moved


def _side_stream(device: torch.device):
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def _move(batch: Any, device: torch.device, dtype, resident_bytes: int) -> Any:
    """`to_device` for one loader item; `Chunks` (a list) are moved whole only when they fit `resident_bytes`."""
    if isinstance(batch, list):
        if nbytes(batch) > resident_bytes:
            return batch
        return type(batch)(to_device(chunk, device, dtype) for chunk in batch)
    return to_device(batch, device, dtype)


class DeviceFeed:
    """The items of `loader` on `device`: `take()` hands out the next one (waiting for its copy on the device, not
    the host), `ahead()` fetches the one after from the loader and issues its copy. The training loop calls
    `ahead()` right after a step is queued, so the copy runs while the step does."""

    def __init__(self, loader: Iterable[Any], device: torch.device, dtype=None) -> None:
        self.loader, self.device, self.dtype = iter(loader), torch.device(device), dtype
        self.stream = _side_stream(self.device)
        self.resident_bytes = (
            int(torch.cuda.get_device_properties(self.device).total_memory * RESIDENT_SHARE)
            if self.device.type == "cuda"
            else 1 << 62
        )
        self._next: _Copy | Any = None
        self._has_next = False

    def ahead(self) -> None:
        """Fetch the next item from the loader (the host waits for it here) and issue its copy."""
        if self._has_next:
            return
        item = next(self.loader)
        if self.stream is not None:
            item = _Copy(item, self.device, self.dtype, self.stream, self.resident_bytes)
        self._next, self._has_next = item, True

    def take(self) -> Any:
        self.ahead()
        item, self._next, self._has_next = self._next, None, False
        if isinstance(item, _Copy):
            return item.take()
        return _move(item, self.device, self.dtype, self.resident_bytes)


def chunks_on(chunks: list[Any], device: torch.device, dtype=None) -> Iterator[Any]:
    """`chunks` (dicts of tensors) on `device`, one after the other. Chunks already there are not copied; on CUDA,
    chunk i+1's copy is issued on a side stream before chunk i is handed out, so it overlaps chunk i's work."""
    device = torch.device(device)
    stream = _side_stream(device)
    if stream is None:
        for chunk in chunks:
            yield to_device(chunk, device, dtype)
        return
    pending = _Copy(chunks[0], device, dtype, stream) if chunks else None
    for i in range(len(chunks)):
        current = pending
        pending = _Copy(chunks[i + 1], device, dtype, stream) if i + 1 < len(chunks) else None
        yield current.take()
