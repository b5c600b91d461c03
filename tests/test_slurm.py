"""Slurm without torchrun (`srun python -m tessera.train.pretrain ...` makes each task a rank), and what a run over
several nodes checks before it tries to connect them."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from tessera.train.distributed.slurm import SlurmError, expand_nodelist, torchrun_environment

from .conftest import PY, ROOT, finished
from .test_train import tiny_run_args


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("gpu01", ["gpu01"]),
        ("gpu[01-03,7]", ["gpu01", "gpu02", "gpu03", "gpu7"]),
        ("a[9-11],login,b[1]", ["a9", "a10", "a11", "login", "b1"]),
        ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
    ],
)
def test_node_lists_expand_as_scontrol_expands_them(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_slurm_variables_become_torchrun_s():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "node[003-004]",
        "SLURM_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_ID": "123456",
    }
    assert torchrun_environment(env) == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "node003",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }
    assert torchrun_environment({**env, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"
    assert torchrun_environment({**env, "RANK": "0"}) is None  # torchrun under srun: torchrun's own variables
    assert torchrun_environment({"PATH": "/bin"}) is None
    with pytest.raises(SlurmError, match="start the run with srun"):
        torchrun_environment({"SLURM_PROCID": "0"})
    with pytest.raises(SlurmError, match="host range"):
        torchrun_environment({**env, "SLURM_JOB_NODELIST": "node[a-b]"})


def _job_id_with_a_free_port() -> int:
    """A fake SLURM_JOB_ID whose derived port is free here."""
    for port in range(31000, 39999, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port - 20000
    raise AssertionError("no free port")


def _srun(args: list[str], job: int) -> list[subprocess.CompletedProcess]:
    """Two tasks of one node, as `srun --ntasks 2` starts them: no torchrun, Slurm's variables only."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_TASKS_PER_NODE": "2",
        "SLURM_NODEID": "0",
        "SLURM_JOB_ID": str(job),
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [PY, "-m", "tessera.train.pretrain", *args],
            cwd=ROOT,
            env={**base, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    return finished(procs)


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_slurm_tasks_train_checkpoint_and_resume(demo_shards, tmp_path):
    run = tmp_path / "run"
    args = tiny_run_args(demo_shards, run, "train.log_every=1", "data.val=[]", "deepspeed.zero_stage=1")
    first = _srun([*args, "train.steps=4"], _job_id_with_a_free_port())
    assert all(p.returncode == 0 for p in first), first[0].stderr[-3000:] + first[1].stderr[-3000:]
    assert "2 rank(s)" in first[0].stderr  # one world of the two tasks; each wrote its part of the checkpoint:
    assert (run / "checkpoints" / "step00000004" / "COMPLETE").read_text() == "2\n"
    again = _srun([*args, "train.steps=6", "resume=latest"], _job_id_with_a_free_port())
    assert all(p.returncode == 0 for p in again), again[0].stderr[-3000:] + again[1].stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_hostname_on_loopback_stops_a_multi_node_run_with_the_variable_to_set():
    from tessera.train.distributed.groups import loopback_problem

    nodes = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "node001"}

    def resolve(name):
        return "10.0.0.1" if name == "node001" else "127.0.1.1"

    said = loopback_problem(nodes, resolve=resolve)
    assert "resolves to 127.0.1.1, a loopback address" in said and "GLOO_SOCKET_IFNAME" in said
    assert loopback_problem({**nodes, "GLOO_SOCKET_IFNAME": "eth0"}, resolve=resolve) is None
    assert loopback_problem(nodes, resolve=lambda host: "10.0.0.7") is None
    assert loopback_problem({**nodes, "WORLD_SIZE": "8"}, resolve=resolve) is None  # one node
    assert loopback_problem(nodes, resolve=lambda host: "127.0.0.1") is None  # "nodes" all on this machine
