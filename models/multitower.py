"""The multi-tower model: one encoder + projection head per modality, a learnable temperature per pair.

Shape legend: B batch, D shared embedding width, D_enc an encoder's own output width.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import to_dict

from .config import ModelConfig, pair_key
from .encoder import Encoder
from .heads import build_head

log = logging.getLogger(__name__)


# a batch key: {modality: the modality's inputs played backwards (Encoder.time_axis flipped)}, encoded into the
# output's "reversed" features
REVERSED = "__reversed__"


@dataclass
class Encoded:
    """A modality's encoder output, computed before: `encode` (and `forward`) apply only the head to it. A training
    step that runs a locked tower once and its trainable head twice passes the tower's output back this way."""

    features: torch.Tensor  # (B, D_enc)


def truncate_embeddings(x: torch.Tensor, width: int) -> torch.Tensor:
    """The first `width` features of each embedding, renormalised: what a model truncated to `width` returns (the
    prefix of a normalised embedding renormalises to the prefix of the raw one)."""
    return F.normalize(x[..., :width], dim=-1)


class MultiTowerModel(nn.Module):
    # towers and heads compute in this dtype under autocast (None: in the weights' own dtype); training sets it
    # from train.precision, and the weights, their gradients and the temperatures stay as they are
    autocast_dtype: torch.dtype | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.towers = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        for modality, tower_cfg in cfg.towers.items():
            encoder: Encoder = tower_cfg.encoder_cls(tower_cfg.params, cfg.embed_dim)
            self.towers[modality] = encoder
            self.heads[modality] = build_head(tower_cfg.head, encoder.output_dim, cfg.embed_dim)
        # Stored as log(1/T), as in CLIP; clamped in forward rather than after each optimiser step so that
        # the clamp also holds when ZeRO-3 partitions the parameter. Shape (1,), not (): DeepSpeed's
        # broadcast of bf16 parameters cannot view a 0-d tensor as bytes.
        self.logit_scales = nn.ParameterDict(
            {
                pair_key(*group): nn.Parameter(torch.full((1,), cfg.init_logit_scale))
                for group in (*cfg.pair_list(), *cfg.tuples)
            }
        )
        self._max_log_scale = math.log(cfg.max_logit_scale)
        if cfg.init_logit_bias is not None:
            self.logit_biases = nn.ParameterDict(
                {pair_key(a, b): nn.Parameter(torch.full((1,), float(cfg.init_logit_bias))) for a, b in cfg.pair_list()}
            )
        for a, b in cfg.pair_list():
            source = self.towers[a].clip_checkpoint()
            if source and source == self.towers[b].clip_checkpoint():
                self._take_temperature(pair_key(a, b), self.towers[a].clip_temperature(), source)

    @torch.no_grad()
    def _take_temperature(self, key: str, found: dict[str, torch.Tensor], checkpoint: str) -> None:
        """The pair `key` starts from the temperature (and logit bias) its towers' CLIP checkpoint learned."""
        if "logit_scale" in found:
            scale = float(found["logit_scale"].reshape(-1)[0])
            if scale > self._max_log_scale + 1e-6:
                log.warning(
                    "%s: the checkpoint's logit scale %.1f is above model.max_logit_scale (%g), which clamps it; "
                    "raise model.max_logit_scale to keep it",
                    key,
                    math.exp(scale),
                    self.cfg.max_logit_scale,
                )
            log.info("%s: starts from the temperature of %s (logit scale %.2f)", key, checkpoint, math.exp(scale))
            self.logit_scales[key].fill_(scale)
        if "logit_bias" in found:
            if self.cfg.init_logit_bias is None:
                log.warning(
                    "%s: %s has a logit bias (SigLIP), which this model has no place for; set model.init_logit_bias "
                    "to train with one",
                    key,
                    checkpoint,
                )
            else:
                self.logit_biases[key].fill_(float(found["logit_bias"].reshape(-1)[0]))

    @property
    def modalities(self) -> list[str]:
        return list(self.towers)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return self.cfg.pair_list()

    @property
    def output_dim(self) -> int:
        """The width of what `encode` returns: model.truncate_dim where set, else embed_dim."""
        return self.cfg.truncate_dim or self.cfg.embed_dim

    def truncate(self, width: int | None) -> MultiTowerModel:
        """Serve the first `width` features of the embedding, renormalised (None: all of them); returns self. A
        Matryoshka-trained model (loss.matryoshka) keeps its quality at the widths it was trained at."""
        self.cfg = dataclasses.replace(self.cfg, truncate_dim=width)  # checked there
        return self

    def encode(self, modality: str, inputs: Any, normalize: bool = True) -> torch.Tensor:
        dtype = self.autocast_dtype
        with torch.autocast(next(self.parameters()).device.type, dtype, enabled=dtype is not None):
            encoded = inputs.features if isinstance(inputs, Encoded) else self.towers[modality](inputs)
            z_BD = self.heads[modality](encoded)
        if not normalize:
            return z_BD[..., : self.output_dim]
        return truncate_embeddings(z_BD, self.output_dim)

    def pair_name(self, a: str, b: str) -> str | None:
        """The name (`a__b` or `b__a`) under which the model aligns a and b, or None when it does not."""
        return next((k for k in (pair_key(a, b), pair_key(b, a)) if k in self.logit_scales), None)

    def logit_scale(self, a: str, b: str, *more: str) -> torch.Tensor:
        """The multiplier of a pair's (or a model.tuples tuple's) logits, clamped at max_logit_scale."""
        return self.logit_scales[pair_key(a, b, *more)].clamp(max=self._max_log_scale).exp().squeeze(0)

    def forward(self, batch: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        """Normalised embeddings of every modality present in `batch`, every pair's logit scale (and bias).

        The logit scales are returned from forward (not read off the module afterwards) because under
        ZeRO-3 parameters are only materialised inside forward.
        """
        out = {
            "features": {m: self.encode(m, batch[m]) for m in self.towers if m in batch},
            "logit_scale": {pair_key(*group): self.logit_scale(*group) for group in (*self.pairs, *self.cfg.tuples)},
        }
        if REVERSED in batch:  # the same samples played backwards, where the objective asks (loss.reversal_negatives)
            out["reversed"] = {m: self.encode(m, x) for m, x in batch[REVERSED].items()}
        if self.cfg.init_logit_bias is not None:
            out["logit_bias"] = {key: bias.squeeze(0) for key, bias in self.logit_biases.items()}
        return out

    def transforms(self, is_train: bool, compact: bool = False) -> dict[str, Any]:
        """Each tower's transform; `compact`: its compact form (see `Encoder.compact_transform`)."""
        return {
            m: tower.compact_transform(is_train) if compact else tower.transform(is_train)
            for m, tower in self.towers.items()
        }

    def collators(self) -> dict[str, Any]:
        return {m: tower.collate for m, tower in self.towers.items()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in self.towers.values():
            tower.set_grad_checkpointing(enable)

    def export_config(self, out_dir: Path) -> dict[str, Any]:
        """The model config, as a YAML-ready dict, that rebuilds this model from exported weights alone."""
        doc = to_dict(self.cfg)
        for m, tower in self.cfg.towers.items():
            doc["towers"][m] = {
                "encoder": tower.encoder,
                **self.towers[m].export_params(Path(out_dir)),
                "head": to_dict(tower.head),
            }
        return doc


def build_model(cfg: ModelConfig) -> MultiTowerModel:
    return MultiTowerModel(cfg)
