"""What a run writes as it goes: `metrics.jsonl`, tensorboard events, and a progress bar (rank 0 only)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self._bar = None
        self._tb = None
        self._fh = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        # a resumed run appends; a fresh run in an old directory starts the file anew
        self._fh = open(out_dir / "metrics.jsonl", "a" if start_step else "w", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

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
        self._bar.n = step
        if postfix:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                  refresh=False)
        self._bar.refresh()

    def write(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._fh is not None:
            self._fh.close()
