"""Pretrain under torchrun, counting on each rank what DeepSpeed does per optimizer step.

    torchrun --nproc_per_node 2 tests/count_reductions.py COUNTS_DIR key=value ...

runs `tessera.train.pretrain` with the overrides and writes COUNTS_DIR/rank{R}.json: how many times the engine ran
a backward pass, reduced gradients across ranks (ZeRO-0: `buffered_allreduce_fallback`; ZeRO-1: the ZeRO
optimizer's `reduce_gradients`; both are what DeepSpeed calls at a gradient-accumulation boundary) and stepped its
optimizer (`_take_model_step`), and the dtypes of the tensors those reductions sent through `deepspeed.comm`.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import deepspeed.comm
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from tessera.train import pretrain

COUNTS: Counter = Counter()
REDUCED: set[str] = set()  # dtypes of what a gradient reduction sent
_reducing = [0]


def counted(cls, name: str, key: str) -> None:
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        COUNTS[key] += 1
        _reducing[0] += key == "reductions"
        try:
            return original(*args, **kwargs)
        finally:
            _reducing[0] -= key == "reductions"

    setattr(cls, name, wrapper)


def recorded(name: str) -> None:
    original = getattr(deepspeed.comm, name)

    def wrapper(tensor, *args, **kwargs):
        if _reducing[0]:
            for t in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
                REDUCED.add(str(t.dtype))
        return original(tensor, *args, **kwargs)

    setattr(deepspeed.comm, name, wrapper)


counted(DeepSpeedEngine, "backward", "backward")
counted(DeepSpeedEngine, "buffered_allreduce_fallback", "reductions")
counted(DeepSpeedZeroOptimizer, "reduce_gradients", "reductions")
counted(DeepSpeedEngine, "_take_model_step", "optimizer_steps")
for collective in ("all_reduce", "reduce", "reduce_scatter_fn", "reduce_scatter_tensor", "all_reduce_coalesced"):
    recorded(collective)

if __name__ == "__main__":
    out = Path(sys.argv[1])
    rc = pretrain.main(sys.argv[2:])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({**COUNTS, "reduced": sorted(REDUCED)}))
    sys.exit(rc)
