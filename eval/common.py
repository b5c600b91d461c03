"""What the evaluation entry points share: their common arguments and loading the model to evaluate."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with --model, --batch-size and --workers; the caller adds its own."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model directory (RUN_DIR/model)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="loader workers")
    return p


def load(args: argparse.Namespace):
    """(model, device): the exported model on the GPU when there is one."""
    from models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(args.model, device=device), device


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, then back in whichever mode it was (training calls eval mid-run)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def sources_with(sources: Sequence, modalities: Sequence[str], extra: Sequence[str] = ()) -> list:
    """The sources (`SourceConfig`s) whose samples carry all of `modalities`, set to decode exactly those (plus
    `extra`, e.g. the label). A source that declares no modalities is taken to carry whatever is asked for;
    one that declares them (e.g. an audio-text source in a joint run) is used only for pairs it covers."""
    picked = [dataclasses.replace(s, modalities=[*modalities, *extra]) for s in sources
              if s.modalities is None or all(m in s.modalities for m in modalities)]
    if not picked:
        raise ValueError(f"no evaluation source carries {'+'.join(modalities)} (sources: "
                         + ", ".join(f"{s.name}: {'+'.join(s.modalities or ['?'])}" for s in sources) + ")")
    return picked
