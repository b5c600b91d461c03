"""`tessera`: one command over the `python -m` entry points.

tessera pretrain --config configs/demo.yaml train.steps=100
tessera finetune --config configs/finetune-lora-demo.yaml base=runs/demo/model
tessera make-shards --manifest samples.jsonl --out shards/
tessera embed-shards --model runs/big/model --data "train-{000000..000009}.tar" --out taught/   (distill)
tessera eval retrieval --model runs/demo/model --data "val-{000000..000001}.tar"
tessera eval zeroshot --model runs/demo/model --data "val-000000.tar" --classes classes.json
tessera eval linear-probe --model runs/demo/model --train "train-000.tar" --test "test-000.tar"
tessera eval mteb --model runs/demo/model --data "val-000000.tar" --classes classes.json    (the mteb extra)
tessera eval reversal --model runs/demo-video/transformer/model --data "val-motion-000000.tar"   (clip vs reversal)
tessera plan-batches --model runs/demo/model --data "train-{000..003}.tar" --out plan.json --batch-size 128
tessera demo-data --out runs/demo/data
tessera report runs/demo     (the run's curves and evaluations in one PNG: runs/demo/report.png)
tessera export --format open_clip runs/demo/model     (or --format hf)
tessera import open_clip DIR_OR_CHECKPOINT [--model ViT-B-32] --out base/model     (or: import hf DIR)
"""

from __future__ import annotations

import importlib
import sys

# command -> the module whose main(argv) runs it, imported when the command runs: `tessera make-shards` never
# imports DeepSpeed, and `tessera pretrain` never imports the evaluation tools it does not use
COMMANDS = {
    "pretrain": "tessera.train.pretrain",
    "finetune": "tessera.train.finetune",
    "make-shards": "tessera.data.make_shards",
    "embed-shards": "tessera.eval.embed_shards",
    "plan-batches": "tessera.tools.plan_batches",
    "report": "tessera.tools.report",
    "demo-data": "tessera.data.demo",
    "export": "tessera.models.interop:export_main",
    "import": "tessera.models.interop:import_main",
}
EVAL = ("retrieval", "zeroshot", "linear-probe", "mteb", "reversal")  # tessera.eval.commands reads their command lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "eval":
        if len(argv) < 2 or argv[1] not in EVAL:
            print(f"usage: tessera eval {{{','.join(EVAL)}}} [options]", file=sys.stderr)
            return 2
        return importlib.import_module("tessera.eval.commands").main(argv[1], argv[2:])
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        print(__doc__.strip(), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    module, _, func = COMMANDS[argv[0]].partition(":")
    return getattr(importlib.import_module(module), func or "main")(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
