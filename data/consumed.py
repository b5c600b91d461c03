"""Which samples of an epoch are already spoken for, by shard and position, whatever the rank and worker layout.

A resumed run on the same layout replays each worker's stream to its cursor. On another layout (a different number
of ranks or workers) the streams are different, so the position is carried as a set instead: the samples each rank
consumed (by shard URL and index within the shard), plus whole slots of shards for a rank that had already finished
the epoch. The new layout's workers leave those samples out of their streams, so the epoch continues with no sample
seen twice and none lost.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Iterable


class SampleSet:
    """Samples by (shard URL, index within the shard): a bitmap per shard, and per shard any (stride, offset) rules
    that take every stride-th sample from offset (a worker's share of a shard; (1, 0) is the whole shard)."""

    def __init__(self) -> None:
        self.bits: dict[str, bytearray] = {}
        self.rules: dict[str, set[tuple[int, int]]] = {}

    def __bool__(self) -> bool:
        return bool(self.bits) or bool(self.rules)

    def add(self, url: str, index: int) -> None:
        bits = self.bits.setdefault(url, bytearray())
        byte = index >> 3
        if byte >= len(bits):
            bits.extend(bytes(byte + 1 - len(bits)))
        bits[byte] |= 1 << (index & 7)

    def add_all(self, taken: Iterable[tuple[str, int]]) -> None:
        for url, index in taken:
            self.add(url, index)

    def add_rule(self, url: str, stride: int = 1, offset: int = 0) -> None:
        self.rules.setdefault(url, set()).add((stride, offset))

    def whole(self, url: str) -> bool:
        return (1, 0) in self.rules.get(url, ())

    def __contains__(self, sample: tuple[str, int]) -> bool:
        url, index = sample
        bits = self.bits.get(url)
        if bits is not None and index >> 3 < len(bits) and bits[index >> 3] >> (index & 7) & 1:
            return True
        return any(index % stride == offset for stride, offset in self.rules.get(url, ()))

    def update(self, other: SampleSet) -> None:
        for url, bits in other.bits.items():
            mine = self.bits.setdefault(url, bytearray())
            if len(mine) < len(bits):
                mine.extend(bytes(len(bits) - len(mine)))
            for i, b in enumerate(bits):
                mine[i] |= b
        for url, rules in other.rules.items():
            self.rules.setdefault(url, set()).update(rules)

    def count(self) -> int:
        """Samples in the bitmaps (the rules' are not counted: their shards' sizes may be unknown)."""
        return sum(bin(b).count("1") for bits in self.bits.values() for b in bits)

    def to_state(self) -> dict:
        """Plain strings and lists (a checkpoint loads them with torch.load(weights_only=True))."""
        return {
            "bits": {u: base64.b64encode(zlib.compress(bytes(b))).decode("ascii") for u, b in self.bits.items()},
            "rules": {u: sorted([s, o] for s, o in r) for u, r in self.rules.items()},
        }

    @classmethod
    def from_state(cls, state: dict | None) -> SampleSet:
        out = cls()
        for url, text in (state or {}).get("bits", {}).items():
            out.bits[url] = bytearray(zlib.decompress(base64.b64decode(text)))
        for url, rules in (state or {}).get("rules", {}).items():
            out.rules[url] = {(int(s), int(o)) for s, o in rules}
        return out
