"""Helpers shared by the benchmark scripts: peak resident memory of a stretch of code, and free memory."""

from __future__ import annotations

from pathlib import Path


def status_kib(key: str) -> int:
    """A field of /proc/self/status, in KiB (VmRSS: resident now; VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> int:
    """Reset the peak-RSS counter (VmHWM) and return the resident set now, in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS")


def meminfo_gib(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(key)
