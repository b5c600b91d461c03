"""Counting of skipped samples by reason, shipped from loader workers to the training loop with each batch."""

from __future__ import annotations

from collections import Counter
from typing import Any

from tessera.config import UserError


class DataQualityError(UserError, RuntimeError):
    """Too many bad samples, or no usable sample at all: the message says which reasons and where."""


MAX_EXAMPLES = 20  # skipped samples named (shard, key, reason), per process and in a message


class SampleStats:
    """`seen` samples, `skipped[reason]` of them skipped, and `events[name]` that are not samples
    (a shard that failed to read, a rejected pickle member, samples left in a dropped partial batch). Each skip and
    event is also counted against its shard (`shards`), and the first skipped samples are named (`examples`)."""

    def __init__(self) -> None:
        self.seen = 0
        self.skipped: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.shards: Counter[str] = Counter()
        self.examples: list[str] = []

    def skip(self, reason: str, shard: str | None = None, key: str | None = None) -> None:
        self.skipped[reason] += 1
        if shard is not None:
            self.shards[shard] += 1
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(f"{shard}:{key} ({reason})")

    def event(self, name: str, n: int = 1, shard: str | None = None) -> None:
        self.events[name] += n
        if shard is not None:
            self.shards[shard] += n

    @property
    def bad(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "skipped": dict(self.skipped),
            "events": dict(self.events),
            "shards": dict(self.shards),
            "examples": list(self.examples),
        }

    def take(self) -> dict[str, Any]:
        """Return the counts so far and reset them (a worker ships deltas)."""
        out = self.to_dict()
        self.seen = 0
        self.skipped.clear()
        self.events.clear()
        self.shards.clear()
        self.examples = []
        return out

    def merge(self, delta: dict[str, Any]) -> None:
        self.seen += delta.get("seen", 0)
        self.skipped.update(delta.get("skipped", {}))
        self.events.update(delta.get("events", {}))
        self.shards.update(delta.get("shards", {}))
        self.examples.extend(delta.get("examples", [])[: MAX_EXAMPLES - len(self.examples)])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleStats:
        stats = cls()
        stats.merge(d)
        return stats

    def summary(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        events = ", ".join(f"{k}={v}" for k, v in sorted(self.events.items()))
        text = f"{self.bad}/{self.seen} samples skipped ({reasons})" + (f"; events: {events}" if events else "")
        if self.shards:
            worst = ", ".join(f"{url} ({n})" for url, n in self.shards.most_common(5))
            more = f" and {len(self.shards) - 5} more" if len(self.shards) > 5 else ""
            text += f"; by shard: {worst}{more}"
        if self.examples:
            text += f"; e.g. {'; '.join(self.examples[:5])}"
        return text

    def check(self, max_fraction: float, min_seen: int, where: str) -> None:
        """Raise DataQualityError once enough samples were seen and the bad fraction passes the limit."""
        if self.seen >= min_seen and self.seen > 0 and self.bad / self.seen > max_fraction:
            raise DataQualityError(
                f"{where}: {self.bad / self.seen:.1%} of samples are bad, above data.max_bad_fraction="
                f"{max_fraction}: {self.summary()}. Fix or remove the shards, or raise data.max_bad_fraction."
            )
