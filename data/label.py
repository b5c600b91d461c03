"""Class labels: `cls` members, an integer class id as text. A label is a target (of label positives, few-shot
and zero-shot classification), never a tower: it has its own transform and collate here."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .decode import BadSample, Decoder, ManifestError, torch_module

if TYPE_CHECKING:
    import torch

LABEL = "label"  # the batch key of the labels


class LabelDecoder(Decoder):
    modality = LABEL
    suffixes = ("cls",)
    manifest_fields = ("cls",)

    def decode(self, sample: dict[str, Any]) -> int:
        try:
            return int(sample["cls"].decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            raise BadSample("bad_label") from None

    def members(self, field: str, value: Any, base: Path) -> dict[str, Any]:
        """`cls`: an integer class id, written as `.cls`."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError("'cls' must be an integer")
        return {"cls": str(value).encode()}


def keep(value: int) -> int:
    """A label's transform: the class id as it is."""
    return value


def collate_labels(labels: list[int]) -> torch.Tensor:
    torch = torch_module()
    return torch.tensor(labels, dtype=torch.int64)
