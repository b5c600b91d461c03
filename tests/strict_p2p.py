"""NCCL's point-to-point rules, enforced on gloo: a test mode that turns a ring NCCL would deadlock into an error.

Gloo buffers a send, so a send completes whether or not the peer has posted its receive. NCCL does not, above a
small buffered size: the groups one rank posts run in order on its stream, and a group finishes only when every
peer it sends to or receives from is running the group holding the matching operation. NCCL pairs the messages
between two ranks by order, not by tag. `install()` replaces `torch.distributed.batch_isend_irecv` with that model:

- the data still moves through gloo (so results are real), posted at once;
- alongside, each rank replays its groups in order on a thread of its own, its "stream": a group at the head
  announces its operations in the process group's TCP store and finishes when the peers have announced the matching
  operations (the n-th send from r to s meets the n-th receive on s from r) from their own head groups;
- `wait()` on any operation of a group returns when that group has finished; a group that waits longer than
  `timeout` seconds raises `P2PDeadlock` (on its stream, and on every later wait of that rank) instead of hanging.

Every message is treated as above the buffered size, as the 4 MB accumulators of a real ring are.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from datetime import timedelta
from queue import Queue

import torch.distributed as dist

_original = dist.batch_isend_irecv


class P2PDeadlock(RuntimeError):
    pass


class _Stream:
    def __init__(self, timeout: float):
        self.rank = dist.get_rank()
        self.timeout = timeout
        self.sent: Counter = Counter()
        self.received: Counter = Counter()
        self.groups = 0
        self.error: str | None = None
        self.queue: Queue = Queue()
        # a client of its own, so the stream thread never shares a socket with the process group
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=60)
        )
        threading.Thread(target=self._run, daemon=True).start()

    def post(self, ops: list) -> threading.Event:
        """Name each operation by the message it is half of; queue the group on this rank's stream."""
        names = []
        for op in ops:
            peer = op.peer
            if op.op in (dist.isend, dist.send):
                names.append((f"{self.rank}>{peer}#{self.sent[peer]}", "send", "recv"))
                self.sent[peer] += 1
            else:
                names.append((f"{peer}>{self.rank}#{self.received[peer]}", "recv", "send"))
                self.received[peer] += 1
        done = threading.Event()
        self.queue.put((self.groups, names, done))
        self.groups += 1
        return done

    def _run(self) -> None:
        while True:
            index, names, done = self.queue.get()
            if self.error is None:
                for message, mine, _ in names:
                    self.store.set(f"strict_p2p/{message}/{mine}", str(index))
                waiting = [f"strict_p2p/{message}/{theirs}" for message, _, theirs in names]
                try:
                    self.store.wait(waiting, timedelta(seconds=self.timeout))
                except Exception:  # the store's timeout: some peer never reached the matching operation
                    try:
                        missing = ", ".join(k.split("/", 1)[1] for k in waiting if not self.store.check([k]))
                    except Exception:  # the store has gone (its host rank gave up first)
                        missing = "the store is gone"
                    self.error = (
                        f"rank {self.rank}: point-to-point group {index} waited {self.timeout:.0f} s for its peers' "
                        f"matching operations ({missing}): under NCCL this ring deadlocks"
                    )
            done.set()


class _Work:
    def __init__(self, work, done: threading.Event, stream: _Stream):
        self.work, self.done, self.stream = work, done, stream

    def wait(self, timeout=None) -> bool:
        # first: a peer that gave up on a deadlock closes its side of gloo's transfer
        if not self.done.wait(self.stream.timeout + 60):
            raise P2PDeadlock(f"rank {self.stream.rank}: the strict point-to-point stream stopped")
        if self.stream.error is not None:
            raise P2PDeadlock(self.stream.error)
        return self.work.wait()

    def is_completed(self) -> bool:
        return self.done.is_set() and self.work.is_completed()


_STREAM: _Stream | None = None


def install(timeout: float = 10.0) -> None:
    """Enforce NCCL's rules on this process's point-to-point groups (after `init_process_group`)."""
    global _STREAM
    _STREAM = _Stream(timeout)

    def strict_batch_isend_irecv(ops: list) -> list:
        works = _original(ops)  # first: a group gloo refuses raises here, before the stream waits on its peers
        done = _STREAM.post(ops)
        return [_Work(w, done, _STREAM) for w in works]

    dist.batch_isend_irecv = strict_batch_isend_irecv
