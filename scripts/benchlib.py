"""Helpers shared by the benchmark scripts: peak resident memory of a stretch of code, free memory, and launching a
run whose first step is timed from its output as it is printed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def status_kib(key: str, pid: int | str = "self") -> int:
    """A field of /proc/PID/status (this process's by default), in KiB (VmRSS: resident now; VmHWM: peak since the
    last reset)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def children() -> set[int]:
    """The pids of this process's children (a DataLoader's workers among them)."""
    pids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        pids.update(int(p) for p in (task / "children").read_text().split())
    return pids


def reset_peak() -> int:
    """Reset the peak-RSS counter (VmHWM) and return the resident set now, in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS")


def meminfo_gib(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(key)


@dataclass
class Launched:
    output: str
    started: float  # time.time() just before the launch
    first_match: float | None  # seconds from the launch to the first line matching `first`; None: no such line


def launch(cmd: list[str], log: Path, cwd: Path, first: re.Pattern | None = None) -> Launched:
    """Run `cmd` to its end, reading its output (stdout and stderr) as it is printed, so that the first line matching
    `first` is timed when it appears, not when the run ends. The output goes to `log`; a failed run raises."""
    started = time.time()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, first_match = [], None
    for line in proc.stdout:
        lines.append(line)
        if first_match is None and first is not None and first.search(line):
            first_match = time.time() - started
    proc.wait()
    log.write_text(f"$ {' '.join(cmd)}\n# wall {time.time() - started:.1f}s\n{''.join(lines)}")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[2]} failed (exit {proc.returncode}); see {log}")
    return Launched("".join(lines), started, first_match)


def first_logged_step(metrics: Path, started: float) -> float:
    """Seconds from `started` to the wall-clock `time` of Tessera's first metrics.jsonl record."""
    return json.loads(metrics.read_text().splitlines()[0])["time"] - started
