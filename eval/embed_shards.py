"""`tessera embed-shards`: a teacher's embeddings stored in the shards (MobileCLIP's reinforced datasets), so that a
student distils from them (`distill.teacher=stored`) without running the teacher.

    tessera embed-shards --model runs/teacher/model --data "shards/train-{000000..000009}.tar" --out shards-taught/

Each shard is copied into OUT under its own name, every member as it was and every key unchanged (pickle members and
samples the reader rejects, such as duplicate keys, are left out and counted), with one member
added per sample and modality the teacher has: `KEY.teacher-NAME.MODALITY.npy`, the teacher's unit embedding of the
sample (fp16, read back with allow_pickle=False), from the teacher's evaluation transform of the sample's first view
(its first caption). A sample whose modality does not decode gets no embedding of it (training skips it, counted).
OUT/teacher.json names the teacher (its path, NAME, the sha256 of its weights: `distill.teacher_hash`), its widths,
temperatures and biases, and what was embedded; OUT/sizes.json counts the samples. Shards are written under a
temporary name and renamed when complete, the manifest last; a rerun replaces them.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.config import ConfigError, to_dict
from tessera.data import BadSample, SampleStats, ShardError, decoders, expand_shards
from tessera.data.derived import TEACHER_MANIFEST, check_teacher_name, embedding_suffix
from tessera.data.loader import to_device
from tessera.data.shards import iter_raw_samples
from tessera.durable import atomic_write_bytes, fsync_path
from tessera.models.adapters import fingerprint

from .api import load as load_any

log = logging.getLogger(__name__)


def teacher_manifest(module, name: str, path: str) -> dict[str, Any]:
    """What a student needs to know of the teacher: its identity (the sha256 of its weights), its embedding width per
    modality, and its learned logit scale (and SigLIP bias) per pair."""
    biases = getattr(module, "logit_biases", None)
    pairs = {}
    for a, b in module.pairs:
        key = module.pair_name(a, b)
        bias = None if biases is None else float(biases[key].detach().reshape(-1)[0])
        pairs[key] = {"scale": float(module.logit_scale(a, b).detach()), "bias": bias}
    return {
        "name": name,
        "path": path,
        "hash": fingerprint(module),
        "widths": {m: module.output_dim for m in module.modalities},
        "pairs": pairs,
        "config": to_dict(module.cfg),
    }


class ShardEmbedder:
    """Embeds one shard's samples with the teacher, `batch_size` at a time, and writes the copy with the new members."""

    def __init__(self, module, name: str, batch_size: int, device):
        self.module, self.batch_size, self.device = module, batch_size, device
        self.modalities = module.modalities
        self.decoders = decoders(self.modalities)
        self.transforms = module.transforms(is_train=False)
        self.collators = module.collators()
        self.suffixes = {m: embedding_suffix(name, m) for m in self.modalities}
        self.embedded = dict.fromkeys(self.modalities, 0)
        self.failed: dict[str, int] = {}

    def _inputs(self, sample: dict[str, Any], m: str):
        decoder = self.decoders[m]
        if not decoder.present(sample):
            return None
        try:
            transform = self.transforms[m]
            return transform(decoder.first(decoder.decode_for(sample, transform)))
        except BadSample as exc:
            self.failed[f"{m}:{exc.reason}"] = self.failed.get(f"{m}:{exc.reason}", 0) + 1
            return None

    @torch.no_grad()
    def _embed(self, samples: list[dict[str, Any]]) -> None:
        """Add each sample's embeddings (as .npy members) to it, in place."""
        for m in self.modalities:
            inputs = [(i, x) for i, s in enumerate(samples) if (x := self._inputs(s, m)) is not None]
            if not inputs:
                continue
            batch = self.collators[m]([x for _, x in inputs])
            batch = to_device(batch, self.device)
            features = self.module.encode(m, batch).float().cpu().numpy().astype(np.float16)
            for (i, _), row in zip(inputs, features):
                buf = io.BytesIO()
                np.save(buf, row, allow_pickle=False)
                samples[i][self.suffixes[m]] = buf.getvalue()
            self.embedded[m] += len(inputs)

    def shard(self, url: str, out: Path, stats: SampleStats) -> int:
        """Copy shard `url` into `out` with the embeddings added; returns its sample count."""
        writer_cls = importlib.import_module("webdataset.writer").TarWriter
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        count, pending = 0, []
        writer = writer_cls(str(tmp), encoder=False)
        try:
            for sample in iter_raw_samples([url], stats):
                if "__bad__" in sample:  # a duplicate key, a member that failed to read: dropped, and counted
                    stats.skip(sample["__bad__"], url, sample.get("__key__"))
                    continue
                pending.append(sample)
                if len(pending) == self.batch_size:
                    count += self._write(writer, pending)
            count += self._write(writer, pending)
        finally:
            writer.close()
        fsync_path(tmp)
        os.replace(tmp, out)
        return count

    def _write(self, writer, samples: list[dict[str, Any]]) -> int:
        if not samples:
            return 0
        self._embed(samples)
        for s in samples:
            writer.write({"__key__": s["__key__"], **{k: v for k, v in s.items() if not k.startswith("__")}})
        n = len(samples)
        samples.clear()
        return n


def embed_shards(model: str, data: str, out: str | Path, name: str | None = None, batch_size: int = 256) -> dict:
    """Write every shard of `data` into `out` with `model`'s embeddings added (see the module docstring); returns
    the manifest written."""
    out = Path(out)
    urls = expand_shards(data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = load_any(model, device=device).module
    name = check_teacher_name(name or _slug(Path(str(model)).name))
    teacher = teacher_manifest(module, name, str(model))
    names = [Path(u).name for u in urls]
    if len(set(names)) != len(names):
        raise ConfigError(f"--data names shards of one file name in different folders: {sorted(names)[:4]}")
    if any(Path(u).resolve().parent == out.resolve() for u in urls if os.path.exists(u)):
        raise ConfigError(f"--out '{out}' holds the shards being read: write the copies elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    embedder = ShardEmbedder(module, name, batch_size, device)
    stats, sizes = SampleStats(), {}
    for i, (url, shard_name) in enumerate(zip(urls, names)):
        sizes[shard_name] = embedder.shard(url, out / shard_name, stats)
        log.info("%d/%d %s: %d samples", i + 1, len(urls), shard_name, sizes[shard_name])
    atomic_write_bytes(out / "sizes.json", json.dumps(sizes, indent=1, sort_keys=True).encode())
    manifest = {
        "teacher": teacher,
        "members": embedder.suffixes,
        "embedded": embedder.embedded,
        "not_embedded": embedder.failed,
        "samples": sum(sizes.values()),
        "source": data,
        "data": stats.to_dict(),
    }
    atomic_write_bytes(out / TEACHER_MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")[:64] or "teacher"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="tessera embed-shards",
        description="Copy shards with a teacher's embeddings added, for distill.teacher=stored.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--model", required=True, help="the teacher: a Tessera export, open_clip or transformers directory")
    p.add_argument("--data", required=True, help="the shards to embed (brace patterns, lists, directories)")
    p.add_argument("--out", required=True, help="the folder the copies and teacher.json are written into")
    p.add_argument("--name", default=None, help="the teacher's name in member names (default: from --model)")
    p.add_argument("--batch-size", type=int, default=256, help="samples embedded at once")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1:
        p.error("--batch-size must be positive")
    try:
        manifest = embed_shards(args.model, args.data, args.out, args.name, args.batch_size)
    except (ConfigError, ShardError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    teacher = manifest["teacher"]
    print(
        f"{manifest['samples']} samples embedded by {teacher['name']} into {args.out} "
        f"({', '.join(f'{m}: {n}' for m, n in manifest['embedded'].items())})\n"
        f"train on them with: distill.teacher=stored distill.teacher_hash={teacher['hash']} data.train={args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
