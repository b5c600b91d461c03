"""Loader workers: they stay from one epoch to the next, their memory stays flat, and their default count follows
the cores."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tessera.data import DataConfig, loader

from .test_pipeline import _epoch_keys, _loader, tiny_model  # noqa: F401 (a fixture)


def _children() -> set[int]:
    """The pids of this process's children (its loader workers among them)."""
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_workers_persist_across_epochs_and_read_each_epochs_order(tiny_model, demo_shards):  # noqa: F811
    spec = str(demo_shards / "train-txt-{000000..000003}.tar")
    before = _children()
    run = _loader(tiny_model, spec, workers=2, seed=4)
    first, opens_second = _epoch_keys(run, 0)
    workers = _children() - before
    assert len(workers) == 2
    second, _ = _epoch_keys(run, 1)
    second = opens_second + second
    _epoch_keys(run, 2)
    assert _children() - before == workers  # the same two processes, three epochs on
    assert first != second
    # epoch 1 as a loader that starts there streams it: the persistent workers were told which epoch began
    fresh = _loader(tiny_model, spec, workers=2, seed=4)
    fresh.load_state_dict({**fresh.state_dict(), "epoch": 1})
    assert _epoch_keys(fresh, 1)[0] == second
    run.close()
    fresh.close()


def test_a_workers_memory_stays_flat_over_many_epochs(tiny_model, demo_shards):  # noqa: F811
    """RSS after 10,000 samples is within 10% of RSS after 2,000 (42 epochs of the demo's 240, in one worker; on
    this data it grows about 5% up to 5,000 samples, then stays; scripts/bench_data.py measures 20,000 photos)."""
    before = _children()
    run = _loader(tiny_model, str(demo_shards / "train-txt-{000000..000003}.tar"), workers=1, batch_size=64)
    seen, rss = 0, {}
    for mark in (2_000, 10_000):
        while seen < mark:
            seen += len(next(run)["__key__"])
        (worker,) = _children() - before
        rss[mark] = _rss_kib(worker)
    run.close()
    assert rss[10_000] <= 1.10 * rss[2_000], rss


@pytest.mark.parametrize("cores,local,expected", [(16, 1, 15), (16, 8, 1), (64, 2, 16), (2, 1, 1), (1, 1, 1)], ids=str)
def test_the_default_worker_count_follows_the_cores_per_local_rank(monkeypatch, caplog, cores, local, expected):
    assert DataConfig().num_workers == "auto"
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    with caplog.at_level(logging.INFO, logger="tessera.data.loader"):
        assert loader.auto_workers() == expected
    assert f"{expected} loader worker(s) per rank" in caplog.text
    assert loader.auto_workers(shares=3) == max(1, expected // 3)  # per-source batching shares the cores out
    monkeypatch.setenv("SLURM_PROCID", "0")  # srun gave this task its own CPUs (--cpus-per-task)
    assert loader.auto_workers() == max(1, min(cores - 1, 16))
