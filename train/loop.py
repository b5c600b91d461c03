"""The training loop, top to bottom: build, (resume), train, checkpoint, export, evaluate. It runs any task
(`tessera.train.recipes.tasks`) and knows none of them: the task says what the model, data, objective, checkpoint and
export are."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.config import ConfigError, to_dict
from tessera.data.feed import DeviceFeed
from tessera.eval.zeroshot import read_classes

from .components import checkpoint, resume
from .components.ema import WeightEMA, build_ema
from .components.evaluate import check_eval, evaluate_weights, report
from .components.guard import Skipped, StepGuard, StopSignals
from .components.metrics import MetricsLogger, Window, data_counts, require_wandb
from .distributed.engine import build_engine
from .distributed.groups import DistInfo, all_reduce_mean, barrier, gather_objects, init_distributed
from .recipes.load import dump_config
from .recipes.tasks import Pretrain, make_task

log = logging.getLogger("tessera")


def run(cfg) -> dict[str, Any]:
    """Train the task that the resolved run config `cfg` names (what `python -m tessera.train.pretrain` runs)."""
    return train(make_task(cfg))


def train(task: Pretrain) -> dict[str, Any]:
    cfg, t = task.cfg, task.cfg.train
    dist = init_distributed()
    _setup_logging(dist)
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    shared = checkpoint.shared_storage(out_dir, dist)  # else node-local disks: each node keeps its own checkpoints
    if not cfg.resume and any(gather_objects((ckpt_dir / "latest").is_file())):
        raise ConfigError(
            f"{out_dir} already holds checkpoints of an earlier run: pass resume=latest to continue "
            "it, or choose another output_dir"
        )
    tag_dir = resume.agree(ckpt_dir, cfg.resume, dist) if cfg.resume else None
    universal = resume.universal(tag_dir, dist, cfg.deepspeed.zero_stage, shared) if tag_dir else None
    if cfg.eval.classes:  # a bad classes.json fails now, not after training
        read_classes(cfg.eval.classes)
    if "wandb" in cfg.log.report_to:  # on every rank, before anything is built
        require_wandb()

    _seed(cfg.seed)  # identical initial weights on every rank
    model = task.build_model()
    check_eval(cfg, model.modalities)
    data = task.data(model, dist)
    loader = data.loader
    step_fn = task.step
    engine = build_engine(
        model,
        t,
        cfg.deepspeed,
        step_fn.micro_batch(data.batch_size),
        task.lr_scales,
        step_fn.backwards(data.batch_size),
        node_local=not shared,
        load_universal=universal is not None,
    )
    _seed(cfg.seed + 1000 * dist.rank)  # distinct dropout/augmentation streams per rank
    # the weights' moving average, if asked for (held by the teacher's model for distill.teacher=ema): resumed below
    ema = build_ema(engine, t.ema, task.ema_module)
    step, logged = 0, {}
    skipped = Skipped(t.max_nonfinite_steps)  # the tally of skipped steps
    if tag_dir is not None:
        extras = checkpoint.load(engine, tag_dir, dist, task.trainable_only, universal, ema)
        step, logged = int(extras["step"]), extras.get("logged", {})
        if "skipped" in extras:
            skipped.load_state_dict(extras["skipped"])
        if step_fn.loss_scale is not None and "loss_scale" in extras:  # fp16: the scale it had reached
            step_fn.loss_scale.load_state_dict(extras["loss_scale"])
        loader.load_state_dict(extras["loader"], checkpoint.loader_states(tag_dir))
        log.info("resumed from %s at step %d (data epoch %d)", tag_dir, step, loader.epoch)
    elif cfg.resume:
        log.info("resume=%s: no checkpoint in %s yet, starting from step 0", cfg.resume, ckpt_dir)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info(
            "%s: %s trainable parameters; %d rank(s) x batch %d x accum %d; %d loader worker(s)",
            task.name,
            f"{n_train:,}",
            dist.world,
            data.batch_size,
            t.grad_accum,
            loader.num_workers,
        )
        log.info("starting the loader and the first step")

    logger = MetricsLogger(out_dir, dist.is_main, t.steps, step, cfg.log, to_dict(cfg), logged)
    with StopSignals() as signals:
        step, stopped = _steps(task, engine, ema, data, dist, logger, skipped, step, signals, shared)
    summary: dict[str, Any] = {"step": step, "output_dir": str(out_dir), "data": data_counts(loader.stats.to_dict())}
    if stopped:
        logger.close()
        barrier()
        return {**summary, "stopped": stopped}
    if dist.is_main:
        log.info("step %d: training done; exporting into %s", step, out_dir)
    summary.update(task.export(engine, out_dir, dist, step, ema))
    results = evaluate_weights(cfg, engine.module, ema, dist, step, logger)
    if dist.is_main:
        for weights, result in results.items():
            kind = "eval" if weights == "raw" else f"eval_{weights}"
            summary[kind] = result
            logger.images(step, kind, report(cfg, out_dir, step, result, weights))
    logger.close()
    barrier()
    return summary


def _steps(
    task: Pretrain,
    engine,
    ema: WeightEMA | None,
    data,
    dist: DistInfo,
    logger: MetricsLogger,
    skipped: Skipped,
    step: int,
    signals,
    shared: bool,
):
    """Train from `step` to train.steps, or until every rank agrees to stop on a signal; checkpoint as configured
    and at the last step; update the weights' moving average `ema` after each optimizer step; tally the skipped steps
    in `skipped` (checkpointed with the run). Returns the last step and what stopped the run early (None if nothing
    did)."""
    cfg, t, loader = task.cfg, task.cfg.train, data.loader
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    window = Window()
    loss_scale = task.step.loss_scale  # fp16
    guard = StepGuard(engine, engine.module, signals=signals, loss_scale=loss_scale)
    scheduler = engine.lr_scheduler  # the schedule a skipped step must not advance
    last_ckpt = step

    def save(at: int) -> None:  # a checkpoint of everything a resume needs, at optimizer step `at`
        checkpoint.save(
            engine, ckpt_dir, at, loader.state_dict(), dist, t.keep_ckpts, task.trainable_only, shared, ema,
            {
                "logged": logger.state_dict(),
                "skipped": skipped.state_dict(),
                **({"loss_scale": loss_scale.state_dict()} if loss_scale else {}),
            },
        )  # fmt: skip

    engine.train()
    started, first_step = time.perf_counter(), step + 1
    first_record: dict[str, float] = {}
    feed = DeviceFeed(loader, dist.device)  # batches on the device, each copy overlapping the step before
    unsettled: list[tuple[int, list]] = []  # the steps whose flags the host has not read yet, with their values
    while step < t.steps and not guard.stop:
        values = []
        for micro in range(t.grad_accum):
            with window.waiting():
                batch = feed.take()
            losses, report_ = task(engine, batch)  # its forward, backward passes and engine steps
            values.append({**losses, **report_})
            # the next batch's copy overlaps this step on the device; not where the loader's position is saved next
            # (a checkpoint, the last step, a stop), which must not count a batch no step has taken
            saves = step + 1 >= t.steps or guard.stop or _checkpoints_at(step + 1, t.ckpt_every)
            if micro < t.grad_accum - 1 or not saves:
                with window.waiting():
                    feed.ahead()
        step += 1
        if ema is not None:  # the optimizer stepped after the last micro-batch (each chunk's, in a two-pass step)
            ema.update(step)
        if step == first_step:  # the first step of this process: its graphs are built (and compiled: train.compile)
            first_record["first_step_s"] = time.perf_counter() - started
            log.info("first step: %.1f s%s", first_record["first_step_s"], " (with torch.compile)" if t.compile else "")
        for v in values:  # a skipped step's numbers stay out of the logged means (guard.good is 0.0 for it)
            window.add(v, guard.good)
        unsettled.append((step, values))
        logger.progress(step)

        log_now = step % t.log_every == 0 or step == t.steps or guard.stop
        eval_now = cfg.eval.every and step % cfg.eval.every == 0 and step < t.steps and not guard.stop
        ckpt_now = _checkpoints_at(step, t.ckpt_every)
        if log_now or eval_now or ckpt_now:  # the host learns which steps were skipped (may stop the run)
            _settle(guard, skipped, unsettled, scheduler)
        if log_now:
            means = all_reduce_mean(window.means(), dist.device) if window.count else {"loss": float("nan")}
            record = {
                **means,
                "lr": engine.get_lr()[0],
                "epoch": loader.epoch,
                **_grad_norm(engine),
                "samples_per_s": window.count * data.batch_size * dist.world / window.seconds(),
                # the share of the window's training time this rank's steps waited for a batch from the loader
                "data_wait": window.waited / window.seconds(),
                "nonfinite_steps": skipped.total,
                **({"overflow_steps": skipped.overflows, "loss_scale": float(loss_scale.scale)} if loss_scale else {}),
                "data": data_counts(loader.stats.to_dict()),
                **first_record,
            }
            first_record = {}
            logger.log(step, record)
            logger.progress(
                step, loss=means["loss"], sps=record["samples_per_s"], bad=sum(record["data"]["skipped"].values())
            )
            window.reset()
        if eval_now:
            with window.paused():
                evaluate_weights(cfg, engine.module, ema, dist, step, logger)
        if ckpt_now:
            with window.paused():
                save(step)
            last_ckpt = step

    _settle(guard, skipped, unsettled, scheduler)
    if last_ckpt != step and t.ckpt_every >= 0:
        save(step)
    guard.close()
    if not guard.stop:
        return step, None
    stopped = signals.requested or "a stop request on another rank"
    if t.ckpt_every >= 0:
        log.warning("%s: stopped at step %d with a checkpoint; resume=latest continues from it", stopped, step)
    else:
        log.warning("%s: stopped at step %d without a checkpoint (train.ckpt_every=-1)", stopped, step)
    return step, stopped


def _checkpoints_at(step: int, every: int) -> bool:
    """Whether train.ckpt_every=`every` checkpoints at `step` (besides the last step's)."""
    return every > 0 and step % every == 0


def _settle(guard: StepGuard, skipped: Skipped, unsettled: list[tuple[int, list]], scheduler=None) -> None:
    """Read the guard's flags of the steps in `unsettled` (one host sync), and count, log and, at
    train.max_nonfinite_steps in a row, stop on the skipped ones (a collective: every rank settles the same steps).
    `scheduler`: the learning-rate schedule to take the skipped steps back out of (`rewind_schedule`)."""
    bad_steps = 0
    for (step, values), (bad, advanced) in zip(unsettled, guard.settle()):
        if bad:
            bad_steps += advanced
            skipped.count(step, bad, values)
        else:
            skipped.reset()
    unsettled.clear()
    rewind_schedule(scheduler, bad_steps)


def rewind_schedule(scheduler, steps: int) -> None:
    """Take `steps` skipped optimizer steps back out of a LambdaLR schedule: the next step uses the learning rate the
    first skipped one would have. The host learns of a skip at the next settle (a log step, evaluation or
    checkpoint), so the steps between a skip and that settle run one position ahead in the schedule; with
    train.log_every=1 the sequence is exact."""
    if not steps or scheduler is None or not hasattr(scheduler, "lr_lambdas"):
        return
    scheduler.last_epoch = max(0, scheduler.last_epoch - steps)
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _setup_logging(dist: DistInfo) -> None:
    logging.basicConfig(
        level=logging.INFO if dist.is_main else logging.WARNING,
        format=f"%(asctime)s [rank{dist.rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("torch.distributed").setLevel(logging.WARNING)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _grad_norm(engine) -> dict[str, float]:
    """The last step's global gradient norm, where DeepSpeed computed one (it does when clipping)."""
    norm = engine.get_global_grad_norm()
    return {} if norm is None else {"grad_norm": float(norm)}
