"""What every optimizer step checks at its boundary, on the device and agreed by all ranks: numbers that are not
finite; and, on the host, a request to stop (SIGTERM, SIGINT).

Non-finite numbers. Each rank adds up, on its device, every loss it backpropagates; at the optimizer step the
optimizer (`SkippableAdamW`) takes one fused norm over the gradients it is about to apply (the reduced ones: under
ZeRO, the rank's partition) and the ranks take the maximum of both flags in one device all-reduce. A step with any
of them not finite (or too large to mean anything) is withheld on the device, by the fused AdamW's `found_inf`: no
weight, moment or step count changes, on any rank, and no host waits for the GPU to find out. Under fp16 the
step's flags also update the loss scale (`tessera.train.components.precision.LossScale`): a step whose gradients
overflowed at a scale above 1 is the scale's business (it halves), counted apart and not toward the limit below.

The host reads the flags later, at the loop's next log step, evaluation or checkpoint (`settle`): each skipped
step is then logged with what was not finite, counted, and `train.max_nonfinite_steps` of them in a row stop the
run. Between those points a step costs no host sync.

Stop requests. The first SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) sets a flag; the ranks agree on it
at every boundary through a CPU (gloo) all-reduce, which does not wait for the GPU, so every rank finishes the same
step, checkpoints it and exits 0. A second signal of the same kind acts as it would without Tessera.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tessera.config import UserError
from tessera.losses.ring import host_group_of

from ..distributed.groups import gather_objects
from .precision import LossScale

log = logging.getLogger(__name__)


class NonFiniteError(UserError, RuntimeError):
    """Training stopped: too many optimizer steps in a row had a non-finite loss or gradient."""

    exit_code = 1  # the run, not its input, went wrong


class SkippableAdamW(torch.optim.AdamW):
    """The fused AdamW, whose step is withheld on the device where `flags` (set by `StepGuard`) says so: `check()`
    adds the gradients' finiteness to the flags and agrees them across ranks; `step()` then passes their maximum
    as the fused kernel's `found_inf`, which leaves weights, moments and step counts as they were."""

    guard: StepGuard | None = None

    def step(self, closure=None):
        if self.guard is not None:
            self.found_inf = self.guard.check([p.grad for g in self.param_groups for p in g["params"]])
        try:
            return super().step(closure)
        finally:
            self.found_inf = None


class StopSignals:
    """A context in which the first SIGTERM or SIGINT sets `requested` (the signal's name) instead of ending the
    process; the handlers before it are put back on exit. A signal that comes more than REPEAT_S after the first stops
    at once (the handler before it runs); one within REPEAT_S is the same request arriving twice, as a signal to the
    whole process group does under torchrun: directly, and forwarded by torchrun's agent."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT_S = 2.0

    def __init__(self):
        self.requested: str | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers there only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested, self._at = name, time.monotonic()
            log.warning("%s: stopping after this step, with a checkpoint (send it again to stop at once)", name)
            return
        if time.monotonic() - self._at <= self.REPEAT_S:
            return
        self.__exit__()  # the handlers from before: the signal now does what it did before the run began
        signal.raise_signal(signum)

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class StepGuard:
    """Watches an engine's backward passes and steps (see the module docstring). `stop` says, after each optimizer
    step, whether every rank is to stop after it; `settle()` reads the steps' flags since it was last called."""

    def __init__(
        self,
        engine,
        model: nn.Module,
        signals: StopSignals | None = None,
        loss_scale: LossScale | None = None,
    ):
        """`engine`: a DeepSpeed engine built on a `SkippableAdamW`; `model` its module; `signals`: where a stop
        request is read; `loss_scale`: the loss scale the steps backpropagate with (fp16), updated after each step."""
        self.engine, self.optimizer = engine, engine.basic_optimizer
        if not isinstance(self.optimizer, SkippableAdamW):
            raise TypeError(f"the engine's optimizer is {type(self.optimizer).__name__}, not a SkippableAdamW")
        self.device = engine.device
        self.loss_scale = loss_scale
        self.loss_sum = torch.zeros((), device=self.device)
        self.flags: torch.Tensor | None = None  # the last step's (loss, gradient), 1 where not finite
        self.good = torch.ones((), device=self.device)  # 1.0 where the last step was applied, else 0.0
        # each step's flags since the last settle() with the loss scale it ran at (1 without one), and whether
        # DeepSpeed advanced its schedule after it
        self.pending: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        self._one = torch.ones((), device=self.device)
        self.stop = False
        self.signals = signals
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.optimizer.guard = self
        backward, step = engine.backward, engine.step

        def guarded_backward(loss, *args, **kwargs):
            self.loss_sum.add_(loss.detach().float().sum())
            return backward(loss, *args, **kwargs)

        def guarded_step(*args, **kwargs):
            if not engine.is_gradient_accumulation_boundary():
                return step(*args, **kwargs)
            self.checked = False
            try:
                return step(*args, **kwargs)  # the optimizer calls check()
            finally:
                # DeepSpeed advances its learning-rate schedule after an optimizer step it ran (ours, even where the
                # fused kernel withheld the update), not after one it withheld itself
                advanced = self.checked
                if not self.checked:
                    # DeepSpeed withheld the step itself, having found the gradients' norm not finite (ZeRO 1-2, its
                    # own host check)
                    self.check([], withheld=True)
                self._agree_stop()
                self.good = (self.flags.amax() == 0).float()
                scale = self._one
                if self.loss_scale is not None:
                    scale = self.loss_scale.scale.clone()
                    self.loss_scale.update(self.flags.amax())
                self.pending.append((self.flags, scale, advanced))
                self.loss_sum.zero_()

        engine.backward, engine.step = guarded_backward, guarded_step

    def check(self, grads: list[torch.Tensor | None], withheld: bool = False) -> torch.Tensor:
        """At the optimizer step: the step's flags (the losses', and the gradients' finiteness, or `withheld`:
        known bad), agreed across ranks in one device all-reduce; returns the fused AdamW's found_inf."""
        self.checked = True
        loss_bad = ~torch.isfinite(self.loss_sum)
        grads = [g for g in grads if g is not None]
        if withheld:
            grad_bad = loss_bad.new_ones(())
        elif grads:
            grad_bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).float().sum())  # iff one is not
        else:
            grad_bad = loss_bad.new_zeros(())
        self.flags = torch.stack([loss_bad, grad_bad]).to(torch.int32)
        if self.distributed:
            dist.all_reduce(self.flags, op=dist.ReduceOp.MAX)
        return self.flags.amax().float()

    def _agree_stop(self) -> None:
        requested = self.signals is not None and self.signals.requested is not None
        if self.distributed:  # on the CPU: no wait for the GPU
            flag = torch.tensor([int(requested)], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=host_group_of(None))
            requested = bool(flag[0])
        self.stop = requested

    def settle(self) -> list[tuple[dict[str, Any] | None, bool]]:
        """For each step since the last call, what made it skipped ({"loss": ..., "gradient": ..., "overflow": ...,
        "scale": the loss scale it ran at}; None for an applied step), and whether DeepSpeed advanced its
        learning-rate schedule after it: one host sync for all. An overflow is a step whose gradients alone were not
        finite at a loss scale above 1 (fp16)."""
        if not self.pending:
            return []
        rows = torch.stack([torch.cat([f.float(), s.float().reshape(1)]) for f, s, _ in self.pending]).tolist()
        advanced = [a for _, _, a in self.pending]
        self.pending = []
        settled = []
        for (lo, gr, scale), a in zip(rows, advanced):
            bad = None
            if lo or gr:
                overflow = self.loss_scale is not None and not lo and scale > 1
                bad = {"loss": bool(lo), "gradient": bool(gr), "overflow": overflow, "scale": scale}
            settled.append((bad, a))
        return settled

    def close(self) -> None:
        """The run's steps are over: the optimizer and the parameters' gradients go back to what they were."""
        self.optimizer.guard = None
        if self.loss_scale is not None:
            self.loss_scale.close()


class Skipped:
    """The loop's tally of skipped steps: each is logged with what was not finite, and the `limit`-th in a row
    stops the run. `count` is a collective (every rank skips the same steps). fp16 overflows are tallied apart
    (`overflows`), logged at info, and neither count toward the limit nor break a row."""

    def __init__(self, limit: int):
        self.limit, self.total, self.in_a_row, self.overflows = limit, 0, 0, 0

    def reset(self) -> None:
        self.in_a_row = 0

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row, "overflows": self.overflows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.in_a_row, self.overflows = state["total"], state["in_a_row"], state["overflows"]

    def count(self, step: int, bad: dict[str, Any], values: list[dict[str, Any]]) -> None:
        if bad.get("overflow"):
            self.overflows += 1
            log.info(
                "step %d skipped: fp16 gradients overflowed at loss scale %g, which halves (%d overflow(s) in all)",
                step,
                bad["scale"],
                self.overflows,
            )
            return
        self.total += 1
        self.in_a_row += 1
        losses = [(k.split("/", 1)[1], v) for micro in values for k, v in micro.items() if k.startswith("loss/")]
        if bad["loss"]:  # agreed by every rank, so every rank joins the gather of which pairs it was
            local = sorted({pair for pair, v in losses if not torch.isfinite(v).all()})  # a host sync, on bad steps
            failing = sorted({pair for rank_pairs in gather_objects(local) for pair in rank_pairs})
            what = f"the loss of {', '.join(failing) or 'the step'} is not finite"
        else:
            pairs = sorted({pair for pair, _ in losses})
            what = f"a gradient is not finite (the loss of {', '.join(pairs) or 'the step'} is)"
        log.warning(
            "step %d skipped: %s (%d in a row, %d in all; %d in a row stop the run)",
            step,
            what,
            self.in_a_row,
            self.total,
            self.limit,
        )
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"step {step}: {what}, {self.in_a_row} step(s) in a row (train.max_nonfinite_steps="
                f"{self.limit}); no weight was updated by them. Training stopped: try a lower train.lr or a longer "
                "train.warmup_steps, or look for extreme values in the data of those steps"
            )


def check_weights(model: nn.Module, step: int) -> None:
    """Raise NonFiniteError on every rank if any rank holds a non-finite parameter (its ZeRO-3 partition where
    partitioned): no checkpoint of such weights is written. A collective; one host sync."""
    named = [(name, getattr(p, "ds_tensor", p)) for name, p in model.named_parameters()]
    named = [(name, t) for name, t in named if t.numel()]
    local = []
    if named:
        finite = torch.isfinite(torch.stack([t.detach().float().sum() for _, t in named])).tolist()
        local = [name for (name, _), ok in zip(named, finite) if not ok]
    bad = sorted({name for names in gather_objects(local) for name in names})
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(
            f"step {step}: parameters {', '.join(bad[:5])}{more} are not finite; no checkpoint was written"
        )
