"""Linear probe: multinomial logistic regression on frozen embeddings of a labelled train split, scored on a
test split. The standard downstream check beside zero-shot.

    python -m tessera.eval.linear_probe --model RUN_DIR/model --train "train-{000..009}.tar" --test "test-000.tar" \\
        --modality image --out probe.json

Labels are each sample's `cls` member. The L2 penalty is picked from --weight-decays on a held-out fifth of the
train split (fixed seed), then the probe is refit on the whole train split with it (full-batch L-BFGS, fp32).
Metrics: `acc1`, `acc5`, `mean_per_class_recall` on the test split, beside chance.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F

from tessera.data import SampleStats, parse_sources

from . import commands, common
from .zeroshot import classification_metrics, embed_labelled

WEIGHT_DECAYS = commands.WEIGHT_DECAYS  # the penalties a probe picks from by default (its command line's too)


def fit_logistic(
    x_ND: torch.Tensor, y_N: torch.Tensor, n_classes: int, weight_decay: float, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (D, C) and bias (C,) minimising mean cross-entropy + weight_decay/2 * ||W||^2."""
    W = torch.zeros(x_ND.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_ND @ W + b, y_N) + 0.5 * weight_decay * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    weight_decays=WEIGHT_DECAYS,
    seed: int = 0,
) -> dict[str, Any]:
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    if (train_y < 0).any() or (test_y < 0).any():
        raise ValueError("`cls` labels must be non-negative class indices")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_y), generator=g)
    n_val = max(1, len(order) // 5) if len(order) >= 5 else 0
    scores = {}
    if n_val and len(weight_decays) > 1:
        val, fit = order[:n_val], order[n_val:]
        for wd in weight_decays:
            W, b = fit_logistic(train_x[fit], train_y[fit], n_classes, wd)
            scores[wd] = ((train_x[val] @ W + b).argmax(1) == train_y[val]).float().mean().item()
        best = max(weight_decays, key=lambda wd: (scores[wd], wd))  # ties: the stronger penalty
    else:
        best = weight_decays[len(weight_decays) // 2]
    W, b = fit_logistic(train_x, train_y, n_classes, best)
    metrics = classification_metrics(test_x @ W + b, test_y)
    chance = {"acc1": 1 / n_classes, "acc5": min(5, n_classes) / n_classes, "mean_per_class_recall": 1 / n_classes}
    return {
        "metrics": metrics,
        "chance": chance,
        "weight_decay": best,
        "validation_acc1": scores,
        "classes": n_classes,
        "n": {"train": len(train_y), "test": len(test_y)},
    }


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`tessera eval linear-probe` with its command line read (`tessera.eval.commands`)."""
    model, device = common.load(args)
    args.modality = args.modality or common.default_classified(model)
    stats = SampleStats()
    try:
        splits = [
            embed_labelled(
                model, parse_sources(spec, name), args.modality, args.batch_size, device, None, args.workers, stats
            )
            for spec, name in ((args.train, "--train"), (args.test, "--test"))
        ]
        result = linear_probe(*splits[0], *splits[1], args.weight_decays)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    doc = {
        "dataset": {"train": " ".join(args.train), "test": " ".join(args.test)},
        "model": str(args.model),
        "task": "linear_probe",
        "modality": args.modality,
        **result,
        "data": stats.to_dict(),
    }
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        print(f"{key:<24}{100 * result['metrics'][key]:6.1f}%   chance {100 * result['chance'][key]:5.1f}%")
    if args.out:
        print(f"wrote {common.write_json(args.out, doc)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(*commands.parse("linear-probe", argv))


if __name__ == "__main__":
    sys.exit(main())
