"""The pretraining task: one forward over a batch, returning a dict of losses and a report."""

from __future__ import annotations

from typing import Any

import torch

from models import pair_key

from .config import LossConfig
from .losses import contrastive_loss


class ContrastiveTask:
    """Sum of the contrastive losses of every configured pair present in the batch."""

    def __init__(self, pairs: list[tuple[str, str]], loss_cfg: LossConfig, process_group=None):
        self.pairs = pairs
        self.loss_cfg = loss_cfg
        self.group = process_group

    def __call__(self, model, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Losses (`loss` is their sum, the one to backpropagate) and a report of detached tensors, which the
        loop converts to numbers only at log steps (`.item()` would synchronise a GPU every step)."""
        out = model(batch)
        features = out["features"]
        losses: dict[str, torch.Tensor] = {}
        report: dict[str, torch.Tensor] = {}
        for a, b in self.pairs:
            if a not in features or b not in features:
                continue
            scale = out["logit_scale"][pair_key(a, b)]
            # The loss runs in fp32 whatever the model's precision: its log-sum-exps need the range.
            losses[f"loss/{a}-{b}"] = contrastive_loss(features[a].float(), features[b].float(), scale.float(),
                                                       kind=self.loss_cfg.kind, process_group=self.group)
            report[f"temperature/{a}-{b}"] = 1.0 / scale.detach()
        if not losses:
            raise ValueError(f"batch with {sorted(features)} covers none of the pairs {self.pairs}")
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses, report
