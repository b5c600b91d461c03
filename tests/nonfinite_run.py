"""Pretrain with non-finite numbers injected, for the tests of `train.max_nonfinite_steps`.

    [torchrun --nproc_per_node N] tests/nonfinite_run.py KIND RANKS STEPS key=value ...

KIND `loss`: the objective's losses become NaN; `gradient`: the losses stay finite but the temperatures' gradient
becomes inf. RANKS: the ranks that inject, comma-separated. STEPS: the 1-based objective calls (micro-steps) that
inject, comma-separated, `N+` for every one from N on.
"""

from __future__ import annotations

import os
import sys

import torch

from tessera.train import pretrain
from tessera.train.components import objectives


class InfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def inject(kind: str, ranks: str, steps: str) -> None:
    active = int(os.environ.get("RANK", "0")) in {int(r) for r in ranks.split(",")}
    listed = {int(s) for s in steps.split(",") if not s.endswith("+")}
    start = min((int(s[:-1]) for s in steps.split(",") if s.endswith("+")), default=None)
    calls = [0]
    original = objectives.ContrastiveObjective.loss

    def loss(self, out, batch):
        calls[0] += 1
        hit = active and (calls[0] in listed or (start is not None and calls[0] >= start))
        if hit and kind == "gradient":
            out = {**out, "logit_scale": {k: InfGradient.apply(v) for k, v in out["logit_scale"].items()}}
        losses, report = original(self, out, batch)
        if hit and kind == "loss":
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses, report

    objectives.ContrastiveObjective.loss = loss


if __name__ == "__main__":
    inject(*sys.argv[1:4])
    sys.exit(pretrain.main(sys.argv[4:]))
