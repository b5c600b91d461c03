"""The one interface every modality's encoder implements.

An encoder maps one modality's collated batch to `(B, output_dim)` features. It also owns what turns a
decoded sample of its modality into a model input (`transform`: an image transform, a tokenizer, ...)
and how those inputs stack into a batch (`collate`), because both depend on the encoder's
architecture (image size, vocabulary, context length). `tessera.data` calls them without importing models.

An encoder declares what adapters need to know of its insides, so that no adapter inspects a tower from outside:
- `lora_targets()`: the module names LoRA adapts by default; `lora_unreachable()`: modules whose weights the
  tower reads without calling them (LoRA there would never run);
- `context_site()`: where learned context goes in its prompts (CoOp, peft prompt tuning), if it encodes prompts,
  and `context_kind`, which of the two it is, known without building the tower;
- `token_site()`: where learned input tokens go (VPT), if it takes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tessera.config import to_dict

ALL_LINEAR = "all-linear"  # LoRA target: every Linear and MultiheadAttention module of a tower


@dataclass
class SplicedContext:
    """CoOp: a prompt is tokenized with placeholder words at `offset` (after <BOS>), and while class prompts are
    encoded the output of `embedding` (B, T, W) at those positions is replaced by the learned context."""

    embedding: nn.Module  # the token embedding, whose output takes the context
    tokenize: Callable[[str], torch.Tensor]  # one prompt -> the tower's input ids
    word_ids: Callable[[str], torch.Tensor]  # words -> their token ids, no special tokens
    offset: int = 1


@dataclass
class PrefixContext:
    """peft prompt tuning: learned virtual tokens in front of every input of a transformers model, the owner's
    `attribute`, which `peft.get_peft_model` wraps in place."""

    owner: nn.Module
    attribute: str
    word_ids: Callable[[str], torch.Tensor]  # words -> their token ids, no special tokens


@dataclass
class TokenSite:
    """VPT-shallow: learned tokens of width `width` enter after the first token of `insert_after`'s output
    (B, 1 + P, W), and leave again from `remove_after`'s output, before the tower pools."""

    width: int
    insert_after: nn.Module
    remove_after: nn.Module


class Encoder(nn.Module):
    """Base class: subclasses set `config_cls`, `cfg` and `output_dim`, and implement `forward` and `transform`."""

    config_cls: ClassVar[type]  # its typed config: a tower's YAML keys besides `encoder` and `head`
    context_kind: ClassVar[str | None] = None  # "spliced" (SplicedContext) or "prefix" (PrefixContext)
    # the axis of a collated batch that is time, where the modality has one (a video's frames: 1); flipping it gives
    # the batch of the same samples played backwards (the reversal test, `tessera eval reversal`)
    time_axis: ClassVar[int | None] = None
    cfg: Any
    output_dim: int

    def forward(self, inputs: Any) -> torch.Tensor:  # (B, output_dim)
        raise NotImplementedError

    def transform(self, is_train: bool) -> Callable[[Any], Any]:
        """A picklable callable: one decoded sample value -> one model input item."""
        raise NotImplementedError

    def compact_transform(self, is_train: bool) -> Callable[[Any], Any]:
        """`transform` as the loaders use it: the same model input in its smallest form, which `forward` also
        accepts (images as uint8, normalised on the device: a quarter of the bytes through the loader's shared
        memory, pinning and the copy to the device). By default the transform itself."""
        return self.transform(is_train)

    def local_crop_transform(self, scale: tuple[float, float]) -> Callable[[Any], Any] | None:
        """`compact_transform(True)` cropping a random region of `scale` (min, max) of the input's area: the local
        views of self-distillation (SILC). None: this tower has no such view."""
        return None

    @staticmethod
    def collate(items: list[Any]) -> Any:
        """Stack transformed items into the batch `forward` takes. A static method: loader workers receive it
        by reference, where a bound method would pickle the whole tower, weights included, into each one."""
        if isinstance(items[0], dict):
            return {k: torch.stack([it[k] for it in items]) for k in items[0]}
        return torch.stack(items)

    @staticmethod
    def split(inputs: Any, start: int, stop: int) -> Any:
        """Samples [start, stop) of a batch `collate` made: a chunk the tower encodes on its own (a two-pass step
        runs the towers chunk by chunk)."""
        if isinstance(inputs, dict):
            return {k: v[start:stop] for k, v in inputs.items()}
        return inputs[start:stop]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    def export_params(self, out_dir: Path) -> dict[str, Any]:
        """This encoder's config, as a YAML-ready dict, for an exported model: self-contained, with the
        weights coming from the export. Paths it writes start with './' and are relative to `out_dir`."""
        params = to_dict(self.cfg)
        if "pretrained" in params:
            params["pretrained"] = None
        return params

    def clip_checkpoint(self) -> str | None:
        """The CLIP checkpoint this tower was initialised from, if any: two towers of a pair initialised from the
        same one take its temperature (and logit bias) too."""
        return None

    def clip_temperature(self) -> dict[str, torch.Tensor]:
        """`logit_scale` (and `logit_bias`) of `clip_checkpoint()`, as far as it has them."""
        return {}

    def lora_targets(self) -> list[str]:
        """Module names (the last name component) LoRA adapts by default, or [ALL_LINEAR]."""
        return [ALL_LINEAR]

    def lora_unreachable(self) -> tuple[str, ...]:
        """Name prefixes of modules whose weights the tower passes to functional calls instead of running them."""
        return ()

    def context_site(self) -> SplicedContext | PrefixContext | None:
        return None

    def token_site(self) -> TokenSite | None:
        return None
