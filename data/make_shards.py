"""Write webdataset tar shards and `sizes.json` from a JSONL manifest.

    python -m tessera.data.make_shards --manifest samples.jsonl --out shards/ [--samples-per-shard 1000]
    tessera make-shards --manifest samples.jsonl --out shards/

One manifest line per sample. Paths are relative to the manifest's directory.

    {"key": "0001", "image": "img/0001.jpg", "text": "a red circle"}
    {"image": "img/0002.png", "captions": ["a cat", "a small cat"], "json": {"source": "x"}, "cls": 3}

- `key` (optional): the sample key; default: the zero-padded line number. Keys may not contain '.'.
- a modality name (`image`, ...): a file whose suffix that modality's decoder reads (jpg, png, ...).
- `text`: one caption (written as `.txt`); `captions`: several (written into `.json`).
- `json`: an object of metadata, written as `.json` (captions are merged into it).
- `cls`: an integer class id.
- `audio`: a flac, wav, ogg or mp3 file.
- `graph`: a numpy archive (`*.npz`, written as `.graph.npz`), a JSON file (`*.json`, written as `.graph.json`)
  or an inline object `{"x": [[...]], "edge_index": [[...], [...]], "edge_attr": [[...]]}`; `smiles`: a SMILES
  string (written as `.smi`, a molecular graph when RDKit is installed).

    {"audio": "clips/0003.flac", "text": "a dog barks twice"}
    {"graph": "mols/0004.npz", "text": "a six-membered ring"}
    {"graph": {"x": [[1.0], [1.0]], "edge_index": [[0, 1], [1, 0]]}, "text": "two joined nodes"}
    {"smiles": "c1ccccc1O", "text": "phenol"}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from webdataset.writer import TarWriter

from .decode import DECODERS, REJECTED_SUFFIXES, BadSample

TEXT_FIELDS = ("text", "captions", "json", "cls", "key", "smiles")
# graph files are written under the graph decoder's two-part suffixes, whatever their own names
GRAPH_SUFFIXES = {"npz": "graph.npz", "json": "graph.json", "smi": "smi"}


class ManifestError(ValueError):
    pass


def write_shards(samples: Iterable[tuple[str, dict[str, bytes]]], out_dir: str | Path, prefix: str = "shard",
                 samples_per_shard: int = 1000) -> dict[str, int]:
    """Write `(key, {suffix: bytes})` samples into `out_dir/prefix-NNNNNN.tar`; update `sizes.json`.

    Each shard is written under a temporary name and renamed when complete, so a crash never leaves a
    truncated shard under its final name. Returns {shard file name: sample count}.
    """
    if samples_per_shard <= 0:
        raise ValueError("samples_per_shard must be positive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
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
            writer, count = TarWriter(str(tmp_path), encoder=False), 0
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


def _file_suffix(path: Path) -> str:
    return path.name.split(".", 1)[1].lower() if "." in path.name else ""


def record_members(record: dict[str, Any], base: Path, verify: bool = False) -> dict[str, bytes]:
    """One manifest record -> its tar members `{suffix: bytes}`."""
    members: dict[str, bytes] = {}
    meta: dict[str, Any] = {}
    for field, value in record.items():
        if field in TEXT_FIELDS:
            continue
        if field not in DECODERS:
            raise ManifestError(f"unknown field '{field}' (modalities: {sorted(DECODERS)}; text fields: {TEXT_FIELDS})")
        if field == "graph" and isinstance(value, dict):
            members["graph.json"] = json.dumps(value).encode("utf-8")
            continue
        path = base / str(value)
        suffix = _file_suffix(path)
        if field == "graph":
            suffix = GRAPH_SUFFIXES.get(path.suffix.lstrip(".").lower(), suffix)
        decoder = DECODERS[field]
        if suffix not in decoder.suffixes:
            raise ManifestError(f"{field} file '{value}' has suffix '{suffix}'; {field} takes {decoder.suffixes}")
        if suffix in REJECTED_SUFFIXES:
            raise ManifestError(f"'{value}': {suffix} files need pickle and are never written")
        try:
            members[suffix] = path.read_bytes()
        except OSError as exc:
            raise ManifestError(f"cannot read {field} file '{value}': {exc.strerror}") from None
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise ManifestError("'text' must be a non-empty string")
        members["txt"] = record["text"].encode("utf-8")
    if "json" in record:
        if not isinstance(record["json"], dict):
            raise ManifestError("'json' must be an object")
        meta.update(record["json"])
    if "captions" in record:
        caps = record["captions"]
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise ManifestError("'captions' must be a non-empty list of non-empty strings")
        meta["captions"] = caps
    if meta:
        members["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    if "smiles" in record:
        if not isinstance(record["smiles"], str) or not record["smiles"].strip():
            raise ManifestError("'smiles' must be a non-empty string")
        members["smi"] = record["smiles"].strip().encode("utf-8")
    if "cls" in record:
        if isinstance(record["cls"], bool) or not isinstance(record["cls"], int):
            raise ManifestError("'cls' must be an integer")
        members["cls"] = str(record["cls"]).encode()
    if not members:
        raise ManifestError("record has no content")
    if verify:
        for modality, decoder in DECODERS.items():
            if decoder.present(members):
                try:
                    decoder.decode(members)
                except BadSample as exc:
                    raise ManifestError(f"{modality} does not decode: {exc}") from None
    return members


def read_manifest(path: Path, verify: bool, skip_bad: bool, counts: dict[str, int]) -> Iterator[tuple[str, dict]]:
    keys: set[str] = set()
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
                members = record_members(record, path.parent, verify)
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
    parser = argparse.ArgumentParser(prog="python -m tessera.data.make_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
        sizes = write_shards(read_manifest(args.manifest, args.verify, args.skip_bad, counts), args.out,
                             args.prefix, args.samples_per_shard)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not sizes:
        print("error: the manifest has no samples", file=sys.stderr)
        return 2
    spec = f"{args.out}/{args.prefix}-{{000000..{len(sizes) - 1:06d}}}.tar"
    print(f"wrote {counts.get('written', 0)} samples into {len(sizes)} shard(s); skipped {counts.get('skipped', 0)}")
    print(f"use: data.train={spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
