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
from collections.abc import Callable, Iterable, Iterator
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


def open_shard(url: str):
    """A shard's bytes as a binary file: local paths directly (seekable), anything else through webdataset's
    `gopen` (`pipe:`, URLs). Every shard read goes through here."""
    return open(url, "rb") if _is_local(url) else gopen(url, "rb")  # noqa: SIM115 (the caller closes it)


def _shard_members(url: str, stats: SampleStats) -> Iterator[dict[str, Any]]:
    """Members `{fname, data}` of one shard, up to any damage (`_until_damage`)."""

    def read() -> Iterator[dict[str, Any]]:
        with open_shard(url) as stream:
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
        kind = _compression(url)
    except OSError as exc:
        raise ShardError(f"cannot read shard '{url}': {exc.strerror or exc}") from exc
    if kind is not None:
        raise ShardError(f"'{url}' is {kind}-compressed: reading samples by offset needs uncompressed tar shards")
    select = _member_filter(stats)
    end = os.path.getsize(url)

    def read() -> Iterator[dict[str, Any]]:
        with open_shard(url) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            for info in tar:
                if info.offset_data + info.size > end:
                    raise EOFError(f"member {info.name} runs past the end of the file")
                if info.isreg() and not META_MEMBER.match(info.name) and select(info.name):
                    yield {"fname": info.name, "data": (info.offset_data, info.size)}

    yield from _until_damage(url, read(), stats)


COMPRESSED_SUFFIXES = (".gz", ".tgz", ".bz2", ".xz", ".zst", ".zstd")


def seekable(url: str, look: bool = True) -> bool:
    """Whether samples of shard `url` can be read by offset: a local, uncompressed tar. `look`: read its first bytes
    to tell (else its name says, which costs no file open: for the log about thousands of shards)."""
    if not _is_local(url):
        return False
    if not look:
        return not url.lower().endswith(COMPRESSED_SUFFIXES)
    try:
        return _compression(url) is None
    except OSError:
        return False


def _compression(path: str) -> str | None:
    """The compression a local shard's first bytes show (gzip, bzip2, xz, zstd), or None for a plain tar."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    return next((name for magic, name in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def read_extent(fh, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of an open shard; EOFError where it ends before them."""
    fh.seek(offset)
    data = fh.read(size)
    if len(data) != size:
        raise EOFError(f"ends after {len(data)} of {size} bytes")
    return data


STAND_IN = "__stand_in__"  # marks a sample known by position only: its shard was not opened (`Ahead`)


class Ahead:
    """A resumed stream's way past the samples consumed before its checkpoint, without reading them.

    While `on`, `iter_raw_samples` yields, for every shard whose sample count it knows, stand-ins
    `{__url__, __index__, STAND_IN: True}` in place of its samples, and leaves the shard unopened. Once the stream has
    reached its position, `on` goes off: the next sample is read from where the stand-ins stopped, by offset in a local
    uncompressed shard, by reading and dropping the samples before it in any other; and `fill` reads the stand-ins
    the stream still holds (its shuffle buffer) in place. The counts are `counts` (what reading the shards to their end
    found, as the checkpoint records it), else sizes.json's; a shard whose count neither gives is read."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.on = True
        self.counts = counts


def _gated(members: Iterable[dict[str, Any]], wanted: Callable[[int], bool], read, gate: _Gate):
    """`members` of one shard in tar order, each numbered by its sample as `group_samples` groups them: members of
    samples `wanted` says no to come with `data` None (unread), the others with `read(data)`; `gate` opens at the first
    member wanted, so that `group_samples` counts the events of the samples read, not of those passed over."""
    number, key = -1, None
    for member in members:
        prefix, _ = base_plus_ext(member["fname"])
        if prefix is not None and prefix != key:
            number, key = number + 1, prefix
        if prefix is None or not wanted(number):
            gate.live = False
            yield {"fname": member["fname"], "data": None}
            continue
        gate.live = True
        yield {"fname": member["fname"], "data": read(member["data"])}


class _Gate:
    """A `SampleStats` stand-in that passes events on only while `live`."""

    def __init__(self, stats: SampleStats) -> None:
        self.stats, self.live = stats, False

    def event(self, *args, **kwargs) -> None:
        if self.live:
            self.stats.event(*args, **kwargs)


def _some_samples(
    url: str, wanted: Callable[[int], bool], stats: SampleStats, expected: int | None = None
) -> Iterator[dict[str, Any]]:
    """The samples of shard `url` whose index `wanted` accepts, with the duplicate-key markers and counts the whole
    shard's reading gives them. A seekable shard's other samples are not read (their members' headers are)."""
    gate = _Gate(stats)
    if seekable(url):
        fh = open_shard(url)
        members = _gated(member_extents(url, gate), wanted, lambda extent: read_extent(fh, *extent), gate)
    else:
        fh = None
        members = _gated(_shard_members(url, gate), wanted, lambda data: data, gate)
    try:
        for sample in group_samples(url, members, gate, expected):
            if wanted(sample["__index__"]):
                yield sample
    finally:
        if fh is not None:
            fh.close()


def fill(stand_ins: Iterable[dict[str, Any]]) -> None:
    """Read the samples `stand_ins` name, in place (their other keys are kept; a resampled shard may be named twice).
    One whose shard turns out shorter becomes a `__bad__` marker."""
    by_url: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for s in stand_ins:
        by_url.setdefault(s["__url__"], {}).setdefault(s["__index__"], []).append(s)
    for url, wanted in by_url.items():
        last = max(wanted)
        for sample in _some_samples(url, wanted.__contains__, SampleStats()):  # counted when first read
            for s in wanted.pop(sample["__index__"]):
                s.update(sample)
                s.pop(STAND_IN)
            if sample["__index__"] >= last:
                break
        for s in itertools.chain.from_iterable(wanted.values()):
            s.update({"__key__": f"{url}#{s['__index__']}", "__bad__": "missing_from_shard"})
            s.pop(STAND_IN)


def iter_raw_samples(
    urls: Iterable[str],
    stats: SampleStats,
    sizes: dict[str, int] | None = None,
    ahead: Ahead | None = None,
    counted: dict[str, int] | None = None,
) -> Iterator[dict[str, Any]]:
    """Raw samples `{__key__, __url__, __index__, suffix: bytes}` from the shards, in order (`__index__`: the
    sample's position in its shard); see `group_samples`. `ahead`: a resume passing over what it had consumed
    (`Ahead`). `counted` gets the sample count of every shard read to its end."""
    sizes = sizes or {}
    for url in urls:
        known = None if ahead is None else ahead.counts.get(url, sizes.get(url))
        start = 0
        if ahead is not None and known is not None:
            while start < known and ahead.on:
                yield {"__url__": url, "__index__": start, STAND_IN: True}
                start += 1
            if start == known:
                continue
        if start:
            samples = _some_samples(url, start.__le__, stats, sizes.get(url))
        else:
            samples = group_samples(url, _shard_members(url, stats), stats, sizes.get(url), counted)
        yield from samples


def group_samples(
    url: str,
    members: Iterable[dict[str, Any]],
    stats: SampleStats,
    expected: int | None = None,
    counted: dict[str, int] | None = None,
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
    `counted[url]` gets the number of samples once the visit ends.
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
    if counted is not None:
        counted[url] = held
    if expected is not None and held < expected:
        stats.event("samples_missing_from_shard", expected - held, shard=url)
        log.warning("shard %s held %d samples, sizes.json says %d", url, held, expected)
