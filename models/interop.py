"""`tessera export` and `tessera import`: a Tessera export in other tools' formats, and other tools' models as
Tessera exports. Paths only: nothing is downloaded.

tessera export --format open_clip runs/demo/model            # -> runs/demo/model/open_clip
tessera export --format hf runs/vit/model --out hf-model      # transformers CLIPModel directory
tessera export --format open_clip runs/mrl/model --truncate-dim 128 --out oc-128   # a Matryoshka model, 128 wide
tessera import open_clip ~/ViT-B-32-dir --out base/model      # an open_clip model directory (local-dir: layout)
tessera import open_clip epoch_32.pt --model ViT-B-32 --out base/model   # open_clip_train checkpoint or state dict
tessera import hf ~/clip-vit-base-patch32 --out base/model    # a transformers CLIPModel directory
tessera import hf ~/siglip-base-patch16-224 --out base/model  # or SiglipModel (its tokenizer comes along)

An imported model keeps its temperature (and SigLIP bias); `tessera finetune base=base/model` and `tessera eval`
take it like any export.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from tessera.config import ConfigError

FORMATS = ("open_clip", "hf")
# The modules that do the work (torch, open_clip, transformers) are imported once the command line has been read:
# `--help` and a mistyped flag answer at once.
EXPORT = f"{__package__}.export"


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )


def export_main(argv: list[str] | None = None) -> int:
    p = _parser("tessera export", "Write an exported Tessera model in another tool's format.")
    p.add_argument("model", help="exported Tessera model directory (RUN_DIR/model)")
    p.add_argument(
        "--format",
        required=True,
        choices=(*FORMATS, "tessera"),
        help="open_clip: open_clip_config.json + weights; hf: a transformers CLIPModel directory (save_pretrained); "
        "tessera: a Tessera export (with --truncate-dim: one that serves fewer features)",
    )
    p.add_argument("--out", default=None, help="output directory (default: MODEL/<format>)")
    p.add_argument(
        "--truncate-dim",
        type=int,
        default=None,
        help="serve the first N features of the embedding, renormalised (a model trained with loss.matryoshka keeps "
        "its quality at the widths it was trained at); with --format tessera, a Tessera export that does",
    )
    args = p.parse_args(argv)
    return _run(lambda: _export(args))


def _export(args) -> None:
    export = importlib.import_module(EXPORT)
    out, notes = export.write_format(
        Path(args.model), args.format, Path(args.out) if args.out else None, args.truncate_dim
    )
    print(f"{args.format} model: {out}")
    for note in notes:
        print(f"note: {note}")


def import_main(argv: list[str] | None = None) -> int:
    p = _parser("tessera import", "Turn an open_clip or transformers CLIP (or SigLIP) model into a Tessera export.")
    p.add_argument("format", choices=FORMATS, help="what SOURCE is")
    p.add_argument(
        "source",
        help="open_clip: a model directory (open_clip_config.json + weights, `local-dir:` prefix allowed), an "
        "open_clip_train checkpoint or a state-dict file; hf: a CLIPModel or SiglipModel directory",
    )
    p.add_argument(
        "--model",
        default=None,
        help="architecture of a checkpoint file: an open_clip config name (ViT-B-32) or a .json",
    )
    p.add_argument("--out", required=True, help="where to write the Tessera export")
    args = p.parse_args(argv)
    return _run(lambda: _import(args))


def _import(args) -> None:
    if args.format == "hf" and args.model:
        raise ConfigError("--model names an open_clip config; a transformers directory carries its own")
    export = importlib.import_module(EXPORT)
    source = Path(str(args.source).removeprefix("local-dir:"))
    export.check_out_dir(Path(args.out), export.is_tessera_export, "a Tessera export", source)
    if args.format == "open_clip":
        model = importlib.import_module(f"{__package__}.open_clip_io").from_open_clip(args.source, args.model)
    else:  # transformers is imported only for this format (it takes seconds)
        model = importlib.import_module(f"{__package__}.hf_clip_io").from_hf(args.source)
    meta = {"imported_from": {"format": args.format, "source": args.source}}
    out = export.save_model(model, args.out, metadata=meta)
    scales = {k: round(float(v.detach().exp()), 3) for k, v in model.logit_scales.items()}
    print(f"Tessera model: {out} (logit scale {scales})")


def _run(work) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        work()
    except ConfigError as exc:  # a bad path, a model with no such form, a mismatched checkpoint: the user can fix it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
