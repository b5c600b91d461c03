"""The one interface every modality's encoder implements.

An encoder maps one modality's collated batch to `(B, output_dim)` features. It also owns what turns a
decoded sample of its modality into a model input (`transform`: an image transform, a tokenizer, ...)
and how those inputs stack into a batch (`collate`), because both depend on the encoder's
architecture (image size, vocabulary, context length). `data/` calls them without importing models.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tessera.config import to_dict


class Encoder(nn.Module):
    """Base class: subclasses set `cfg` and `output_dim`, and implement `forward` and `transform`."""

    cfg: Any
    output_dim: int

    def forward(self, inputs: Any) -> torch.Tensor:  # (B, output_dim)
        raise NotImplementedError

    def transform(self, is_train: bool) -> Callable[[Any], Any]:
        """A picklable callable: one decoded sample value -> one model input item."""
        raise NotImplementedError

    @staticmethod
    def collate(items: list[Any]) -> Any:
        """Stack transformed items into the batch `forward` takes. A static method: loader workers receive it
        by reference, where a bound method would pickle the whole tower, weights included, into each one."""
        if isinstance(items[0], dict):
            return {k: torch.stack([it[k] for it in items]) for k in items[0]}
        return torch.stack(items)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    def export_params(self, out_dir: Path) -> dict[str, Any]:
        """This encoder's config, as a YAML-ready dict, for an exported model: self-contained, with the
        weights coming from the export. Paths it writes start with './' and are relative to `out_dir`."""
        params = to_dict(self.cfg)
        if "pretrained" in params:
            params["pretrained"] = None
        return params
