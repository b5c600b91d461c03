"""Which checkpoint a run resumes from, agreed by every rank, and in the form DeepSpeed can load on this world size.

`resume=latest` takes the newest complete checkpoint `latest` names (or, where that one is damaged, the newest
complete one, with a warning); a tag or a path must name a complete checkpoint. On node-local disks the ranks agree
on rank 0's choice through a collective, and a rank whose disk lacks it stops the run with a message naming it. On
another world size at ZeRO 1-3, the checkpoint is converted once to DeepSpeed's universal form, kept beside it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from tessera.config import ConfigError
from tessera.durable import atomic_write_bytes, publish_dir

from ..distributed.groups import DistInfo, barrier, gather_objects
from .checkpoint import TAG_RE, complete_world, disk_writer, extras_path, unusable

log = logging.getLogger(__name__)


def resolve(ckpt_dir: Path, which: str) -> Path | None:
    """The tag directory `which` names ('latest', a tag, or a path); None when 'latest' has nothing yet. Where
    `latest` names a checkpoint that is missing or incomplete, the newest complete one is taken, with a warning;
    a checkpoint named explicitly must be complete."""
    if which == "latest":
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            return None
        tag_dir = ckpt_dir / latest.read_text().strip()
        problem = unusable(tag_dir)
        if problem:
            tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))
            done = [p for p in tags if unusable(p) is None]
            if not done:
                raise ConfigError(
                    f"resume=latest: '{tag_dir}' cannot be resumed ({problem}) and {ckpt_dir} holds no complete "
                    "checkpoint"
                )
            log.warning(
                "resume=latest: '%s' cannot be resumed (%s); resuming from '%s', the newest complete one",
                tag_dir,
                problem,
                done[-1],
            )
            return done[-1]
        return tag_dir
    if os.sep in which or Path(which).is_dir():
        tag_dir = Path(which)
    else:
        tag_dir = ckpt_dir / which
    if not tag_dir.is_dir():
        raise ConfigError(f"resume={which}: checkpoint '{tag_dir}' does not exist")
    problem = unusable(tag_dir)
    if problem:
        raise ConfigError(f"resume={which}: checkpoint '{tag_dir}' cannot be resumed: {problem}; resume from another")
    return tag_dir


def agree(ckpt_dir: Path, which: str, dist: DistInfo) -> Path | None:
    """The checkpoint every rank resumes from: rank 0's choice, sent to all through a collective (each rank's own
    `latest` may differ, or be missing, on node-local disks). A rank whose disk lacks a complete copy of it stops
    the run on every rank, with a message naming it."""
    try:
        mine, error = resolve(ckpt_dir, which), None
    except Exception as exc:  # told to every rank: none may wait in a collective for one that has raised
        mine, error = None, str(exc) if isinstance(exc, ConfigError) else f"resume={which}: {exc}"
    if dist.world == 1:
        if error:
            raise ConfigError(error)
        return mine
    named = None if mine is None else mine.name if mine.parent == ckpt_dir else str(mine.resolve())
    chosen, chosen_error = gather_objects((named, error))[0]
    if chosen_error:
        raise ConfigError(chosen_error)
    here = None if chosen is None else Path(chosen) if os.sep in chosen else ckpt_dir / chosen
    ok = here is None or (unusable(here) is None and extras_path(here, dist.rank).is_file())
    views = gather_objects((socket.gethostname(), ok))
    lacking = [f"rank {r} on {host}" for r, (host, ok) in enumerate(views) if not ok]
    if lacking:
        raise ConfigError(
            f"resume={which}: rank 0 resumes from '{chosen}', but {', '.join(lacking)} has no complete copy of it "
            f"(COMPLETE and its rank's tessera_rank file) under its {ckpt_dir}: every node must hold the "
            "checkpoint (copy it there, or resume from a tag all nodes hold)"
        )
    return here


def universal(tag_dir: Path, dist: DistInfo, zero_stage: int, shared: bool = True) -> Path | None:
    """Where the world size changed at ZeRO 1-3 (each rank's optimizer file holds its partition of the saving run's
    layout), the checkpoint in DeepSpeed's universal form, made once beside its files (`<tag>/universal`) and kept
    with it; None where DeepSpeed loads the checkpoint as it is."""
    saved = complete_world(tag_dir)
    if zero_stage == 0 or saved is None or saved == dist.world:
        return None
    out = tag_dir / "universal"
    error = None
    if disk_writer(dist, shared) and not (out / "COMPLETE").is_file():
        log.info(
            "checkpoint saved by %d rank(s), resumed on %d: converting it to DeepSpeed's universal form",
            saved,
            dist.world,
        )
        tmp = tag_dir / f".universal.tmp-{uuid.uuid4().hex[:8]}"
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir)]
        cmd += ["--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        cmd += ["--inject_missing_state"]  # checkpoints saved before they recorded universal_checkpoint_info
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            error = (
                f"'{tag_dir}' was saved by {saved} rank(s) at ZeRO-{zero_stage}; resuming on {dist.world} needs "
                f"DeepSpeed's universal form, and converting it failed: {last[0]}"
            )
        else:
            (tag_dir / "latest_universal").unlink(missing_ok=True)  # the converter's pointer to its output folder
            atomic_write_bytes(tmp / "COMPLETE", b"")
            publish_dir(tmp, out)
    errors = [e for e in gather_objects(error) if e]
    if errors:
        raise ConfigError(errors[0])
    barrier()
    if not (out / "COMPLETE").is_file():
        raise ConfigError(f"'{out}' is missing on this node: resuming on another world size needs it on every node")
    return out
