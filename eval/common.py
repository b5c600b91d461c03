"""What the evaluation entry points share: loading the model to evaluate (with its adapter), eval mode, outputs
named as CLIP_benchmark names them. Their command lines are in `tessera.eval.commands`."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from tessera import modalities
from tessera.data.shards import benchmark_root
from tessera.durable import atomic_write_bytes
from tessera.models import ConfigError, load_model
from tessera.models.adapters import load_adapter, merge_adapter


def figure(**kwargs):
    """A matplotlib Figure (no pyplot: no global backend). matplotlib is imported at the first plot, not with the
    evaluation code that training imports."""
    return importlib.import_module("matplotlib.figure").Figure(**kwargs)


def load(args: argparse.Namespace):
    """(model, device): the exported model (with --adapter merged into it, serving --truncate-dim features) on the
    GPU when there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = load_model(args.model, device=device)
        if getattr(args, "adapter", None):
            # prompt vectors are made on the CPU: the adapted model goes to the device as a whole
            model = merge_adapter(load_adapter(model, args.adapter)).to(device).eval()
        if getattr(args, "truncate_dim", None) is not None:
            model.truncate(args.truncate_dim)
    except ConfigError as exc:  # a bad model or adapter directory: say which, exit 2 like argparse
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None
    return model, device


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, then back in whichever mode it was (training calls eval mid-run)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class NoSamples(ValueError):
    """The evaluation data has no sample that carries what was asked for (a pair, or a modality with labels)."""


def sources_with(sources: Sequence, modalities: Sequence[str], extra: Sequence[str] = ()) -> list:
    """The sources (`SourceConfig`s) whose samples carry all of `modalities`, set to decode exactly those (plus
    `extra`, e.g. the label). A source that declares no modalities is taken to carry whatever is asked for;
    one that declares them (e.g. an audio-text source in a joint run) is used only for pairs it covers."""
    picked = [
        dataclasses.replace(s, modalities=[*modalities, *extra])
        for s in sources
        if s.modalities is None or all(m in s.modalities for m in modalities)
    ]
    if not picked:
        raise NoSamples(
            f"no evaluation source carries {'+'.join(modalities)} (sources: "
            + ", ".join(f"{s.name}: {'+'.join(s.modalities or ['?'])}" for s in sources)
            + ")"
        )
    return picked


def benchmark_fields(data: Sequence[str], model, task: str) -> dict[str, str]:
    """The fields CLIP_benchmark's result JSON starts with (its `build` command reads them): the dataset is
    `wds/<name>` for a CLIP_benchmark webdataset, else the shard specs; `pretrained` names the checkpoint within a
    model, which for an export is the export itself."""
    roots = [benchmark_root(d) if Path(d).is_dir() else None for d in data]
    dataset = f"wds/{roots[0].name}" if len(roots) == 1 and roots[0] is not None else " ".join(data)
    return {"dataset": dataset, "model": str(model), "pretrained": "tessera", "task": task, "language": "en"}


def output_path(out: str | Path, doc: dict) -> Path:
    """`out`, or for a directory (existing, or written with a trailing slash) the file in it that CLIP_benchmark
    would name: {dataset}_{pretrained}_{model}_{language}_{task}.json."""
    if not (Path(out).is_dir() or str(out).endswith("/")):
        return Path(out)

    def slug(s: str) -> str:
        return s.removeprefix("wds/").strip("/").replace("/", "_").replace(" ", "_")

    dataset, model = slug(doc["dataset"]), slug(doc["model"])
    if len(dataset) > 80:  # many shard paths: a file name has at most 255 bytes
        dataset = f"{dataset[:60]}-{hashlib.sha1(dataset.encode()).hexdigest()[:12]}"
    if len(model) > 80:
        model = f"{model[-60:]}-{hashlib.sha1(model.encode()).hexdigest()[:12]}"
    return Path(out) / f"{dataset}_{doc['pretrained']}_{model}_{doc['language']}_{doc['task']}.json"


def write_json(path: Path, doc: dict) -> Path:
    """A command's result document at `path` (its folder made), whole or not at all; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode())
    return path


def default_classified(model) -> str:
    """The modality a classification tool takes when none is named: the model's first tower that does not encode
    the class prompts."""
    language = modalities.language(model.modalities)
    return next((m for m in model.modalities if m != language), model.modalities[0])
