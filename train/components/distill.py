"""Distillation: beside its contrastive loss, the student learns a teacher's similarity matrices (logit
distillation, tiled: `tessera.losses.distill_loss`) and/or its embeddings (feature distillation).

The teacher (`distill.teacher`):
- a model directory (a Tessera export, an open_clip or transformers model: what `tessera.load` reads), run without
  gradient in the run's compute precision, replicated on every rank and never saved in checkpoints; it may be larger,
  have another width, or have only some of the student's modalities. It sees its own evaluation transform of each
  sample (the caption the student drew), made in the loader workers (`tessera.data.derived.View`);
- `stored`: the embeddings `tessera embed-shards` wrote into the shards, read by the loader: no teacher forward;
- `ema`: the student's own weight EMA (train.ema), as SigLIP 2's self-distillation (SILC).

The student's extra outputs (a learned linear map into the teacher's width for feature distillation where the widths
differ, and SILC's local crops through the student's image tower) come out of the model's forward, through a forward
hook (`StudentExtras`): the two-pass step then caches and replays them like any feature, and ZeRO-3 gathers the maps'
weights as it does the towers'. The maps are trained with the model and dropped at export (`MAPS`).

Shape legend: B batch, D the student's width, E the teacher's.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import ConfigError
from tessera.data.derived import (
    TEACHER_MANIFEST,
    StoredEmbedding,
    View,
    embedding_suffix,
    local_key,
    stack,
    teacher_key,
)
from tessera.data.shards import expand_shards
from tessera.eval.api import load as load_any
from tessera.losses import distill_loss
from tessera.models import pair_key

from ..recipes.config import DistillConfig
from .objectives import ContrastiveObjective, Losses
from .precision import autocast_dtype

log = logging.getLogger(__name__)

MAPS = "distill_maps"  # the student's learned maps into the teacher's width: trained, checkpointed, not exported
MAPPED = "distill:"  # features[MAPPED + m]: the student's features of m in the teacher's width
LOCAL = "local:"  # features[LOCAL + m]: the student's features of a local crop of m (SILC)


class Teacher:
    """Per modality, the teacher's normalised embeddings of a batch (no gradient), and per pair its logit scale
    (and bias): what the distillation losses compare the student's with."""

    def __init__(self, widths: dict[str, int], scales: dict[str, float], biases: dict[str, float]):
        self.widths, self.scales, self.biases = widths, scales, biases

    @property
    def modalities(self) -> list[str]:
        return list(self.widths)

    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def scale(self, a: str, b: str) -> torch.Tensor | float | None:
        return self.scales.get(pair_key(a, b), self.scales.get(pair_key(b, a)))

    def bias(self, a: str, b: str) -> torch.Tensor | float | None:
        return self.biases.get(pair_key(a, b), self.biases.get(pair_key(b, a)))


class ModelTeacher(Teacher):
    """A model run without gradient on its own inputs (batch[teacher_key(m)]): a loaded teacher, or the EMA's
    shadow module (whose scales move with it, so they are read at each step)."""

    def __init__(self, module: nn.Module, modalities: list[str]):
        self.module = module
        super().__init__({m: module.output_dim for m in modalities}, {}, {})

    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {m: self.module.encode(m, batch[teacher_key(m)]) for m in self.widths if teacher_key(m) in batch}

    def scale(self, a: str, b: str):
        name = self.module.pair_name(a, b)  # the pair in the order the teacher names it
        return None if name is None else self.module.logit_scale(*name.split("__")).detach()

    def bias(self, a: str, b: str):
        name = self.module.pair_name(a, b)
        biases = getattr(self.module, "logit_biases", None)
        return None if name is None or biases is None else biases[name].detach().squeeze(0)


class StoredTeacher(Teacher):
    """The embeddings `tessera embed-shards` stored in the shards (batch[teacher_key(m)], fp16) under the teacher's
    `name`, and the scales its manifest records."""

    def __init__(self, name: str, widths: dict[str, int], scales: dict[str, float], biases: dict[str, float]):
        super().__init__(widths, scales, biases)
        self.name = name

    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {m: F.normalize(batch[teacher_key(m)].float(), dim=-1) for m in self.widths if teacher_key(m) in batch}


def read_manifests(shard_specs: list[str]) -> dict[str, Any]:
    """The one teacher manifest (`teacher.json`) beside every training source's shards; a source without one, or
    sources of different teachers, are errors that say so."""
    found: dict[str, dict[str, Any]] = {}
    for spec in shard_specs:
        folders = {Path(url).parent for url in expand_shards(spec)}
        for folder in folders:
            path = folder / TEACHER_MANIFEST
            if not path.is_file():
                raise ConfigError(
                    f"distill.teacher=stored: no {TEACHER_MANIFEST} beside the shards in '{folder}'; write the "
                    "shards with `tessera embed-shards --model TEACHER --data SHARDS --out DIR` and train on DIR"
                )
            try:
                found[str(path)] = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"'{path}' cannot be read as a teacher manifest: {exc}") from None
    hashes = {doc.get("teacher", {}).get("hash") for doc in found.values()}
    if len(hashes) != 1:
        raise ConfigError(f"data.train's shards were embedded by different teachers: {sorted(map(str, hashes))}")
    return next(iter(found.values()))


def stored_teacher(cfg: DistillConfig, shard_specs: list[str], student_modalities: list[str]) -> StoredTeacher:
    manifest = read_manifests(shard_specs)
    teacher = manifest["teacher"]
    if cfg.teacher_hash is not None and teacher["hash"] != cfg.teacher_hash:
        raise ConfigError(
            f"distill.teacher_hash is {cfg.teacher_hash}, but the shards' {TEACHER_MANIFEST} names teacher "
            f"'{teacher['name']}' with hash {teacher['hash']} ({teacher.get('path')}): the embeddings are of another "
            "teacher; re-embed the shards or correct distill.teacher_hash"
        )
    log.info("distill.teacher=stored: %s (hash %s) from %s", teacher["name"], teacher["hash"][:12], teacher.get("path"))
    widths = {m: int(w) for m, w in teacher["widths"].items() if m in student_modalities}
    pairs = teacher.get("pairs", {})
    scales = {k: float(v["scale"]) for k, v in pairs.items()}
    biases = {k: float(v["bias"]) for k, v in pairs.items() if v.get("bias") is not None}
    return StoredTeacher(teacher["name"], widths, scales, biases)


class StudentExtras:
    """A forward hook on the student model: adds to its output's features the maps into the teacher's width
    (features[MAPPED + m]) and the local crops' features (features[LOCAL + m])."""

    def __init__(self, maps: nn.ModuleDict | None, local: list[str]):
        self.maps, self.local = maps, local

    def __call__(self, module: nn.Module, args: tuple, out: dict[str, Any]) -> dict[str, Any]:
        batch, features = args[0], out["features"]
        if self.maps is not None:
            dtype = module.autocast_dtype  # the towers' compute dtype: their features' (bf16, fp16) or fp32
            for m, layer in self.maps.items():
                if m in features:
                    with torch.autocast(features[m].device.type, dtype, enabled=dtype is not None):
                        features[MAPPED + m] = layer(features[m])
        for m in self.local:
            if local_key(m) in batch:
                features[LOCAL + m] = module.encode(m, batch[local_key(m)])
        return out


def attach_maps(model: nn.Module, teacher: Teacher, cfg: DistillConfig) -> None:
    """Feature distillation: a learned linear map (no bias) from the student's width into the teacher's, for every
    modality both have where the widths differ, as the model's `MAPS` submodule (so DeepSpeed trains and
    checkpoints it); and the forward hook that applies them."""
    maps = None
    if cfg.kind in ("features", "both"):
        width = model.output_dim
        wanted = {m: e for m, e in teacher.widths.items() if m in model.modalities and e != width}
        if wanted:
            maps = nn.ModuleDict({m: nn.Linear(width, e, bias=False) for m, e in wanted.items()})
            for layer in maps.values():  # start near the identity's role: orthogonal, so cosines start meaningful
                nn.init.orthogonal_(layer.weight)
            model.add_module(MAPS, maps)
            shapes = {m: f"{width}->{e}" for m, e in wanted.items()}
            log.info("distill: learned maps into the teacher's width: %s", shapes)
    local = ["image"] if cfg.local_crops and "image" in model.modalities else []
    if maps is not None or local:
        model.register_forward_hook(StudentExtras(maps, local))


def model_teacher(cfg: DistillConfig, student: nn.Module, precision: str, device: torch.device) -> ModelTeacher:
    """The teacher model of `distill.teacher` (a path), frozen, in eval mode, on `device`, computing in the run's
    precision; only the modalities the student has too."""
    try:
        module = load_any(cfg.teacher, device="cpu").module
    except (ConfigError, OSError) as exc:
        raise ConfigError(f"distill.teacher: {exc}") from None
    shared = [m for m in module.modalities if m in student.modalities]
    if not shared:
        raise ConfigError(
            f"distill.teacher '{cfg.teacher}' has towers for {module.modalities}, none of the student's "
            f"{student.modalities}"
        )
    module.requires_grad_(False).eval()
    module.autocast_dtype = autocast_dtype(precision)
    module.to(device)
    n = sum(p.numel() for p in module.parameters())
    log.info(
        "distill.teacher: %s (%s parameters; %s), width %d", cfg.teacher, f"{n:,}", "+".join(shared), module.output_dim
    )
    return ModelTeacher(module, shared)


def build_teacher(
    cfg: DistillConfig, student: nn.Module, precision: str, shards: list[str], device: torch.device
) -> tuple[Teacher, nn.Module | None]:
    """The run's teacher, and (distill.teacher=ema) the frozen copy of the student that will hold the weights'
    average (`WeightEMA`'s shadow module); the student gets its learned maps (`attach_maps`). Before `prepare`."""
    shadow = None
    if cfg.teacher == "ema":
        shadow = copy.deepcopy(student).requires_grad_(False).eval()
        shadow.autocast_dtype = autocast_dtype(precision)
        teacher: Teacher = ModelTeacher(shadow, student.modalities)
    elif cfg.teacher == "stored":
        teacher = stored_teacher(cfg, shards, student.modalities)
    else:
        teacher = model_teacher(cfg, student, precision, device)
    attach_maps(student, teacher, cfg)
    return teacher, shadow


def teacher_inputs(teacher: Teacher, cfg: DistillConfig, student: nn.Module, transforms: dict, collators: dict) -> None:
    """Add what distillation reads to the loader's transforms and collators: a model teacher's own view of each of
    its modalities, or the stored embeddings; and the student's local crops (distill.local_crops)."""
    if cfg.local_crops:
        crop = student.towers["image"].local_crop_transform(cfg.local_crops) if "image" in student.towers else None
        if crop is None:
            raise ConfigError("distill.local_crops crops images: the student's image tower has no local views")
        transforms[local_key("image")] = View("image", crop)
        collators[local_key("image")] = student.collators()["image"]
    if isinstance(teacher, ModelTeacher):
        own_transforms, own_collators = teacher.module.transforms(False, compact=True), teacher.module.collators()
        for m in teacher.modalities:
            transforms[teacher_key(m)] = View(m, own_transforms[m])
            collators[teacher_key(m)] = own_collators[m]
    elif isinstance(teacher, StoredTeacher):
        for m, width in teacher.widths.items():
            transforms[teacher_key(m)] = StoredEmbedding(m, embedding_suffix(teacher.name, m), width)
            collators[teacher_key(m)] = stack


def check_pairs(teacher: Teacher, pairs: list[tuple[str, str]], cfg: DistillConfig, kind: str) -> list[tuple]:
    """The student's pairs whose logits are distilled: those with both modalities in the teacher. Each needs a
    teacher scale (distill.temperature, else the teacher's own), and a SigLIP student the teacher's bias."""
    if cfg.kind == "features":
        return []
    distilled = [(a, b) for a, b in pairs if a in teacher.widths and b in teacher.widths]
    if not distilled:
        raise ConfigError(
            f"distill.kind={cfg.kind}: the teacher has {teacher.modalities}, which covers none of the student's "
            f"pairs {pairs}; use distill.kind=features"
        )
    for a, b in distilled:
        if cfg.temperature is None and teacher.scale(a, b) is None:
            raise ConfigError(f"distill: the teacher learned no temperature for {a}-{b}; set distill.temperature")
        if kind == "siglip" and teacher.bias(a, b) is None:
            raise ConfigError(
                f"distill: a SigLIP student distils the teacher's sigmoid logits, but the teacher has no logit bias "
                f"for {a}-{b} (it is not a SigLIP model)"
            )
    return distilled


class DistillObjective:
    """The contrastive objective plus the distillation terms: weight x the logit KL of every distilled pair, and
    feature_weight x the feature loss of every modality the teacher has."""

    def __init__(self, base: ContrastiveObjective, teacher: Teacher, cfg: DistillConfig, pairs: list[tuple]):
        self.base, self.teacher, self.cfg, self.pairs = base, teacher, cfg, pairs

    def teacher_features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The teacher's features of a batch (or of a two-pass step's chunk, in its first pass)."""
        return self.teacher.features(batch)

    def __call__(self, engine, batch: dict[str, Any]) -> Losses:
        out = engine(self.base.with_reversals(batch))
        out["teacher"] = self.teacher_features(batch)
        return self.loss(out, batch)

    def loss(self, out: dict[str, Any], batch: dict[str, Any]) -> Losses:
        losses, report = self.base.loss(out, batch)
        features, taught, cfg, base = out["features"], out["teacher"], self.cfg, self.base
        terms = []
        for a, b in self.pairs:
            if not all(m in features and m in taught for m in (a, b)):
                continue
            key = pair_key(a, b)
            scale = base.pair_scale(out, a, b)
            bias = out.get("logit_bias", {}).get(key)
            t_scale = 1.0 / cfg.temperature if cfg.temperature is not None else self.teacher.scale(a, b)
            t_bias = None if bias is None else self.teacher.bias(a, b)
            kl = distill_loss(
                base.operand(features[a]),
                base.operand(features[b]),
                scale.float(),
                base.operand(taught[a]),
                base.operand(taught[b]),
                t_scale,
                None if bias is None else bias.float(),
                t_bias,
                kind=base.loss_cfg.kind,
                tile_size=base.loss_cfg.tile_size,
                process_group=base.group,
                uniform_batches=base.uniform_batches,
                gather_budget=base.gather_budget,
            )
            losses[f"distill/{a}-{b}"] = kl
            terms.append(cfg.weight * kl)
        if cfg.kind in ("features", "both"):
            for m, target in taught.items():
                student = features.get(MAPPED + m, features.get(m))
                if student is None:
                    continue
                losses[f"distill/{m}"] = feature_loss(student.float(), target.float(), cfg.feature_loss)
                terms.append(cfg.feature_weight * losses[f"distill/{m}"])
        for m in ("image",) if cfg.local_crops else ():
            if LOCAL + m in features and m in taught:  # SILC: the local crop's embedding toward the global view's
                losses[f"distill/{m}-local"] = feature_loss(features[LOCAL + m].float(), taught[m].float(), "cosine")
                terms.append(cfg.feature_weight * losses[f"distill/{m}-local"])
        if terms:
            losses["loss"] = losses["loss"] + torch.stack(terms).sum()
        return losses, report


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over the batch: cosine, 1 - cos(student, teacher); l2, the squared distance of the student's features
    (mapped) from the teacher's unit embeddings."""
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return (student - teacher).pow(2).sum(-1).mean()
