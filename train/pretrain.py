"""Pretrain a multi-tower contrastive model on tar shards.

    python -m tessera.train.pretrain --config configs/demo.yaml [key=value ...]
    torchrun --nproc_per_node 8 -m tessera.train.pretrain --config configs/vit-b-32.yaml data.train=... resume=latest

Overrides are dotted keys; values use YAML syntax (numbers, true/false, [lists], {mappings}).
`python -m tessera.train.pretrain --help` lists every key with its default.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tessera.config import UserError

from .distributed.slurm import adopt_slurm
from .recipes.load import dump_config, help_text, load_config
from .recipes.runs import PretrainConfig

# What runs a resolved config: torch, DeepSpeed and the towers' libraries come with it, so it is imported only once
# the command line has been read (`--help` needs none of them and answers at once; resolving a recipe imports the
# modules of the towers it names, which hold their configs).
RUNNER = "tessera.train.loop"


def parse_args(
    argv: list[str] | None,
    cls: type = PretrainConfig,
    prog: str = "python -m tessera.train.pretrain",
    doc: str | None = __doc__,
):
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, epilog=help_text(cls), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def run(argv: list[str] | None, cls: type, prog: str, doc: str | None) -> int:
    """Parse the command line into a `cls` config and train the task it names; exit status 2 on bad input."""
    args = parse_args(argv, cls, prog, doc)
    try:
        cfg = load_config(args.config, args.overrides, cls)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        adopt_slurm()  # srun without torchrun: each task a rank
        if os.environ.get("RANK", "0") == "0":
            print("loading torch, DeepSpeed and the towers' libraries ...", file=sys.stderr, flush=True)
        importlib.import_module(RUNNER).run(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # outside the steps, where SIGINT instead stops at a step with a checkpoint
        print(
            "interrupted: stopped outside training (setup or final evaluation); checkpoints written are kept",
            file=sys.stderr,
        )
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(argv, PretrainConfig, "python -m tessera.train.pretrain", __doc__)


if __name__ == "__main__":
    sys.exit(main())
