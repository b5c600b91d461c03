"""Tasks: what one kind of training run is. The loop (`tessera.train.loop`) runs any of them the same way.

A task declares
- its model: built from scratch, or an exported base with its model transform (an adapter) on it (`build_model`);
- its data: the training loader and the micro-batch it feeds per rank (`data`);
- its objective: one forward of a batch, returning losses and a report, and the step that trains a micro-batch
  with it: one autograd graph, or the two-pass step when towers run in chunks (`step`, `components.steps`);
- what a checkpoint holds (`trainable_only`) and what it exports at the end (`export`: the trained weights, their
  moving average (train.ema), or both, as export.weights says).

Tasks are registered by name in `TASKS`; a run config names its task (`task`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from tessera.data import LABEL, SourceConfig, expand_shards, shard_sizes, train_loader
from tessera.data.label import collate_labels, keep
from tessera.data.shots import write_shots
from tessera.eval.zeroshot import read_classes, templates_for
from tessera.models import build_model, load_model
from tessera.models.adapters import apply_adapter, parameter_counts

from ..components.compiled import compile_towers
from ..components.distill import DistillObjective, Teacher, build_teacher, check_pairs, teacher_inputs
from ..components.ema import WeightEMA
from ..components.export import export_adapter, export_engine
from ..components.objectives import ClassificationObjective, ContrastiveObjective, Losses
from ..components.precision import autocast_dtype, resolve
from ..components.steps import make_step
from ..distributed.groups import DistInfo, barrier, init_distributed
from .runs import FinetuneConfig, PretrainConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainData:
    loader: Any  # an endless iterator of batches, with stats, epoch, num_workers and a resumable state
    batch_size: int  # samples per rank and micro-step


def prepare(model: nn.Module, cfg: PretrainConfig) -> nn.Module:
    """What training wraps around a model written for one device: locked towers, gradient checkpointing, the
    precision its towers compute in, and torch.compile of the towers."""
    model.autocast_dtype = autocast_dtype(cfg.train.precision)
    for modality in cfg.train.lock:
        model.towers[modality].requires_grad_(False)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.train.compile:
        compile_towers(model, cfg.train.compile_recompiles, replayed=bool(cfg.train.chunk_size))
    return model


class Pretrain:
    """A model from scratch, the contrastive loss of its pairs on paired shards; checkpoints hold everything and
    the run exports OUTPUT_DIR/model."""

    name: ClassVar[str] = "pretrain"
    trainable_only: ClassVar[bool] = False  # what a checkpoint holds: every parameter

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.model: nn.Module | None = None
        self.objective = None
        self.step = None
        self.teacher: Teacher | None = None  # distill
        self.ema_module: nn.Module | None = None  # distill.teacher=ema: the model that holds the weights' average

    @property
    def lr_scales(self) -> dict[str, float]:
        return {}

    def build_model(self) -> nn.Module:
        return self.finish(build_model(self.cfg.model))

    def finish(self, model: nn.Module) -> nn.Module:
        """The model built: its teacher (distill) and what that adds to it, `prepare`, the objective, the step."""
        cfg = self.cfg
        if cfg.distill is not None:
            shards = [s.shards for s in cfg.data.train]
            device = init_distributed().device
            self.teacher, self.ema_module = build_teacher(cfg.distill, model, cfg.train.precision, shards, device)
        self.model = prepare(model, cfg)
        self.objective = self.make_objective(self.model)
        self.step = make_step(self.objective, self.model, cfg.train)
        return self.model

    def make_objective(self, model: nn.Module):
        # the training loader drops short batches: every rank's hold train.batch_size samples
        time_axes = {m: t.time_axis for m, t in model.towers.items() if t.time_axis is not None}
        objective = ContrastiveObjective(
            model.pairs, self.cfg.loss, tuples=model.cfg.tuples, uniform_batches=True, time_axes=time_axes
        )
        if self.teacher is None:
            return objective
        pairs = check_pairs(self.teacher, model.pairs, self.cfg.distill, self.cfg.loss.kind)
        return DistillObjective(objective, self.teacher, self.cfg.distill, pairs)

    def pipelines(self, model: nn.Module) -> tuple[dict, dict, list[str]]:
        """Transforms and collators by batch key, and the keys every training sample must carry."""
        # inputs in their compact form (images as uint8, normalised by the tower on the device): a quarter of the
        # bytes through shared memory, pinning and the host-to-device copy, and the same numbers
        transforms, collators, keys = model.transforms(True, compact=True), model.collators(), list(model.modalities)
        if self.cfg.loss.positives == "label":  # every sample also carries its `cls` id
            transforms[LABEL], collators[LABEL] = keep, collate_labels
            keys.append(LABEL)
        if self.teacher is not None:  # the teacher's inputs (or stored embeddings), beside the student's
            teacher_inputs(self.teacher, self.cfg.distill, model, transforms, collators)
        return transforms, collators, keys

    def data(self, model: nn.Module, dist: DistInfo) -> TrainData:
        cfg = self.cfg
        transforms, collators, keys = self.pipelines(model)
        loader = train_loader(
            cfg.data,
            transforms,
            collators,
            keys,
            cfg.train.batch_size,
            chunk_size=cfg.train.chunk_size,
            seed=cfg.seed,
            rank=dist.rank,
            world=dist.world,
            pin_memory=dist.device.type == "cuda",
        )
        return TrainData(loader, cfg.train.batch_size)

    def __call__(self, engine, batch: dict[str, Any]) -> Losses:
        """Train on one micro-batch: its forward and backward passes and the engine's step calls."""
        return self.step(engine, batch)

    def export(self, engine, out_dir: Path, dist: DistInfo, step: int, ema: WeightEMA | None = None) -> dict[str, str]:
        if not self.cfg.train.export:
            return {}
        folders = {kind: out_dir / f"model{suffix}" for kind, suffix in self.cfg.export.suffixes().items()}
        export_engine(engine, self.model, folders, dist, metadata={"step": step, "seed": self.cfg.seed}, ema=ema)
        return {folder.name: str(folder) for folder in folders.values()}


class ContrastiveFinetune(Pretrain):
    """An exported base with an adapter on it (LoRA, prompts, or none: every weight trains), the pretraining loss on
    paired shards. Checkpoints hold what trains (the adapter) and reload the base; the run exports the adapter
    (OUTPUT_DIR/adapter) and, for LoRA, the base with it merged in (OUTPUT_DIR/model)."""

    name: ClassVar[str] = "contrastive"

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        self.cfg: FinetuneConfig = cfg
        self.classnames = read_classes(cfg.classes)[0] if cfg.classes else None

    @property
    def trainable_only(self) -> bool:
        return self.cfg.adapter.kind != "full"

    @property
    def lr_scales(self) -> dict[str, float]:
        return self.cfg.adapter.lr_scales

    def attach(self, base: nn.Module) -> nn.Module:
        """The base with this run's untrained adapter on it."""
        return apply_adapter(base, self.cfg.adapter, self.classnames)

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        self.finish(self.attach(load_model(cfg.base)))
        counts = parameter_counts(self.model)
        log.info(
            "fine-tuning %s (%s): %s of %s parameters trainable (%.3f%%)",
            cfg.base,
            cfg.adapter.kind,
            f"{counts['trainable']:,}",
            f"{counts['total']:,}",
            100 * counts["trainable"] / counts["total"],
        )
        return self.model

    def export(self, engine, out_dir: Path, dist: DistInfo, step: int, ema: WeightEMA | None = None) -> dict[str, str]:
        if not self.trainable_only:
            return super().export(engine, out_dir, dist, step, ema)
        cfg = self.cfg
        return export_adapter(
            engine,
            cfg.base,
            self.attach,
            out_dir,
            dist,
            cfg.adapter.export_merged and cfg.train.export,
            metadata={"step": step, "seed": cfg.seed, "base": cfg.base},
            suffixes=cfg.export.suffixes(),
            ema=ema,
        )


class FewShotFinetune(ContrastiveFinetune):
    """Classification of `fewshot.modality` from k `cls`-labelled shots per class of data.train, against the class
    prompts of the prompt tower; the shots are copied by rank 0 into OUTPUT_DIR/fewshot and read as the one source,
    in batches no larger than the shots a rank holds."""

    name: ClassVar[str] = "fewshot"

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        self.classnames, self.templates = read_classes(cfg.classes)

    def make_objective(self, model: nn.Module):
        modality = self.cfg.fewshot.modality
        return ClassificationObjective(model, modality, self.classnames, templates_for(modality, self.templates))

    def data(self, model: nn.Module, dist: DistInfo) -> TrainData:
        cfg, fs = self.cfg, self.cfg.fewshot
        out_dir = Path(cfg.output_dir) / "fewshot"
        spec = str(out_dir / "shots-000000.tar")
        if dist.is_main:
            spec = write_shots([s.shards for s in cfg.data.train], fs.k, len(self.classnames), fs.seed, out_dir)
        barrier()
        shots = sum(shard_sizes(expand_shards(spec)).values())
        batch_size = min(cfg.train.batch_size, max(1, shots // dist.world))
        if batch_size < cfg.train.batch_size:
            log.warning(
                "fewshot: %d shots over %d rank(s): batch size %d -> %d",
                shots,
                dist.world,
                cfg.train.batch_size,
                batch_size,
            )
        log.info("fewshot: %d shots (k=%d, %d classes) of %s", shots, fs.k, len(self.classnames), fs.modality)
        transforms = {fs.modality: model.transforms(is_train=True, compact=True)[fs.modality], LABEL: keep}
        collators = {fs.modality: model.collators()[fs.modality], LABEL: collate_labels}
        source = SourceConfig(spec, name="shots", modalities=[fs.modality, LABEL])
        data_cfg = dataclasses.replace(cfg.data, train=[source], batching="mixed")
        loader = train_loader(
            data_cfg,
            transforms,
            collators,
            [fs.modality, LABEL],
            batch_size,
            seed=cfg.seed,
            rank=dist.rank,
            world=dist.world,
            pin_memory=dist.device.type == "cuda",
        )
        return TrainData(loader, batch_size)


TASKS: dict[str, type[Pretrain]] = {task.name: task for task in (Pretrain, ContrastiveFinetune, FewShotFinetune)}


def make_task(cfg: PretrainConfig) -> Pretrain:
    """The task a run config names. `train.precision: auto` becomes the precision this machine computes natively
    here, so that the run's config.yaml records what ran."""
    cfg.train.precision = resolve(cfg.train.precision)
    return TASKS[cfg.task](cfg)
