"""Process-group setup for torchrun (or a plain single process), and small collective helpers."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tessera.losses import register_host_group

from .deepspeed_setup import deepspeed
from .slurm import adopt_slurm


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the torchrun process group (gloo on CPU, nccl on GPU), or Slurm's (srun without torchrun:
    `slurm.adopt_slurm`); a plain process becomes a world of one.

    DeepSpeed always wants a process group, so a single process gets a local one as well.
    """
    adopt_slurm()
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
        if dist.get_backend() != dist.Backend.GLOO and dist.get_world_size() > 1:
            # CPU collectives (the loss's per-rank sizes, the guard's stop requests) without a device-to-host copy
            register_host_group(None, dist.new_group(backend="gloo"))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def restart_hazard() -> str | None:
    """A warning for `torchrun --max-restarts` over the rendezvous TCP store that torchrun shares with its workers by
    default: that store outlives a restart, and a restarted rank can read a dead peer's address from the attempt
    before it (pytorch/pytorch#135712), then fail to connect until the process-group timeout (DEEPSPEED_TIMEOUT
    minutes). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 every attempt gets a fresh store."""
    if (
        int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
        and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    ):
        return (
            "torchrun --max-restarts with its shared rendezvous store: a restarted rank may try a dead peer's address "
            "(pytorch#135712); launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that each attempt has a fresh store"
        )
    return None


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over ranks in one collective (a sync point: call it at log steps only)."""
    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
