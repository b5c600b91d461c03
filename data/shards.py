"""Shard lists and raw samples: expansion, partitioning over ranks and workers, and tar reading.

Opening urls, iterating tar members and splitting member names are webdataset's (`gopen`,
`tar_file_iterator`, `base_plus_ext`); this module adds the accounting around them: read failures,
truncated shards and duplicate keys are counted rather than raised or silently dropped, and
pickle-bearing members are never read.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from tessera.config import UserError

from .decode import REJECTED_SUFFIXES
from .stats import SampleStats

log = logging.getLogger(__name__)


class ShardError(UserError, ValueError):
    """A shard specification that names no readable shard."""


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace-expanded (`{000..099}`), '::'-joined, globbed or directory shard specs -> list of shard urls. A
    directory of a CLIP_benchmark webdataset (`nshards.txt`) gives the shards that file counts (see
    `benchmark_shards`).

    Local paths must exist; remote urls (`pipe:`, `s3://`, ...) are passed through to webdataset.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for pattern in patterns:
        for url in expand_urls(pattern):
            if _is_local(url) and os.path.isdir(url):
                found = sorted(glob.glob(os.path.join(url, "*.tar"))) or benchmark_shards(url)
                if not found:
                    raise ShardError(f"directory '{url}' holds no .tar shards")
                urls.extend(found)
            elif _is_local(url) and any(c in url for c in "*?["):
                found = sorted(glob.glob(url))
                if not found:
                    raise ShardError(f"'{url}' matches no file")
                urls.extend(found)
            else:
                urls.append(url)
    if not urls:
        raise ShardError(f"shard spec {spec!r} names no shard")
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        raise ShardError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[:3]} (from {spec!r})")
    return urls


def benchmark_root(path: str | Path) -> Path | None:
    """The dataset root of a CLIP_benchmark webdataset (`nshards.txt` in each split folder, `classnames.txt`,
    `dataset_type.txt` ... at the root) that `path` names: the root itself or one of its splits; else None."""
    path = Path(path)
    if (path / "nshards.txt").is_file():
        return path.parent
    if (path / "test" / "nshards.txt").is_file():
        return path
    return None


def benchmark_shards(path: str | Path, split: str = "test") -> list[str]:
    """The shards of a CLIP_benchmark split, `{0..n-1}.tar` with n from its `nshards.txt`: of `path` itself when it
    is a split folder, else of its `split` folder (CLIP_benchmark's default, test, said in the log); [] when it is
    neither. A folder with .tar files of its own is read as those (`expand_shards`)."""
    folder = Path(path) if (Path(path) / "nshards.txt").is_file() else Path(path) / split
    if not (folder / "nshards.txt").is_file():
        return []
    if folder != Path(path):
        log.info("%s is a CLIP_benchmark dataset: reading its %s split (%s)", path, split, folder)
    text = (folder / "nshards.txt").read_text().strip()
    if not text.isdigit() or int(text) < 1:
        raise ShardError(f"{folder / 'nshards.txt'} must hold a positive shard count, not {text[:40]!r}")
    return [str(folder / f"{i}.tar") for i in range(int(text))]


def shard_sizes(urls: list[str]) -> dict[str, int]:
    """Sample counts per local shard from the `sizes.json` files beside them (shards not listed are absent)."""
    sizes: dict[str, int] = {}
    cache: dict[Path, dict[str, Any]] = {}
    for url in urls:
        if not _is_local(url):
            continue
        path = Path(url)
        sizes_path = path.parent / "sizes.json"
        if sizes_path not in cache:
            try:
                doc = json.loads(sizes_path.read_text())
            except (OSError, json.JSONDecodeError):
                doc = {}
            cache[sizes_path] = doc if isinstance(doc, dict) else {}
        count = cache[sizes_path].get(path.name)
        if isinstance(count, int) and not isinstance(count, bool):
            sizes[url] = count
    return sizes


@dataclass(frozen=True)
class Split:
    """What one loader worker reads: whole shards, and which samples of them (stride/offset)."""

    shards: list[str]
    sample_stride: int = 1
    sample_offset: int = 0


def split_shards(urls: list[str], rank: int, world: int, worker: int, num_workers: int) -> Split:
    """Partition shards over ranks x workers; with too few shards, fall back to splitting samples.

    With at least one shard per (rank, worker) slot each slot reads whole shards. With fewer shards than
    slots but at least one per rank, a rank's workers share its shards and take every num_workers-th
    sample. With fewer shards than ranks, every slot reads every shard and takes every slots-th sample.
    No slot is ever left without data, so no rank waits on another that has nothing to read.
    """
    slots = world * num_workers
    slot = rank * num_workers + worker
    if len(urls) >= slots:
        return Split(urls[slot::slots])
    if len(urls) >= world:
        return Split(urls[rank::world], num_workers, worker)
    return Split(list(urls), slots, slot)


def _member_filter(stats: SampleStats):
    def select(fname: str) -> bool:
        _, suffix = base_plus_ext(fname)
        if suffix is not None and suffix.lower() in REJECTED_SUFFIXES:
            stats.event("rejected_pickle_member")
            return False
        return True

    return select


def _until_damage(url: str, members: Iterator[dict[str, Any]], stats: SampleStats) -> Iterator[dict[str, Any]]:
    """`members` of shard `url` up to where it fails to read: a shard that cannot be opened, or breaks off
    mid-member, is counted once as `shard_read_error`, and the members read before the damage are kept."""
    try:
        yield from members
    except (tarfile.TarError, OSError, EOFError) as exc:
        stats.event("shard_read_error", shard=url)
        log.warning("shard %s failed to read (%s); keeping the samples before the damage", url, exc)


def _shard_members(url: str, stats: SampleStats) -> Iterator[dict[str, Any]]:
    """Members `{fname, data}` of one shard, up to any damage (`_until_damage`)."""

    def read() -> Iterator[dict[str, Any]]:
        with gopen(url, "rb") as stream:
            yield from tar_file_iterator(stream, select_files=_member_filter(stats))

    return _until_damage(url, read(), stats)


COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (tar_file_iterator's skip_meta)


def member_extents(url: str, stats: SampleStats) -> Iterator[dict[str, Any]]:
    """Members `{fname, data: (offset, size)}` of one local, uncompressed shard: where each member's bytes lie, for
    reading a sample by seeking to it. The members kept are those `iter_raw_samples` reads (regular files, no
    webdataset metadata, no pickles); a shard that breaks off is counted as `shard_read_error`, keeping the members
    before the damage. A remote or compressed shard has no offsets to seek to: ShardError."""
    if not _is_local(url):
        raise ShardError(f"'{url}' is not a local file: reading samples by offset needs local shards")
    try:
        with open(url, "rb") as fh:
            head = fh.read(6)
    except OSError as exc:
        raise ShardError(f"cannot read shard '{url}': {exc.strerror or exc}") from exc
    kind = next((name for magic, name in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)
    if kind is not None:
        raise ShardError(f"'{url}' is {kind}-compressed: reading samples by offset needs uncompressed tar shards")
    select = _member_filter(stats)
    end = os.path.getsize(url)

    def read() -> Iterator[dict[str, Any]]:
        with tarfile.open(url, mode="r:") as tar:
            for info in tar:
                if info.offset_data + info.size > end:
                    raise EOFError(f"member {info.name} runs past the end of the file")
                if info.isreg() and not META_MEMBER.match(info.name) and select(info.name):
                    yield {"fname": info.name, "data": (info.offset_data, info.size)}

    yield from _until_damage(url, read(), stats)


def iter_raw_samples(
    urls: Iterable[str], stats: SampleStats, sizes: dict[str, int] | None = None
) -> Iterator[dict[str, Any]]:
    """Raw samples `{__key__, __url__, __index__, suffix: bytes}` from the shards, in order (`__index__`: the
    sample's position in its shard); see `group_samples`."""
    sizes = sizes or {}
    for url in urls:
        yield from group_samples(url, _shard_members(url, stats), stats, sizes.get(url))


def group_samples(
    url: str, members: Iterable[dict[str, Any]], stats: SampleStats, expected: int | None = None
) -> Iterator[dict[str, Any]]:
    """The samples of one visit of shard `url`, from its members `{fname, data}` in tar order.

    Members are grouped into samples by key as webdataset does (adjacent members sharing the name up
    to the first dot). Each visit of a shard is grouped on its own, so resampling the same shard twice
    in a row yields its samples twice. Within one visit:
    - a key seen again comes out as a marker `{__key__, __url__, __index__, __bad__: "duplicate_key"}` without its
      members, for the consumer to count as a skipped sample;
    - a repeated member of one sample is dropped and counted (`duplicate_member`);
    - fewer samples than `expected` (the shard's `sizes` entry: a tar cut at a member boundary reads as a shorter,
      valid tar) counts the difference as `samples_missing_from_shard`.
    """
    keys: set[str] = set()
    held = 0
    current: dict[str, Any] | None = None
    for member in itertools.chain(members, [None]):
        prefix, suffix = base_plus_ext(member["fname"]) if member is not None else (None, None)
        if member is not None and prefix is None:
            continue
        if current is not None and (member is None or prefix != current["__key__"]):
            held += 1
            if current["__key__"] in keys:
                yield {"__key__": current["__key__"], "__url__": url, "__index__": held - 1, "__bad__": "duplicate_key"}
            else:
                keys.add(current["__key__"])
                current["__index__"] = held - 1
                yield current
            current = None
        if member is None:
            break
        if current is None:
            current = {"__key__": prefix, "__url__": url}
        suffix = suffix.lower()
        if suffix in current:
            stats.event("duplicate_member", shard=url)
            continue
        current[suffix] = member["data"]
    if expected is not None and held < expected:
        stats.event("samples_missing_from_shard", expected - held, shard=url)
        log.warning("shard %s held %d samples, sizes.json says %d", url, held, expected)
