"""`srun python -m tessera.train.pretrain ...` without torchrun: torchrun's variables from Slurm's.

Each task Slurm starts is one rank: RANK from SLURM_PROCID, WORLD_SIZE from the step's task count, LOCAL_RANK from
SLURM_LOCALID, LOCAL_WORLD_SIZE from the tasks on this node; the rendezvous is the first host of the job's node list
(its bracket syntax expanded here, without `scontrol`) at a port derived from SLURM_JOB_ID, unless MASTER_ADDR or
MASTER_PORT are set. Nothing changes under torchrun (RANK already set) or outside srun. Imports nothing heavy."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from tessera.config import UserError

PORT_BASE, PORT_SPAN = 20000, 20000  # ports 20000-39999, by job id


class SlurmError(UserError, ValueError):
    """Slurm's variables say something this module cannot read."""


def _split_top(text: str) -> list[str]:
    """`text` split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += c == "["
        depth -= c == "]"
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list as hosts: `gpu[01-03,7],login` -> gpu01, gpu02, gpu03, gpu7, login. Ranges keep
    their zero padding; a name may hold several bracket groups (`rack[1-2]-n[1-2]`)."""
    hosts: list[str] = []
    for part in _split_top(nodelist.strip()):
        names = [""]
        for literal, group in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            choices = [literal]
            if group:
                choices = []
                for item in group.split(","):
                    lo, _, hi = item.partition("-")
                    if not lo.isdigit() or (hi and not hi.isdigit()):
                        raise SlurmError(f"cannot read the host range [{group}] in SLURM_JOB_NODELIST={nodelist!r}")
                    width = len(lo)
                    choices += [literal + str(n).zfill(width) for n in range(int(lo), int(hi or lo) + 1)]
            names = [n + c for n in names for c in choices]
        hosts.extend(names)
    return hosts


def _tasks_on_node(spec: str, node: int) -> int:
    """From SLURM_STEP_TASKS_PER_NODE's form (`2(x3),1`: 2 tasks on each of the first three nodes, then 1), the tasks
    on node number `node`."""
    seen = 0
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if m is None:
            raise SlurmError(f"cannot read tasks per node {spec!r}")
        seen += int(m.group(2) or 1)
        if node < seen:
            return int(m.group(1))
    raise SlurmError(f"node {node} is beyond the tasks per node {spec!r}")


def torchrun_environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """The variables torchrun would set, for a task that srun started; None under torchrun or outside srun."""
    if "RANK" in env or "SLURM_PROCID" not in env:
        return None
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if world is None or nodelist is None:
        raise SlurmError("SLURM_PROCID is set but not SLURM_NTASKS and SLURM_JOB_NODELIST: start the run with srun")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    nodes = expand_nodelist(nodelist)
    local_world = _tasks_on_node(per_node, int(env.get("SLURM_NODEID", 0))) if per_node else int(world) // len(nodes)
    port = env.get("MASTER_PORT") or str(PORT_BASE + int(env.get("SLURM_JOB_ID", "0") or 0) % PORT_SPAN)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(max(1, local_world)),
        "MASTER_ADDR": env.get("MASTER_ADDR") or nodes[0],
        "MASTER_PORT": port,
    }


def adopt_slurm() -> None:
    """Under srun without torchrun: set torchrun's variables in this process's environment from Slurm's."""
    os.environ.update(torchrun_environment(os.environ) or {})
