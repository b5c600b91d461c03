"""What a run writes as it goes: `metrics.jsonl`, tensorboard events, and a progress bar (rank 0 only)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from tessera.data.stats import MAX_EXAMPLES

from ..distributed.groups import gather_objects


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def _lines_up_to(path: Path, step: int) -> list[str]:
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the crash
    return kept


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self._bar = None
        self._tb = None
        self._fh = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        # A resumed run keeps the lines up to its checkpoint and drops those a crashed run wrote after it.
        kept = _lines_up_to(path, start_step) if start_step else []
        self._fh = open(path, "w", encoding="utf-8")
        self._fh.writelines(kept)
        self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        # In a log file rather than a terminal, a bar redrawn every step would bury everything else.
        interactive = sys.stderr.isatty()
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=0.1 if interactive else 30.0,
        )

    def log(self, step: int, record: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        line = {"step": step, "kind": kind, "time": round(time.time(), 3), **record}
        self._fh.write(json.dumps(line) + "\n")
        self._fh.flush()
        for name, value in _flatten(record).items():
            self._tb.add_scalar(f"{kind}/{name}", value, step)

    def progress(self, step: int, **postfix: Any) -> None:
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix(
                {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False
            )
        self._bar.update(step - self._bar.n)  # redraws at most every mininterval

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._fh is not None:
            self._fh.close()


class Window:
    """Sums of per-micro-step scalars between two log steps, and the training time they took.

    Values are summed as detached tensors and turned into numbers only in `means()` (on a GPU `.item()`
    is a sync point). Each key is averaged over the micro-steps that reported it: with per-source batching a
    pair's loss exists only in the steps whose source carries that pair. Time spent in `paused()` blocks (evaluation,
    checkpoints) is not training time; time in `waiting()` blocks (the step waiting for its batch from the loader)
    is training time, counted apart as `waited`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.count = 0
        self.start = time.perf_counter()
        self.excluded = 0.0
        self.waited = 0.0

    def add(self, values: dict[str, Any], weight: torch.Tensor | None = None) -> None:
        """Add one micro-step's values; `weight` (a device scalar, 1.0 or 0.0) keeps a skipped step's out without
        the host reading it."""
        for key, value in values.items():
            value = value.detach().float()
            if weight is not None:
                value = torch.where(weight > 0, value, 0.0)
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0.0) + (1.0 if weight is None else weight)
        self.count += 1

    def means(self) -> dict[str, float]:
        """Each key's mean over the micro-steps that reported it (NaN where every one was skipped)."""
        return {k: float(torch.as_tensor(v, dtype=torch.float64) / self.counts[k]) for k, v in self.sums.items()}

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    @contextlib.contextmanager
    def waiting(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.waited += time.perf_counter() - t0

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0


def data_counts(stats: dict[str, Any]) -> dict[str, Any]:
    """Bad-sample counts (a `SampleStats.to_dict()`) summed over ranks (a collective)."""
    total: dict[str, Any] = {"seen": 0, "skipped": {}, "events": {}, "shards": {}, "examples": []}
    for rank_stats in gather_objects(stats):
        total["seen"] += rank_stats["seen"]
        for group in ("skipped", "events", "shards"):
            for k, v in rank_stats.get(group, {}).items():
                total[group][k] = total[group].get(k, 0) + v
        total["examples"] += rank_stats.get("examples", [])[: MAX_EXAMPLES - len(total["examples"])]
    return total
