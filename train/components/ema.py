"""Weight EMA: an exponential moving average of the trainable weights (timm's ModelEmaV3, open_clip's --model-ema),
kept beside the DeepSpeed engine in fp32.

Only trainable parameters are averaged (an adapter run keeps the average of its adapter alone; buffers and frozen
weights are taken as they are). ZeRO 0-2 keep the whole average on every rank; ZeRO-3 keeps each rank's partition
of it, shaped as DeepSpeed's `ds_tensor` (rank r of the parameter's group holds flat elements [r*n, (r+1)*n) of the
flattened parameter, padded at its end, n = ds_tensor.numel()), so the average costs a rank what its share of the
fp32 weights does. On disk (`ema.safetensors` in a checkpoint) it is whole tensors by parameter name, whatever the
stage and world size, so a run resumes it on any layout.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from tessera.config import ConfigError
from tessera.durable import fsync_path

from ..distributed.deepspeed_setup import deepspeed
from ..recipes.config import EMAConfig

log = logging.getLogger(__name__)
EMA_FILE = "ema.safetensors"  # in a checkpoint's tag directory


class WeightEMA:
    """The moving average of `engine`'s trainable parameters, from their values now. `shadow_module` (ZeRO 0-2): a
    frozen copy of the model whose same-named parameters hold the average, so that it can run forward with it (e.g.
    as a teacher); it is moved to the engine's device in fp32."""

    def __init__(self, engine, cfg: EMAConfig, shadow_module: nn.Module | None = None):
        self.cfg = cfg
        self.decay = cfg.decay**cfg.every  # per update: the span in optimizer steps does not depend on `every`
        self.optimizer = engine.optimizer
        self.zero3 = engine.zero_optimization_stage() == 3
        named = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        if self.zero3:
            if shadow_module is not None:
                raise ConfigError(
                    "a shadow module for the weight EMA needs ZeRO stage 0-2: under ZeRO-3 each rank holds only its "
                    "partition of the average"
                )
            # the partitions themselves: DeepSpeed reassigns their storage (`.data`), never the tensors
            self.live = [p.ds_tensor for _, p in named]
            self.shapes = [p.ds_shape for _, p in named]
            self.groups = [p.ds_process_group for _, p in named]
        else:
            self.live = [p for _, p in named]
            self.shapes = [p.shape for _, p in named]
        with torch.no_grad():
            if shadow_module is None:
                self.shadow = [t.detach().float().clone() for t in self.live]
            else:
                self.shadow = _module_storage(shadow_module, named)
                torch._foreach_copy_(self.shadow, self.live)
        # half parameters (DeepSpeed's own fp16/bf16 modes, set through deepspeed.config) cannot be a foreach
        # lerp's end point; multiply-add accepts them
        self.mixed = any(t.dtype != torch.float32 for t in self.live)

    @property
    def nbytes(self) -> int:
        """What the average takes on this rank."""
        return sum(s.numel() * s.element_size() for s in self.shadow)

    def describe(self) -> dict[str, float | int]:
        return {"decay": self.cfg.decay, "every": self.cfg.every, "start_step": self.cfg.start_step}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based): every train.ema.every steps, copy the weights (up to
        train.ema.start_step) or move the average towards them: one foreach lerp over every tensor (a multiply and an
        add for fp16 parameters), no host sync. A step the guard skipped left the weights as they were; the average
        moves towards them all the same (the host learns of the skip only later)."""
        if step % self.cfg.every:
            return
        if step <= self.cfg.start_step:
            torch._foreach_copy_(self.shadow, self.live)
        elif self.mixed:
            torch._foreach_mul_(self.shadow, self.decay)
            torch._foreach_add_(self.shadow, self.live, alpha=1.0 - self.decay)
        else:
            torch._foreach_lerp_(self.shadow, self.live, 1.0 - self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the weights as they are now."""
        torch._foreach_copy_(self.shadow, self.live)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The average in the live model for the block (evaluation), the trained weights back, bit for bit, after
        it. Under ZeRO-3 a collective (DeepSpeed's persistent parameters are gathered again): every rank enters."""
        with torch.no_grad():
            raw = [t.detach().clone() for t in self.live]
            self._put(self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                self._put(raw)

    def _put(self, values: list[torch.Tensor]) -> None:
        if not self.zero3:
            torch._foreach_copy_(self.live, values)
            return
        # as DeepSpeed's checkpoint load does: release every gathered parameter, write the partitions, then gather
        # the persistent parameters (kept whole between steps) from them again
        self.optimizer.checkpoint_event_prologue()
        torch._foreach_copy_(self.live, values)
        self.optimizer.checkpoint_event_epilogue()

    def state_dict(self, keep: bool = True) -> dict[str, torch.Tensor] | None:
        """The average as whole fp32 tensors on the CPU, by parameter name. Under ZeRO-3 a collective (one
        parameter's partitions gathered at a time): every rank calls it, and only those with `keep` get the result."""
        out: dict[str, torch.Tensor] | None = {} if keep else None
        for i, name in enumerate(self.names):
            full = self._gathered(i) if self.zero3 else self.shadow[i]
            if out is not None:
                out[name] = full.detach().to("cpu", torch.float32, copy=True)
        return out

    def _gathered(self, i: int) -> torch.Tensor:
        group, part = self.groups[i], self.shadow[i]
        device = torch.device(deepspeed.accelerator.get_accelerator().current_device_name())  # NCCL needs the GPU
        flat = torch.empty(part.numel() * dist.get_world_size(group), dtype=part.dtype, device=device)
        dist.all_gather_into_tensor(flat, part.to(device), group=group)
        return flat[: self.shapes[i].numel()].view(self.shapes[i])

    @torch.no_grad()
    def load_state_dict(self, tensors: Any, where: str) -> None:
        """Take the average from whole tensors by parameter name (`tensors`: a dict, or a safetensors file's reader);
        under ZeRO-3 each rank takes its partition. A parameter missing, extra or of another shape is an error
        naming it."""
        names = set(tensors.keys())
        missing = [n for n in self.names if n not in names]
        extra = sorted(names - set(self.names))
        if missing or extra:
            raise ConfigError(
                f"{where}: the weight EMA saved there does not match the model's trainable parameters"
                + (f"; missing: {', '.join(missing[:5])}" if missing else "")
                + (f"; not trainable here: {', '.join(extra[:5])}" if extra else "")
                + " (was the run started with other train.lock, adapter or model settings?)"
            )
        for i, name in enumerate(self.names):
            value = tensors.get_tensor(name) if hasattr(tensors, "get_tensor") else tensors[name]
            if value.shape != self.shapes[i]:
                raise ConfigError(
                    f"{where}: the weight EMA of '{name}' has shape {list(value.shape)}, the model's parameter "
                    f"{list(self.shapes[i])}"
                )
            if self.zero3:
                n = self.shadow[i].numel()
                start = dist.get_rank(self.groups[i]) * n
                value = value.reshape(-1)[start : start + n]  # the last ranks' partitions end in padding
                self.shadow[i][: value.numel()].copy_(value)
            else:
                self.shadow[i].copy_(value)

    def save(self, path: Path, write: bool) -> None:
        """Write the average to `path` (safetensors) atomically and fsynced where `write`. Under ZeRO-3 a collective:
        every rank calls it, and every parameter is gathered before anything is written."""
        state = self.state_dict(keep=write)
        if not write:
            return
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            safetensors.torch.save_file(state, str(tmp), metadata={k: str(v) for k, v in self.describe().items()})
        except safetensors.SafetensorError as exc:  # a full disk, as an OSError: what a failed save reports
            tmp.unlink(missing_ok=True)
            raise OSError(f"cannot write '{path}': {exc}") from exc
        fsync_path(tmp)
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        """Read the average `save` wrote, one tensor at a time."""
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as reader:
            self.load_state_dict(reader, str(path))


def build_ema(engine, cfg: EMAConfig | None, shadow_module: nn.Module | None = None) -> WeightEMA | None:
    """The run's weight EMA (None without train.ema), said in the log."""
    if cfg is None:
        return None
    ema = WeightEMA(engine, cfg, shadow_module)
    log.info(
        "weight EMA on: decay %g per step (an average over about %d steps), updated every %d step(s), averaging "
        "after step %d; %s trainable tensors, %.1f MiB fp32 on this rank%s",
        cfg.decay,
        round(1 / (1 - cfg.decay)),
        cfg.every,
        cfg.start_step,
        f"{len(ema.names):,}",
        ema.nbytes / 2**20,
        " (its ZeRO-3 partition)" if ema.zero3 else "",
    )
    return ema


def _module_storage(module: nn.Module, named: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
    """The parameters of `module` (made frozen fp32, on the trained parameters' device) named as `named`'s: the
    storage of the average."""
    device = named[0][1].device if named else torch.device("cpu")
    module.requires_grad_(False).to(device=device, dtype=torch.float32)
    own = dict(module.named_parameters())
    out = []
    for name, p in named:
        if name not in own:
            raise ConfigError(f"the EMA's shadow module has no parameter '{name}', which trains")
        if own[name].shape != p.shape:
            raise ConfigError(
                f"the EMA's shadow module's '{name}' has shape {list(own[name].shape)}, the trained one {list(p.shape)}"
            )
        out.append(own[name].data)
    return out
