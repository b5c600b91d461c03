"""Few-shot subsets: k labelled samples per class, chosen deterministically from `cls`-labelled shards and copied
into one shard of their own, which the ordinary loader then reads. Choosing reads only the `cls` members, so
nothing else is decoded twice."""

from __future__ import annotations

import logging
from pathlib import Path

from .decode import BadSample
from .label import LabelDecoder
from .make_shards import write_shards
from .pipeline import seeded_rng
from .shards import ShardError, expand_shards, iter_raw_samples
from .stats import SampleStats

log = logging.getLogger(__name__)
SHOTS_PREFIX = "shots"


def write_shots(shard_specs: list[str | list[str]], k: int, num_classes: int, seed: int, out_dir: Path) -> str:
    """Copy k samples of every class (fewer where a class has fewer) into `out_dir`; return their shard spec."""
    urls = [u for spec in shard_specs for u in expand_shards(spec)]
    labels = LabelDecoder()
    by_class: dict[int, list[str]] = {}
    for sample in iter_raw_samples(urls, SampleStats()):
        try:
            label = labels.decode(sample) if labels.present(sample) else None
        except BadSample:
            label = None
        if label is not None and 0 <= label < num_classes:
            by_class.setdefault(label, []).append(sample["__key__"])
    if not by_class:
        raise ShardError(f"fewshot: no sample in {shard_specs} has a `cls` label in [0, {num_classes})")
    rng = seeded_rng(seed, "shots")
    chosen = {
        key for label in sorted(by_class) for key in rng.sample(sorted(by_class[label]), min(k, len(by_class[label])))
    }
    short = {c: len(by_class.get(c, [])) for c in range(num_classes) if len(by_class.get(c, [])) < k}
    if short:
        log.warning("fewshot: fewer than %d shots for classes %s (samples available: %s)", k, sorted(short), short)
    samples = (
        (s["__key__"], {m: v for m, v in s.items() if not m.startswith("__")})
        for s in iter_raw_samples(urls, SampleStats())
        if s["__key__"] in chosen
    )
    write_shards(samples, out_dir, SHOTS_PREFIX, samples_per_shard=max(1, len(chosen)))
    return str(out_dir / f"{SHOTS_PREFIX}-000000.tar")
