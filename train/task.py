"""The pretraining task: one forward over a batch, returning a dict of losses and a report."""

from __future__ import annotations

from typing import Any

import torch

from tessera.models import pair_key

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
        labels = None
        if self.loss_cfg.positives == "label":
            if "label" not in batch:
                raise ValueError("loss.positives=label, but this batch has no `cls` labels")
            labels = batch["label"]
        losses: dict[str, torch.Tensor] = {}
        report: dict[str, torch.Tensor] = {}
        for a, b in self.pairs:
            if a not in features or b not in features:
                continue
            key = pair_key(a, b)
            scale = out["logit_scale"][key]
            bias = out.get("logit_bias", {}).get(key)
            cfg = self.loss_cfg
            # fp32 features whatever the model's precision: the loss accumulates in fp32 either way, but bf16
            # GEMM outputs would round logits of up to 100 to 1 part in 256.
            losses[f"loss/{a}-{b}"] = contrastive_loss(
                features[a].float(), features[b].float(), scale.float(),
                None if bias is None else bias.float(), kind=cfg.kind, tile_size=cfg.tile_size,
                process_group=self.group, labels=labels, dcl=cfg.dcl, label_smoothing=cfg.label_smoothing,
                impl=cfg.impl)
            report[f"temperature/{a}-{b}"] = 1.0 / scale.detach()
            if bias is not None:
                report[f"logit_bias/{a}-{b}"] = bias.detach()
        if not losses:
            raise ValueError(f"batch with {sorted(features)} covers none of the pairs {self.pairs}")
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses, report
