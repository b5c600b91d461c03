"""Process-group setup for torchrun (or a plain single process), and small collective helpers."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tessera.config import UserError
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
        backend = "nccl" if device.type == "cuda" else "gloo"
        if problem := loopback_problem(os.environ):
            raise DistributedSetupError(problem)
        _init_per_attempt(backend)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)  # joins the group made above, if any
        if dist.get_backend() != dist.Backend.GLOO and dist.get_world_size() > 1:
            # CPU collectives (the loss's per-rank sizes, the guard's stop requests) without a device-to-host copy
            register_host_group(None, dist.new_group(backend="gloo"))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


class DistributedSetupError(UserError, RuntimeError):
    """The machines' setup keeps the ranks from reaching each other; the message says what to set."""


def loopback_problem(env, resolve=socket.gethostbyname) -> str | None:
    """Why gloo would hand the other nodes an address they cannot reach (None when it would not): a run over several
    nodes (WORLD_SIZE above LOCAL_WORLD_SIZE) uses gloo (the CPU backend, and on GPUs the side group for small CPU
    collectives), which advertises the address this host's name resolves to; where that is a loopback address
    (127.x, as /etc/hosts often maps the hostname) and GLOO_SOCKET_IFNAME names no interface, the ranks of other
    nodes try to connect to themselves."""
    if env.get("GLOO_SOCKET_IFNAME") or int(env.get("WORLD_SIZE", 1)) <= int(env.get("LOCAL_WORLD_SIZE", 1)):
        return None
    host = socket.gethostname()
    try:
        address = resolve(host)
        master = resolve(env.get("MASTER_ADDR", "127.0.0.1"))
    except OSError:
        return None  # gloo will say what it cannot resolve
    if not address.startswith("127.") or master.startswith("127."):
        return None  # a reachable address; or the "nodes" are all on this machine (their master is on loopback)
    return (
        f"this host's name {host!r} resolves to {address}, a loopback address, so gloo would give the other nodes an "
        "address they cannot reach: set GLOO_SOCKET_IFNAME to the network interface the nodes share (e.g. "
        "GLOO_SOCKET_IFNAME=eth0 or ib0; `ip -br addr` lists them), or map the hostname to that interface's address"
    )


def _init_per_attempt(backend: str) -> None:
    """Under torchrun's default, where its agent shares the rendezvous store with the ranks
    (TORCHELASTIC_USE_AGENT_STORE), make the process group over that store with keys of this restart attempt's own
    (TORCHELASTIC_RESTART_COUNT). The store outlives a restart, and torch's env:// reads it with no prefix per
    attempt: a restarted rank would take a dead peer's address from the attempt before and fail to connect, or wait
    on it until the process-group timeout (pytorch#135712). Elsewhere deepspeed.init_distributed does env://."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    default_pg_timeout = deepspeed.constants.default_pg_timeout  # DEEPSPEED_TIMEOUT, as DeepSpeed's own init uses
    shared = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=default_pg_timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"tessera/attempt{attempt}", shared)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=default_pg_timeout)


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
