"""Checkpoints: DeepSpeed's files plus each rank's RNG and data position, committed atomically.

Layout under OUTPUT_DIR/checkpoints:

    step00000500/            DeepSpeed model/optimizer/scheduler files, and per rank:
        tessera_rank0.pt     RNG states + data loader position (loaded with weights_only=True)
        ema.safetensors      with train.ema: the weights' moving average, whole tensors by parameter name
        MANIFEST.json        every file above and its size: a truncated file is found before it is loaded
        COMPLETE             written after every rank finished writing
    latest                   the newest COMPLETE tag, replaced atomically

DeepSpeed's own `latest` file is not used: it is written by rank 0 without waiting for the other ranks
and without an atomic rename, so a crash mid-save could leave it naming a partial checkpoint.

Every file is fsynced before `COMPLETE` is written, and `COMPLETE` before `latest`. The output directory may be
shared by all nodes or local to each (`shared_storage` finds out at start): on node-local disks the first rank of
every node writes `COMPLETE` and `latest` in its own copy, and DeepSpeed writes the model's states there too. A save
that fails (a full disk) removes what it wrote and says why; `latest` keeps naming the checkpoint before it. Which
checkpoint a run resumes from, and in what form, is `resume`'s.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import random
import re
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.config import ConfigError
from tessera.durable import atomic_write_bytes, fsync_path, fsync_tree

from ..distributed.groups import DistInfo, barrier, gather_objects
from .ema import EMA_FILE, WeightEMA
from .guard import check_weights

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step(\d{8})$")
MANIFEST = "MANIFEST.json"  # every file of a checkpoint and its size, written just before COMPLETE


class CheckpointError(ConfigError):
    """A checkpoint could not be written (a full disk, a failing filesystem); nothing partial is left."""


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    fsync_path(tmp)
    os.replace(tmp, path)


def shared_storage(out_dir: Path, dist: DistInfo) -> bool:
    """Whether every rank sees one output directory (a shared filesystem), or nodes have their own disks: rank 0
    leaves a file of a fresh name there, and every rank looks for it."""
    if dist.world == 1:
        return True
    probe, error = None, None
    if dist.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / f".storage-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
        except OSError as exc:  # told to every rank, so none waits for the others in a collective
            error = f"cannot write to output_dir '{out_dir}': {exc}"
    name, error = gather_objects((probe.name if probe else None, error))[0]
    if error:
        raise ConfigError(error)
    views = gather_objects((socket.gethostname(), (out_dir / name).exists()))
    if probe is not None:
        probe.unlink()
    elsewhere = [seen for host, seen in views if host != views[0][0]]  # rank 0's node-mates see it on any disk
    if any(elsewhere) and not all(elsewhere):
        log.warning("some nodes see rank 0's output directory and some do not: treating it as node-local")
    return all(seen for _, seen in views)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), np_state[2], np_state[3], np_state[4]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def disk_writer(dist: DistInfo, shared: bool) -> bool:
    """Whether this rank writes what there is one of per disk: rank 0 on a shared filesystem, else each node's first."""
    return dist.is_main if shared else dist.local_rank == 0


def _rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"tessera_rank{rank}.pt"


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    loader_state: dict[str, Any],
    dist: DistInfo,
    keep: int,
    trainable_only: bool = False,
    shared: bool = True,
    ema: WeightEMA | None = None,
    states: dict[str, Any] | None = None,
) -> str:
    """Save a checkpoint for optimizer step `step`; `latest` names it only once every rank is done. With
    `trainable_only` the frozen parameters are left out (adapter fine-tuning: a resumed run reloads its base).
    `shared`: the output directory is one for all ranks (else each node writes its own COMPLETE and latest). `ema`:
    the weights' moving average, written by the ranks that write per-disk files. `states`: more of this rank's
    state by name (the metrics logger's, the loss scale's, ...), which `load` returns among its extras."""
    check_weights(engine.module, step)  # never a checkpoint of non-finite weights
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    writer = disk_writer(dist, shared)  # of this disk's COMPLETE, latest and pruning
    if writer:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # left by a crashed save of the same step
            shutil.rmtree(tag_dir, ignore_errors=True)
        for stray in ckpt_dir.glob(".latest.tmp-*"):  # left by a kill between write and rename
            stray.unlink(missing_ok=True)
    barrier()
    latest = ckpt_dir / "latest"

    def kept() -> str:
        return f"latest still names {latest.read_text().strip()}" if latest.is_file() else "no checkpoint is kept"

    where = f"rank {dist.rank}, host {socket.gethostname()}"
    # before DeepSpeed's collective save: can every rank write here, with room for a checkpoint? One collective says
    problem = _room_to_write(ckpt_dir, latest)
    problems = [p for p in gather_objects(problem and f"{problem} ({where})") if p]
    if problems:
        raise CheckpointError(f"checkpoint at step {step}: {problems[0]}; nothing was written, {kept()}")
    try:
        engine.save_checkpoint(
            str(ckpt_dir),
            tag=tag,
            # universal_checkpoint_info: what DeepSpeed's universal conversion asks of the client (nothing to add)
            client_state={"step": step, "universal_checkpoint_info": {}},
            save_latest=False,
            exclude_frozen_parameters=trainable_only,
        )
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as "unexpected pos ..."
        # Inside DeepSpeed's save, whose collectives the other ranks are still in: no collective to agree through.
        # This rank stops now; torchrun (or srun --kill-on-bad-exit) stops the others, and a peer's broken collective
        # stops it here too.
        if writer:
            shutil.rmtree(tag_dir, ignore_errors=True)
        failure = "another rank stopped during the save (its log says why)" if _peer_lost(exc) else None
        failure = failure or _write_failure(exc, ckpt_dir)
        removed = f"the partial {tag} was removed, " if writer else ""
        raise CheckpointError(f"checkpoint at step {step}: {failure} ({where}); {removed}{kept()}") from None
    failure = None
    try:
        atomic_torch_save(
            {
                "step": step,
                "rng": rng_state(),
                "loader": loader_state,
                **(states or {}),
            },
            _rank_file(tag_dir, dist.rank),
        )
    except OSError as exc:
        failure = f"{_write_failure(exc, ckpt_dir)} ({where})"
    if ema is not None:  # every rank takes part (ZeRO-3 gathers the partitions) before anything is written
        try:
            ema.save(tag_dir / EMA_FILE, write=writer and failure is None)
        except OSError as exc:
            failure = f"{_write_failure(exc, ckpt_dir)} ({where})"
    failures = [f for f in gather_objects(failure) if f]  # every rank learns of any rank's failure
    if failures:
        if writer:
            shutil.rmtree(tag_dir, ignore_errors=True)
        barrier()
        raise CheckpointError(f"checkpoint at step {step}: {failures[0]}; the partial {tag} was removed, {kept()}")
    barrier()  # every rank's files are in place (no rank's temporary file is renamed under another's walk)
    fsync_tree(tag_dir)  # what DeepSpeed wrote too: on disk before COMPLETE says so
    barrier()
    if writer:
        sizes = {str(f.relative_to(tag_dir)): f.stat().st_size for f in sorted(tag_dir.rglob("*")) if f.is_file()}
        atomic_write_bytes(tag_dir / MANIFEST, json.dumps(sizes, indent=0).encode())
        atomic_write_bytes(tag_dir / "COMPLETE", f"{dist.world}\n".encode())
        atomic_write_bytes(ckpt_dir / "latest", tag.encode())
        _prune(ckpt_dir, keep, protect=tag)
    barrier()
    return tag


def _prune(ckpt_dir: Path, keep: int, protect: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    for name in tags[:-keep]:
        if name != protect:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)


PROBE_BYTES = 1 << 16


def _room_to_write(ckpt_dir: Path, latest: Path) -> str | None:
    """Why this rank cannot write a checkpoint under `ckpt_dir` (None if it can): a file there cannot be written, or
    the disk has less room free than the last checkpoint took (its MANIFEST)."""
    probe = ckpt_dir / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(bytes(PROBE_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return _write_failure(exc, ckpt_dir)
    finally:
        probe.unlink(missing_ok=True)
    try:
        last = json.loads((ckpt_dir / latest.read_text().strip() / MANIFEST).read_text()) if latest.is_file() else {}
        need = sum(int(v) for v in last.values())
        free = shutil.disk_usage(ckpt_dir).free
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # no last checkpoint to size this one by
    if free < need:
        return (
            f"no space left on {ckpt_dir}: {free / 2**20:.0f} MiB free, the last checkpoint took {need / 2**20:.0f} MiB"
        )
    return None


def _peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective that broke because another rank went away."""
    text = str(exc).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe"))


def _write_failure(exc: BaseException, where: Path) -> str:
    """What went wrong writing a checkpoint under `where`, in words: a full disk (or quota) said plainly."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    full = any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain)
    if not full:
        try:  # torch's writer loses the errno; a disk left with almost nothing free after the failure is full
            usage = shutil.disk_usage(where)
            full = usage.free < min(64 << 20, usage.total // 100)
        except OSError:
            pass
    if full:
        return f"no space left on {where}"
    return f"cannot write under {where}: {exc}"


def complete_world(tag_dir: Path) -> int | None:
    """The rank count `COMPLETE` records, or None where the checkpoint is not complete (no file, empty, garbage)."""
    try:
        text = (tag_dir / "COMPLETE").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def unusable(tag_dir: Path) -> str | None:
    """Why the checkpoint in `tag_dir` cannot be resumed (no COMPLETE record, a file missing or not the size it
    was saved at), or None when it can."""
    if complete_world(tag_dir) is None:
        return "it is incomplete (a save was interrupted)"
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return None  # saved before checkpoints listed their files
    try:
        sizes = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        return f"its {MANIFEST} cannot be read ({exc})"
    for name, size in sizes.items():
        try:
            actual = (tag_dir / name).stat().st_size
        except OSError:
            return f"'{tag_dir / name}' is missing"
        if actual != size:
            return f"'{tag_dir / name}' is {actual} bytes but was saved with {size} (truncated or overwritten)"
    return None


def extras_path(tag_dir: Path, rank: int) -> Path:
    """The file of RNG and data position that `rank` resumes from: its own, or rank 0's for a rank the saving run
    did not have."""
    saved = complete_world(tag_dir) or 0
    return _rank_file(tag_dir, rank if rank < saved else 0)


def loader_states(tag_dir: Path) -> Callable[[], list[dict] | None]:
    """Every saving rank's data position, in rank order, read when first asked for (a data loader resumed on another
    layout needs them all); None where a rank's file is not on this disk."""

    @functools.cache
    def read() -> list[dict] | None:
        files = [_rank_file(tag_dir, r) for r in range(complete_world(tag_dir) or 0)]
        if not all(f.is_file() for f in files):
            return None
        return [torch.load(f, map_location="cpu", weights_only=True)["loader"] for f in files]

    return read


def _unshare_steps(engine) -> None:
    """DeepSpeed's ZeRO-3 universal load gives every parameter group one shared `step` tensor; torch's AdamW then
    advances it once per group at each step, and Adam's bias correction runs ahead. One tensor per group again."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen: set[int] = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def _deepspeed_fp16(tag_dir: Path) -> bool:
    """Whether DeepSpeed's own fp16 mode wrote the checkpoint in `tag_dir` (its model states record the config;
    mapped, not read: the weights stay on disk)."""
    states = sorted(tag_dir.glob("*model_states.pt"))
    if not states:
        return False
    saved = torch.load(states[0], map_location="cpu", mmap=True, weights_only=False)  # DeepSpeed's own pickle
    return bool((saved.get("ds_config") or {}).get("fp16", {}).get("enabled", False))


def load(
    engine,
    tag_dir: Path,
    dist: DistInfo,
    trainable_only: bool = False,
    universal_dir: Path | None = None,
    ema: WeightEMA | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler (DeepSpeed), the weights' moving average (`ema`) and this rank's RNG;
    return its saved extras. On another world size the weights and optimizer come from `universal_dir` (see
    `universal`; ZeRO 0 needs none), and the RNG stays as seeded."""
    saved_world = complete_world(tag_dir) or 0
    extras_file = extras_path(tag_dir, dist.rank)
    if not extras_file.is_file():
        raise ConfigError(f"'{tag_dir}' was saved by {saved_world} rank(s) and has no state for rank {dist.rank}")
    source = universal_dir or tag_dir
    if _deepspeed_fp16(source) and not engine.fp16_enabled():
        raise ConfigError(
            f"'{tag_dir}' was saved under DeepSpeed's own fp16 mode (half weights, an fp16 optimizer state: what "
            "train.precision=fp16 meant before it became autocast over fp32 weights), which this run cannot take "
            "over; finish that run with the Tessera that started it, or fine-tune from its exported model"
        )
    load_path, client = engine.load_checkpoint(
        str(source.parent),
        tag=source.name,
        load_module_strict=not trainable_only,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint in '{source}'")
    if universal_dir is not None:
        _unshare_steps(engine)
    if ema is not None:
        if (tag_dir / EMA_FILE).is_file():
            ema.load(tag_dir / EMA_FILE)
        else:
            ema.reset()
            log.warning("%s holds no weight EMA (saved without train.ema): it starts from the resumed weights", tag_dir)
    extras = torch.load(extras_file, map_location="cpu", weights_only=True)
    if saved_world == dist.world:
        set_rng_state(extras["rng"])
    else:
        log.warning("checkpoint saved by %d rank(s), resumed on %d", saved_world, dist.world)
    return extras
