"""`train.compile`: each tower through `torch.compile` (TorchInductor), with its recompiles bounded and logged.

A tower compiles at its first call, so the first step of a run carries the compile time (the loop logs it apart as
`first_step_s`). Its graph is specialised to the shapes it saw; a new shape (the other source's batch, the last
partial batch of an evaluation, eval mode) compiles again, marking the changing sizes dynamic after the first
change, so a few compiles cover a run. `recompiles` caps them per tower: past it, that tower runs eagerly for the
new shapes, with torch's warning. Every recompile is logged with the guard that failed.

Module-level compilation (`nn.Module.compile`) keeps parameter names as they are, so checkpoints, exports, LoRA
and DeepSpeed see the same module tree as an eager run. On a CPU, Inductor writes C++ and needs a compiler: only a
run that asks for `train.compile` needs one.
"""

from __future__ import annotations

import importlib
import logging

import torch
from torch import nn

from tessera.config import ConfigError

log = logging.getLogger(__name__)


def compile_towers(model: nn.Module, recompiles: int, replayed: bool = False) -> None:
    """Compile every tower of `model` in place (its forward; heads and loss stay eager). Sets process-wide torch
    settings: dynamo's recompile limit (`recompiles`) and its recompile log; with `replayed` (the two-pass step,
    which runs each chunk twice and replays its random numbers), Inductor's random ops fall back to eager's, so that
    the first pass's graph (without autograd) and the second's (with it) draw dropout masks alike from the same
    state."""
    if not torch.cuda.is_available():
        try:  # the compiler Inductor would use ($CXX, else g++), found as Inductor finds it
            importlib.import_module("torch._inductor.cpp_builder").get_cpp_compiler()
        except RuntimeError as exc:
            raise ConfigError(f"train.compile on a CPU needs a C++ compiler ({exc}); set it false") from None
    torch._dynamo.config.recompile_limit = recompiles
    if replayed:
        importlib.import_module("torch._inductor.config").fallback_random = True
    torch._logging.set_logs(recompiles=True)
    for tower in model.towers.values():
        tower.compile()
    towers = list(model.towers)
    log.info("train.compile: towers %s compile at their first call (up to %d recompiles each)", towers, recompiles)
