"""`tessera`: one command over the `python -m` entry points.

    tessera pretrain --config configs/demo.yaml train.steps=100
    tessera finetune --config configs/finetune-lora-demo.yaml base=runs/demo/model
    tessera make-shards --manifest samples.jsonl --out shards/
    tessera eval retrieval --model runs/demo/model --data "val-{000000..000001}.tar"
    tessera eval zeroshot --model runs/demo/model --data "val-000000.tar" --classes classes.json
    tessera eval linear-probe --model runs/demo/model --train "train-000.tar" --test "test-000.tar"
    tessera demo-data --out runs/demo/data
"""

from __future__ import annotations

import sys


def _pretrain(argv):
    from tessera.train.pretrain import main

    return main(argv)


def _finetune(argv):
    from tessera.train.finetune import main

    return main(argv)


def _make_shards(argv):
    from tessera.data.make_shards import main

    return main(argv)


def _demo_data(argv):
    from tessera.data.demo import main

    return main(argv) or 0


def _eval(argv):
    tasks = {"retrieval": "tessera.eval.retrieval", "zeroshot": "tessera.eval.zeroshot", "linear-probe": "tessera.eval.linear_probe"}
    if not argv or argv[0] not in tasks:
        print(f"usage: tessera eval {{{','.join(tasks)}}} [options]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(tasks[argv[0]]).main(argv[1:])


COMMANDS = {"pretrain": _pretrain, "finetune": _finetune, "make-shards": _make_shards, "eval": _eval, "demo-data": _demo_data}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
