"""Write webdataset tar shards and `sizes.json` from a JSONL manifest.

    python -m tessera.data.make_shards --manifest samples.jsonl --out shards/ [--samples-per-shard 1000]
    tessera make-shards --manifest samples.jsonl --out shards/

One manifest line per sample. Paths are relative to the manifest's directory.

    {"key": "0001", "image": "img/0001.jpg", "text": "a red circle"}
    {"image": "img/0002.png", "captions": ["a cat", "a small cat"], "json": {"source": "x"}, "cls": 3}

- `key` (optional): the sample key; default: the zero-padded line number. Keys may not contain '.'.
- `json`: an object of metadata, written as `.json` (captions given as `captions` are merged into it).
- every other field belongs to a modality: the modality's name, whose value is a file that modality's decoder
  reads (an image for `image`, a flac/wav/ogg/mp3 file for `audio`, ...), or one of the modality's own fields
  (`text`, `captions`, `cls`, `smiles`, inline graphs). `--help` lists them, as each modality declares them.

    {"audio": "clips/0003.flac", "text": "a dog barks twice"}
    {"graph": "mols/0004.npz", "text": "a six-membered ring"}
    {"graph": {"x": [[1.0], [1.0]], "edge_index": [[0, 1], [1, 0]]}, "text": "two joined nodes"}
    {"smiles": "c1ccccc1O", "text": "phenol"}
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tessera.modalities import MODALITIES

from .decode import REJECTED_SUFFIXES, BadSample, Decoder, ManifestError, decoders

GENERIC_FIELDS = ("key", "json")  # the sample key, and metadata; every other field belongs to a modality


def write_shards(
    samples: Iterable[tuple[str, dict[str, bytes]]],
    out_dir: str | Path,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
) -> dict[str, int]:
    """Write `(key, {suffix: bytes})` samples into `out_dir/prefix-NNNNNN.tar`; update `sizes.json`.

    Each shard is written under a temporary name and renamed when complete, so a crash never leaves a
    truncated shard under its final name. Returns {shard file name: sample count}.
    """
    if samples_per_shard <= 0:
        raise ValueError("samples_per_shard must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    tar_writer = importlib.import_module("webdataset.writer").TarWriter  # webdataset imports torch: not for --help
    writer, tmp_path, name, count = None, None, None, 0

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            os.replace(tmp_path, out_dir / name)
            sizes[name] = count
            writer = None

    for key, members in samples:
        if writer is None or count >= samples_per_shard:
            close()
            name = f"{prefix}-{len(sizes):06d}.tar"
            tmp_path = out_dir / f".{name}.tmp"
            writer, count = tar_writer(str(tmp_path), encoder=False), 0
        writer.write({"__key__": key, **members})
        count += 1
    close()
    sizes_path = out_dir / "sizes.json"
    merged = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
    merged.update(sizes)
    tmp = sizes_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
    os.replace(tmp, sizes_path)
    return sizes


def field_decoders() -> dict[str, Decoder]:
    """Manifest field -> the decoder of the modality that writes it: each modality's name and its own fields."""
    out = {}
    for name, decoder in decoders(list(MODALITIES)).items():
        for field in (name, *decoder.manifest_fields):
            out[field] = decoder
    return out


def record_members(
    record: dict[str, Any], base: Path, verify: bool = False, fields: dict[str, Decoder] | None = None
) -> dict[str, bytes]:
    """One manifest record -> its tar members `{suffix: bytes}`."""
    fields = field_decoders() if fields is None else fields
    members: dict[str, bytes] = {}
    meta: dict[str, Any] = {}
    if "json" in record:
        if not isinstance(record["json"], dict):
            raise ManifestError("'json' must be an object")
        meta.update(record["json"])
    for field, value in record.items():
        if field in GENERIC_FIELDS:
            continue
        if field not in fields:
            raise ManifestError(f"unknown field '{field}' (fields: {sorted([*fields, *GENERIC_FIELDS])})")
        for suffix, content in fields[field].members(field, value, base).items():
            if suffix == "json":
                meta.update(content)
                continue
            if suffix in REJECTED_SUFFIXES:
                raise ManifestError(f"'{value}': {suffix} files need pickle and are never written")
            members[suffix] = content
    if meta:
        members["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    if not members:
        raise ManifestError("record has no content")
    if verify:
        for decoder in {id(d): d for d in fields.values()}.values():
            if decoder.present(members):
                try:
                    decoder.decode(members)
                except BadSample as exc:
                    raise ManifestError(f"{decoder.modality} does not decode: {exc}") from None
    return members


def fields_help() -> str:
    """The manifest fields of every modality, as their decoders describe them."""
    lines = ["manifest fields by modality:"]
    for name, decoder in decoders(list(MODALITIES)).items():
        fields = ", ".join(f"`{f}`" for f in dict.fromkeys((name, *decoder.manifest_fields)))
        doc = " ".join((type(decoder).members.__doc__ or Decoder.members.__doc__).split())
        lines.append(f"  {name} ({fields}; members {', '.join(decoder.suffixes)}): {doc}")
    return "\n".join(lines)


def read_manifest(path: Path, verify: bool, skip_bad: bool, counts: dict[str, int]) -> Iterator[tuple[str, dict]]:
    keys: set[str] = set()
    fields = field_decoders()
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ManifestError("line is not a JSON object")
                key = str(record.get("key", f"{lineno:09d}"))
                if "." in key or "/" in key or not key:
                    raise ManifestError(f"key '{key}' may not be empty or contain '.' or '/'")
                if key in keys:
                    raise ManifestError(f"duplicate key '{key}'")
                members = record_members(record, path.parent, verify, fields)
            except (json.JSONDecodeError, ManifestError) as exc:
                if not skip_bad:
                    raise ManifestError(f"{path}:{lineno}: {exc}") from None
                counts["skipped"] = counts.get("skipped", 0) + 1
                print(f"skipping {path}:{lineno}: {exc}", file=sys.stderr)
                continue
            keys.add(key)
            counts["written"] = counts.get("written", 0) + 1
            yield key, members


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tessera.data.make_shards",
        description=__doc__,
        epilog=fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--manifest", required=True, type=Path, help="JSONL file, one sample per line")
    parser.add_argument("--out", required=True, type=Path, help="output directory for shards and sizes.json")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--verify", action="store_true", help="decode every sample before writing it")
    parser.add_argument("--skip-bad", action="store_true", help="skip (and count) bad lines instead of stopping")
    args = parser.parse_args(argv)
    if not args.manifest.is_file():
        parser.error(f"manifest '{args.manifest}' does not exist")
    if args.samples_per_shard <= 0:
        parser.error("--samples-per-shard must be positive")
    counts: dict[str, int] = {}
    try:
        sizes = write_shards(
            read_manifest(args.manifest, args.verify, args.skip_bad, counts),
            args.out,
            args.prefix,
            args.samples_per_shard,
        )
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not sizes:
        print("error: the manifest has no samples", file=sys.stderr)
        return 2
    spec = f"{args.out}/{args.prefix}-{{000000..{len(sizes) - 1:06d}}}.tar"
    print(f"wrote {counts.get('written', 0)} samples into {len(sizes)} shard(s); skipped {counts.get('skipped', 0)}")
    print(f"use: {shlex.quote(f'data.train={spec}')}")  # quoted: a shell would expand the {a..b} braces
    return 0


if __name__ == "__main__":
    sys.exit(main())
