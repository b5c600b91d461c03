"""What a run writes as it goes: `metrics.jsonl`, tensorboard events, a W&B run, and a progress bar (rank 0 only)."""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from tessera.config import MissingExtra, UserError
from tessera.data.stats import MAX_EXAMPLES

from ..distributed.groups import gather_objects
from ..recipes.config import LogConfig, WandbConfig


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
    """Rank 0's record of a run: every `log` call is a line of metrics.jsonl and, for the trackers `log.report_to`
    names, the same finite scalars (nested keys joined by `/`, under the line's kind: `train/loss`,
    `eval/metrics/image_to_text_R@1`) at the same step. `resumed`: what `state_dict` returned when the checkpoint a
    resumed run starts from was saved (the W&B run's id, so the run continues)."""

    def __init__(
        self,
        out_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        log: LogConfig | None = None,
        run_config: dict[str, Any] | None = None,
        resumed: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self._bar = None
        self._tb = None
        self._wandb: WandbRun | None = None
        self._fh = None
        if not enabled:
            return
        log = log or LogConfig()
        out_dir.mkdir(parents=True, exist_ok=True)
        if "wandb" in log.report_to:  # first: a run W&B refuses leaves the files as they were
            self._wandb = WandbRun(log.wandb, out_dir, run_config or {}, (resumed or {}).get("wandb_id"))
        path = out_dir / "metrics.jsonl"
        # A resumed run keeps the lines up to its checkpoint and drops those a crashed run wrote after it.
        kept = _lines_up_to(path, start_step) if start_step else []
        self._fh = open(path, "w", encoding="utf-8")
        self._fh.writelines(kept)
        if "tensorboard" in log.report_to:
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
        scalars = {f"{kind}/{name}": value for name, value in _flatten(record).items()}
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(step, scalars)
            if kind.startswith("eval") and "metrics" in record:
                self._wandb.table(step, f"{kind}/retrieval", retrieval_rows(record))

    def images(self, step: int, name: str, paths: list[Path]) -> None:
        """Plots (an evaluation's R@K curves, its confusion matrices) as media of the W&B run, if there is one."""
        if self._wandb is not None and paths:
            self._wandb.images(step, name, paths)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps for a resumed run to continue this record (rank 0's; empty elsewhere)."""
        return {"wandb_id": self._wandb.id} if self._wandb is not None else {}

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
        if self._wandb is not None:
            self._wandb.close()
        if self._fh is not None:
            self._fh.close()
        self._bar = self._tb = self._wandb = self._fh = None
        self.enabled = False


RETRIEVAL_COLUMNS = ("direction", "R@1", "R@5", "R@10", "mAP@10", "chance R@1")


def retrieval_rows(record: dict[str, Any]) -> list[list[Any]]:
    """An evaluation record's retrieval metrics as table rows: one per direction (`image_to_text`, ...)."""
    metrics, chance = record["metrics"], record.get("chance", {})
    directions = sorted(k.removesuffix("_mAP@10") for k in metrics if k.endswith("_mAP@10"))
    return [
        [d, *(metrics.get(f"{d}_{m}") for m in ("R@1", "R@5", "R@10", "mAP@10")), chance.get(f"{d}_R@1")]
        for d in directions
    ]


def require_wandb() -> None:
    """Raise MissingExtra, with how to install it, unless the `wandb` package imports."""
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(
            f"log.report_to names wandb, but the wandb package does not import ({exc}): pip install -e '.[wandb]' "
            "(or leave wandb out of log.report_to)"
        ) from None


class WandbRun:
    """One W&B run for the whole training, resumed under the same id. Our step is the x-axis of every chart (the
    `step` metric), not W&B's own `_step`: a run resumed from an earlier checkpoint than its last log line logs those
    steps again, where W&B's `_step` must only grow."""

    def __init__(self, cfg: WandbConfig, out_dir: Path, run_config: dict[str, Any], run_id: str | None):
        require_wandb()
        import wandb

        self._wandb = wandb
        self.id = run_id or secrets.token_hex(4)  # W&B run ids: short, lowercase letters and digits
        try:
            self._run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or out_dir.resolve().name,
                tags=list(cfg.tags),
                mode=cfg.mode,
                dir=str(out_dir),
                id=self.id,
                resume="allow",
                config=run_config,
                # Tessera's own log lines and progress bar stay on the terminal as they are
                settings=wandb.Settings(console="off"),
            )
        except wandb.errors.Error as exc:  # not logged in, no network, a project it may not write to
            raise UserError(
                f"log.report_to: wandb could not start the run: {exc} (run `wandb login` or set WANDB_API_KEY; "
                "log.wandb.mode=offline logs without a server)"
            ) from None
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log({"step": step, **scalars})

    def table(self, step: int, name: str, rows: list[list[Any]]) -> None:
        self._run.log({"step": step, name: self._wandb.Table(columns=list(RETRIEVAL_COLUMNS), data=rows)})

    def images(self, step: int, name: str, paths: list[Path]) -> None:
        self._run.log({"step": step, **{f"{name}/{p.stem}": self._wandb.Image(str(p)) for p in paths}})

    def close(self) -> None:
        self._run.finish()


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
