"""The pretraining loop, top to bottom: build, (resume), train, checkpoint, export, evaluate."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.data import (
    LABEL_PIPELINE,
    PerSourceLoader,
    SourceConfig,
    TrainLoader,
    expand_shards,
    to_device,
    train_loader,
)
from tessera.data.shards import shard_sizes
from tessera.eval.retrieval import evaluate_pairs, summary_table, write_report
from tessera.eval.zeroshot import evaluate_zeroshot, plot_confusion, read_classes
from tessera.models import build_model, load_model
from tessera.models.adapters import apply_lora, parameter_counts
from tessera.config import ConfigError
from tessera.models.prompts import apply_prompts

from . import checkpoint
from .config import FinetuneConfig, PretrainConfig, dump_config
from .distributed import DistInfo, all_reduce_mean, barrier, gather_objects, init_distributed
from .engine import build_engine
from .export import export_adapter, export_engine
from .fewshot import FewShotTask, select_shots
from .metrics import MetricsLogger, Window
from .task import ContrastiveTask

log = logging.getLogger("tessera")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def _setup_logging(dist: DistInfo) -> None:
    logging.basicConfig(level=logging.INFO if dist.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank{dist.rank}] %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("torch.distributed").setLevel(logging.WARNING)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _data_counts(loader: TrainLoader | PerSourceLoader) -> dict[str, Any]:
    """Bad-sample counts summed over ranks (a collective)."""
    total: dict[str, Any] = {"seen": 0, "skipped": {}, "events": {}}
    for stats in gather_objects(loader.stats.to_dict()):
        total["seen"] += stats["seen"]
        for group in ("skipped", "events"):
            for k, v in stats[group].items():
                total[group][k] = total[group].get(k, 0) + v
    return total


def _evaluate(cfg: PretrainConfig, engine, model, dist: DistInfo, step: int, logger: MetricsLogger) -> dict | None:
    """Retrieval on data.val. Every rank runs it (so ZeRO-3 can gather parameters); rank 0 reports."""
    if not cfg.data.val:
        return None
    pairs = cfg.eval.pairs or model.pairs
    result = evaluate_pairs(engine.module, cfg.data.val, pairs, cfg.eval.batch_size, dist.device,
                            DTYPES[cfg.train.precision])
    # pairs evaluated that the loss never aligned: their retrieval is emergent, through the shared space
    result["emergent"] = [f"{a}-{b}" for a, b in pairs if (a, b) not in model.pairs and (b, a) not in model.pairs]
    record = {"metrics": result["metrics"], "chance": result["chance"], "diagnostics": result["diagnostics"],
              "n": result["n"]}
    if cfg.eval.classes:
        classnames, templates = read_classes(cfg.eval.classes)
        result["zeroshot"] = {
            m: evaluate_zeroshot(engine.module, cfg.data.val, m, classnames, templates, cfg.eval.batch_size,
                                 dist.device, DTYPES[cfg.train.precision])
            for m in cfg.eval.classify}
        record["zeroshot"] = {m: {"metrics": z["metrics"], "chance": z["chance"]} for m, z in result["zeroshot"].items()}
    logger.log(step, record, kind="eval")
    return result


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    dist = init_distributed()
    _setup_logging(dist)
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    t = cfg.train
    if not cfg.resume and (ckpt_dir / "latest").is_file():
        raise ConfigError(f"{out_dir} already holds checkpoints of an earlier run: pass resume=latest to continue "
                          "it, or choose another output_dir")
    tag_dir = checkpoint.resolve(ckpt_dir, cfg.resume) if cfg.resume else None

    if cfg.eval.classes:   # a bad classes.json fails now, not after training
        read_classes(cfg.eval.classes)
    _seed(cfg.seed)  # identical initial weights on every rank
    model = _build_model(cfg)
    for modality in t.lock:
        model.towers[modality].requires_grad_(False)
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    transforms, collators, modalities = model.transforms(is_train=True), model.collators(), model.modalities
    data_cfg, fewshot = cfg.data, isinstance(cfg, FinetuneConfig) and cfg.task == "fewshot"
    if cfg.loss.positives == "label" or fewshot:   # every sample also carries its `cls` id
        transforms["label"], collators["label"] = LABEL_PIPELINE["transform"], LABEL_PIPELINE["collate"]
        modalities = [*modalities, "label"]
    if fewshot:
        data_cfg, t = _fewshot_data(cfg, out_dir, dist)
    loader = train_loader(data_cfg, transforms, collators, modalities, t.batch_size, seed=cfg.seed, rank=dist.rank,
                          world=dist.world, pin_memory=dist.device.type == "cuda")
    engine = build_engine(model, cfg)
    # adapter fine-tuning checkpoints hold the adapter and its optimizer state, not the frozen base (which a
    # resumed run reloads from `base`)
    frozen = not (isinstance(cfg, FinetuneConfig) and cfg.adapter.kind != "full")
    _seed(cfg.seed + 1000 * dist.rank)  # distinct dropout/augmentation streams per rank

    step = 0
    if tag_dir is not None:
        extras = checkpoint.load(engine, tag_dir, dist, frozen)
        step = int(extras["step"])
        loader.load_state_dict(extras["loader"])
        log.info("resumed from %s at step %d (data epoch %d)", tag_dir, step, loader.epoch)
    elif cfg.resume:
        log.info("resume=%s: no checkpoint in %s yet, starting from step 0", cfg.resume, ckpt_dir)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("model: %s trainable parameters; %d rank(s) x batch %d x accum %d; %d loader worker(s)",
                 f"{n_train:,}", dist.world, t.batch_size, t.grad_accum, loader.num_workers)

    logger = MetricsLogger(out_dir, dist.is_main, t.steps, step)
    if fewshot:
        task = FewShotTask(model, cfg.fewshot.modality, *read_classes(cfg.fewshot.classes or cfg.eval.classes))
    else:
        task = ContrastiveTask(model.pairs, cfg.loss)
    dtype = DTYPES[t.precision]
    window = Window()
    last_ckpt = step
    engine.train()
    while step < t.steps:
        for _ in range(t.grad_accum):
            batch = to_device(next(loader), dist.device, dtype)
            losses, report = task(engine, batch)
            engine.backward(losses["loss"])
            engine.step()
            window.add({**losses, **report})
        step += 1
        logger.progress(step)

        if step % t.log_every == 0 or step == t.steps:
            means = all_reduce_mean(window.means(), dist.device)
            record = {**means, "lr": engine.get_lr()[0], "epoch": loader.epoch, **_grad_norm(engine),
                      "samples_per_s": window.count * t.batch_size * dist.world / window.seconds(),
                      "data": _data_counts(loader)}
            logger.log(step, record)
            logger.progress(step, loss=means["loss"], sps=record["samples_per_s"],
                            bad=sum(record["data"]["skipped"].values()))
            window.reset()
        if cfg.eval.every and step % cfg.eval.every == 0 and step < t.steps:
            with window.paused():
                _evaluate(cfg, engine, model, dist, step, logger)
        if t.ckpt_every > 0 and step % t.ckpt_every == 0:
            with window.paused():
                checkpoint.save(engine, ckpt_dir, step, loader.state_dict(), dist, t.keep_ckpts, frozen)
            last_ckpt = step

    if last_ckpt != step and t.ckpt_every >= 0:
        checkpoint.save(engine, ckpt_dir, step, loader.state_dict(), dist, t.keep_ckpts, frozen)
    summary: dict[str, Any] = {"step": step, "output_dir": str(out_dir), "data": _data_counts(loader)}
    if isinstance(cfg, FinetuneConfig) and cfg.adapter.kind != "full":
        summary.update(export_adapter(engine, cfg.base, lambda m: _attach_adapter(cfg, m), out_dir, dist,
                                      cfg.adapter.export_merged and t.export,
                                      metadata={"step": step, "seed": cfg.seed, "base": cfg.base}))
    elif t.export:
        export_engine(engine, model, out_dir / "model", dist, metadata={"step": step, "seed": cfg.seed})
        summary["model"] = str(out_dir / "model")
    result = _evaluate(cfg, engine, model, dist, step, logger)
    logger.close()
    if result is not None and dist.is_main:
        summary["eval"] = result
        _report_eval(cfg, out_dir, step, result)
    barrier()
    return summary


def _fewshot_data(cfg: FinetuneConfig, out_dir: Path, dist: DistInfo):
    """(data config, train config) for few-shot fine-tuning: the k shots per class, copied by rank 0 into
    OUTPUT_DIR/fewshot, as the one training source; the batch no larger than the shots a rank holds."""
    fs = cfg.fewshot
    classnames, _ = read_classes(fs.classes or cfg.eval.classes)
    spec = str(out_dir / "fewshot" / "shots-000000.tar")
    if dist.is_main:
        spec = select_shots([s.shards for s in cfg.data.train], fs.k, len(classnames), fs.seed, out_dir / "fewshot")
    barrier()
    shots = sum(shard_sizes(expand_shards(spec)).values())
    source = SourceConfig(spec, name="shots", modalities=[fs.modality, "label"])
    data_cfg = dataclasses.replace(cfg.data, train=[source], batching="mixed")
    t = cfg.train
    per_rank = max(1, shots // dist.world)
    if t.batch_size > per_rank:
        log.warning("fewshot: %d shots over %d rank(s): batch size %d -> %d", shots, dist.world, t.batch_size, per_rank)
        t = dataclasses.replace(t, batch_size=per_rank)
        cfg.train = t   # the engine's micro-batch size too
    log.info("fewshot: %d shots (k=%d, %d classes) of %s", shots, fs.k, len(classnames), fs.modality)
    return data_cfg, t


def _build_model(cfg: PretrainConfig):
    """A fresh model from cfg.model; for fine-tuning, the exported base, with LoRA on it when configured."""
    if not isinstance(cfg, FinetuneConfig):
        return build_model(cfg.model)
    model = _attach_adapter(cfg, load_model(cfg.base))
    counts = parameter_counts(model)
    log.info("fine-tuning %s (%s): %s of %s parameters trainable (%.3f%%)", cfg.base, cfg.adapter.kind,
             f"{counts['trainable']:,}", f"{counts['total']:,}", 100 * counts["trainable"] / counts["total"])
    return model


def _attach_adapter(cfg: FinetuneConfig, model):
    """The base `model` with the configured adapter on it (LoRA or prompts); unchanged for full fine-tuning."""
    if cfg.adapter.kind == "lora":
        return apply_lora(model, cfg.adapter.lora)
    if cfg.adapter.kind == "prompt":
        classes = cfg.fewshot.classes or cfg.eval.classes
        return apply_prompts(model, cfg.adapter.prompt, read_classes(classes)[0] if classes else None)
    return model


def _grad_norm(engine) -> dict[str, float]:
    """The last step's global gradient norm, where DeepSpeed computed one (it does when clipping)."""
    norm = engine.get_global_grad_norm()
    return {} if norm is None else {"grad_norm": float(norm)}


def _report_eval(cfg: PretrainConfig, out_dir: Path, step: int, result: dict[str, Any]) -> None:
    """OUTPUT_DIR/eval: retrieval.json + its R@K plot + retrieval.md, and zeroshot.json + its confusion matrix
    (linked from retrieval.md) when eval.classes is set; the tables go to stdout."""
    eval_dir = out_dir / "eval"
    doc = {"dataset": [s.shards for s in cfg.data.val], "model": str(out_dir / "model"),
           "task": "zeroshot_retrieval", "step": step, **result}
    zeroshot = doc.pop("zeroshot", None) or {}
    extra = []
    if zeroshot:
        classnames, _ = read_classes(cfg.eval.classes)
        eval_dir.mkdir(parents=True, exist_ok=True)
    for m, z in zeroshot.items():
        (eval_dir / f"zeroshot_{m}.json").write_text(json.dumps(
            {"dataset": doc["dataset"], "model": doc["model"], "task": "zeroshot_classification",
             "modality": m, "step": step, **z}, indent=2))
        plot_confusion(z["confusion"], classnames, eval_dir / f"zeroshot_{m}_confusion.png")
        metrics, chance = z["metrics"], z["chance"]
        extra += [f"## Zero-shot {m} classification ({z['classes']} classes, {z['n']} samples)", "",
                  "| metric | value | chance |", "|---|---|---|",
                  *[f"| {k} | {metrics[k]:.1%} | {chance[k]:.1%} |" for k in metrics], "",
                  f"Confusion matrix: ![confusion](zeroshot_{m}_confusion.png); every number: "
                  f"[zeroshot_{m}.json](zeroshot_{m}.json)", ""]
    write_report(doc, eval_dir / "retrieval.json", extra)
    print(f"\nzero-shot retrieval on held-out data after {step} steps:\n{summary_table(result)}", flush=True)
    if result.get("emergent"):
        print(f"never paired in training (emergent retrieval through the shared space): "
              f"{', '.join(result['emergent'])}", flush=True)
    for m, z in zeroshot.items():
        print(f"zero-shot {m} classification ({z['classes']} classes, {z['n']} samples): "
              f"acc1 {z['metrics']['acc1']:.1%} (chance {z['chance']['acc1']:.1%}), "
              f"acc5 {z['metrics']['acc5']:.1%} (chance {z['chance']['acc5']:.1%})", flush=True)
