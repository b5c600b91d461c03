"""The command lines of `tessera eval ...`: every parser here imports nothing but argparse, so `--help` and a
mistyped flag answer at once. The evaluation module a command names (torch, open_clip, mteb) is imported once its
command line has been read, and its `run(args, parser)` does the work; its docstring is the command's description,
read from its source without importing it.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from tessera.config import MissingExtra

WEIGHT_DECAYS = (1e-6, 1e-4, 1e-2)  # the linear probe's L2 penalties, picked on a held-out fifth of the train split
CLIP_BENCHMARK_OUT = (
    "a directory: under CLIP_benchmark's file name, {dataset}_{pretrained}_{model}_{language}_{task}.json"
)


def module_doc(module: str) -> str | None:
    """A module's docstring, read from its source without running it; None where the source cannot be read (an
    install without .py files): the command then has no description, and works."""
    try:
        source = importlib.util.find_spec(module).loader.get_source(module)
        return ast.get_docstring(ast.parse(source), clean=False) if source else None
    except (AttributeError, ImportError, OSError, SyntaxError, UnicodeDecodeError):
        return None


def _floats(text: str) -> list[float]:
    """A comma-separated list of numbers (--weight-decays 1e-6,1e-4)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


def _model_args(p: argparse.ArgumentParser) -> None:
    """--model, --batch-size, --workers, --adapter and --truncate-dim: what every command that embeds shards with an
    export takes."""
    p.add_argument("--model", required=True, help="exported model directory (RUN_DIR/model)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="loader workers")
    p.add_argument(
        "--adapter",
        default=None,
        help="an adapter directory to apply to the model: LoRA (peft's "
        "adapter_config.json + adapter_model.safetensors; merged in) or prompts (prompt_config.json)",
    )
    p.add_argument(
        "--truncate-dim",
        type=int,
        default=None,
        help="evaluate the first N features of the embedding, renormalised (a model trained with loss.matryoshka, "
        "at one of its widths)",
    )


def retrieval(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--data", required=True, nargs="+", help="held-out shard spec(s)")
    p.add_argument(
        "--query",
        help="query modality; default (with --target unset): every pair the model was trained on, both directions. "
        "Several joined by '+' (image+audio) query with all of them at once, scored by --rules",
    )
    p.add_argument("--target", help="target modality")
    p.add_argument(
        "--rules",
        default="sum",
        help="how a query of several modalities scores a target, comma-separated: sum (of their cosine similarities), "
        "mip (Symile's multilinear inner product), volume (GRAM's: minus the volume they span with it)",
    )
    p.add_argument(
        "--out", help=f"write the result JSON here (and its plot and markdown beside it); {CLIP_BENCHMARK_OUT}"
    )


def zeroshot(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--data", required=True, nargs="+", help="held-out shard spec(s) with `cls` labels")
    p.add_argument(
        "--modality", help="the modality to classify; default: the model's first tower that does not encode the prompts"
    )
    p.add_argument(
        "--classes",
        type=Path,
        help="classes.json: classnames and templates, or a CLIP_benchmark dataset root (classnames.txt and "
        "zeroshot_classification_templates.txt); default: the root of --data when it is a CLIP_benchmark dataset",
    )
    p.add_argument(
        "--out", help=f"write the result JSON here (and the confusion matrix beside it); {CLIP_BENCHMARK_OUT}"
    )


def reversal(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--data", required=True, nargs="+", help="held-out shard spec(s) of captioned clips")
    p.add_argument("--modality", help="the timed modality to reverse; default: the model's first (video) tower")
    p.add_argument("--out", help=f"write the result JSON here; {CLIP_BENCHMARK_OUT}")


def linear_probe(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--train", required=True, nargs="+", help="labelled train shard spec(s)")
    p.add_argument("--test", required=True, nargs="+", help="labelled test shard spec(s)")
    p.add_argument(
        "--modality", help="the modality to probe; default: the model's first tower that does not encode class prompts"
    )
    p.add_argument(
        "--weight-decays",
        type=_floats,
        default=",".join(str(w) for w in WEIGHT_DECAYS),  # argparse parses a str default with `type`
        help="L2 penalties to pick from, comma-separated (default: %(default)s)",
    )
    p.add_argument("--out", type=Path)


def mteb(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a Tessera export, or an open_clip or transformers directory")
    p.add_argument("--data", required=True, nargs="+", help="labelled shards (with `cls`), or a CLIP_benchmark dataset")
    p.add_argument("--classes", type=Path, help="classes.json or a CLIP_benchmark root (default: the --data root)")
    p.add_argument("--modality", help="the modality classified (default: the model's first non-prompt tower)")
    p.add_argument("--out", type=Path, help="write mteb's result JSON into this folder")


# `tessera eval NAME` -> (what its command line takes, the module that runs it)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str]] = {
    "retrieval": (retrieval, "tessera.eval.retrieval"),
    "zeroshot": (zeroshot, "tessera.eval.zeroshot"),
    "linear-probe": (linear_probe, "tessera.eval.linear_probe"),
    "reversal": (reversal, "tessera.eval.reversal"),
    "mteb": (mteb, "tessera.eval.mteb"),
}


def parse(name: str, argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """`tessera eval NAME`'s command line read: (its arguments, the parser that reports errors in them)."""
    add_args, module = COMMANDS[name]
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=module_doc(module), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_args(parser)
    return parser.parse_args(argv), parser


def main(name: str, argv: list[str] | None = None) -> int:
    """Read `tessera eval NAME`'s command line, then import the module that runs it and run it."""
    args, parser = parse(name, argv)
    module = COMMANDS[name][1]
    try:
        runner = importlib.import_module(module)
    except MissingExtra as exc:  # `tessera eval mteb` without the mteb extra
        parser.exit(exc.exit_code, f"error: {exc}\n")
    return runner.run(args, parser) or 0
