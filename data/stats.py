"""Counting of skipped samples by reason, shipped from loader workers to the training loop with each batch."""

from __future__ import annotations

from collections import Counter
from typing import Any


class DataQualityError(RuntimeError):
    """Too many bad samples, or no usable sample at all: the message says which reasons and where."""


class SampleStats:
    """`seen` samples, `skipped[reason]` of them skipped, and `events[name]` that are not samples
    (a shard that failed to read, a rejected pickle member, samples left in a dropped partial batch)."""

    def __init__(self) -> None:
        self.seen = 0
        self.skipped: Counter[str] = Counter()
        self.events: Counter[str] = Counter()

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def event(self, name: str, n: int = 1) -> None:
        self.events[name] += n

    @property
    def bad(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": dict(self.skipped), "events": dict(self.events)}

    def take(self) -> dict[str, Any]:
        """Return the counts so far and reset them (a worker ships deltas)."""
        out = self.to_dict()
        self.seen = 0
        self.skipped.clear()
        self.events.clear()
        return out

    def merge(self, delta: dict[str, Any]) -> None:
        self.seen += delta.get("seen", 0)
        self.skipped.update(delta.get("skipped", {}))
        self.events.update(delta.get("events", {}))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleStats:
        stats = cls()
        stats.merge(d)
        return stats

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        events = ", ".join(f"{k}={v}" for k, v in sorted(self.events.items()))
        return f"{self.bad}/{self.seen} samples skipped ({reasons})" + (f"; events: {events}" if events else "")

    def check(self, max_fraction: float, min_seen: int, where: str) -> None:
        """Raise DataQualityError once enough samples were seen and the bad fraction passes the limit."""
        if self.seen >= min_seen and self.seen > 0 and self.bad / self.seen > max_fraction:
            raise DataQualityError(
                f"{where}: {self.bad / self.seen:.1%} of samples are bad, above data.max_bad_fraction="
                f"{max_fraction}: {self.summary()}. Fix or remove the shards, or raise data.max_bad_fraction."
            )
