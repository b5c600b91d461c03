"""Checkpoints: DeepSpeed's files plus each rank's RNG and data position, committed atomically.

Layout under OUTPUT_DIR/checkpoints:

    step00000500/            DeepSpeed model/optimizer/scheduler files, and per rank:
        tessera_rank0.pt     RNG states + data loader position (loaded with weights_only=True)
        COMPLETE             written after every rank finished writing
    latest                   the newest COMPLETE tag, replaced atomically

DeepSpeed's own `latest` file is not used: it is written by rank 0 without waiting for the other ranks
and without an atomic rename, so a crash mid-save could leave it naming a partial checkpoint.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.config import ConfigError

from .distributed import DistInfo, barrier

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step(\d{8})$")


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    loader_state: dict[str, Any],
    dist: DistInfo,
    keep: int,
    trainable_only: bool = False,
) -> str:
    """Save a checkpoint for optimizer step `step`; `latest` names it only once every rank is done. With
    `trainable_only` the frozen parameters are left out (adapter fine-tuning: a resumed run reloads its base)."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # left by a crashed save of the same step
            shutil.rmtree(tag_dir)
    barrier()
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False, exclude_frozen_parameters=trainable_only
    )
    atomic_torch_save(
        {"step": step, "rng": rng_state(), "loader": loader_state}, tag_dir / f"tessera_rank{dist.rank}.pt"
    )
    barrier()
    if dist.is_main:
        (tag_dir / "COMPLETE").write_text(f"{dist.world}\n")
        atomic_write_bytes(ckpt_dir / "latest", tag.encode())
        _prune(ckpt_dir, keep, protect=tag)
    barrier()
    return tag


def _prune(ckpt_dir: Path, keep: int, protect: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    for name in tags[:-keep]:
        if name != protect:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def resolve(ckpt_dir: Path, which: str) -> Path | None:
    """The tag directory `which` names ('latest', a tag, or a path); None when 'latest' has nothing yet."""
    if which == "latest":
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            return None
        tag_dir = ckpt_dir / latest.read_text().strip()
    elif os.sep in which or Path(which).is_dir():
        tag_dir = Path(which)
    else:
        tag_dir = ckpt_dir / which
    if not tag_dir.is_dir():
        raise ConfigError(f"resume={which}: checkpoint '{tag_dir}' does not exist")
    if not (tag_dir / "COMPLETE").is_file():
        raise ConfigError(
            f"resume={which}: checkpoint '{tag_dir}' is incomplete (a save was interrupted); resume from an earlier tag"
        )
    return tag_dir


def load(engine, tag_dir: Path, dist: DistInfo, trainable_only: bool = False) -> dict[str, Any]:
    """Restore model, optimizer, scheduler (DeepSpeed) and this rank's RNG; return its saved extras."""
    saved_world = int((tag_dir / "COMPLETE").read_text().strip() or 0)
    extras_path = tag_dir / f"tessera_rank{dist.rank}.pt"
    if not extras_path.is_file():
        raise ConfigError(f"'{tag_dir}' was saved by {saved_world} rank(s) and has no state for rank {dist.rank}")
    load_path, client = engine.load_checkpoint(
        str(tag_dir.parent),
        tag=tag_dir.name,
        load_module_strict=not trainable_only,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise ConfigError(f"DeepSpeed could not load the checkpoint in '{tag_dir}'")
    extras = torch.load(extras_path, map_location="cpu", weights_only=True)
    set_rng_state(extras["rng"])
    if saved_world != dist.world:
        log.warning("checkpoint saved by %d rank(s), resumed on %d", saved_world, dist.world)
    return extras
