"""What every optimizer step checks at its boundary, agreed by all ranks in one collective: numbers that are not
finite, and a request to stop (SIGTERM, SIGINT).

Non-finite numbers. Each rank accumulates, on its device and without a host sync, the sum of every loss it
backpropagates and of every gradient its backward produces (a hook on each trainable parameter sees the rank's own
gradient before DeepSpeed reduces it): the sum is not finite exactly when one of them is not, or is too large to
mean anything. A bad step is withheld from the optimizer that makes the update (torch's AdamW, which DeepSpeed
calls at every ZeRO stage), so no weight, moment or step count changes on any rank; `train.max_nonfinite_steps` of
them in a row stop the run. Under fp16 the loss scaler owns gradient overflow (it skips those steps itself and
lowers the scale), so only the loss is watched.

Stop requests. The first SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C) sets a flag; the ranks agree on it
at the next boundary, so every rank finishes the same step, checkpoints it and exits 0. A second signal of the same
kind acts as it would without Tessera.

The ranks OR their flags together just before DeepSpeed's step: one small all-reduce and one host sync per
optimizer step.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tessera.config import UserError

from ..distributed.groups import gather_objects

log = logging.getLogger(__name__)


class NonFiniteError(UserError, RuntimeError):
    """Training stopped: too many optimizer steps in a row had a non-finite loss or gradient."""

    exit_code = 1  # the run, not its input, went wrong


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose step can be withheld: while `skip` is set, `step()` changes nothing."""

    skip = False

    def step(self, closure=None):
        if self.skip:
            return None
        return super().step(closure)


class StopSignals:
    """A context in which the first SIGTERM or SIGINT sets `requested` (the signal's name) instead of ending the
    process; the handlers before it are put back on exit, and at once for a signal already received."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers there only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            log.warning("%s: stopping after this step, with a checkpoint (send it again to stop at once)", name)
        signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class StepGuard:
    """Watches an engine's backward passes and steps (see the module docstring). After each optimizer step, `bad`
    says whether it was skipped and what was not finite, and `stop` whether every rank is to stop after it."""

    def __init__(self, engine, model: nn.Module, gradients: bool = True, signals: StopSignals | None = None):
        """`engine`: a DeepSpeed engine built on a `SkippableAdamW`; `model` its module; `gradients`: watch the
        gradients too, not only the losses; `signals`: where a stop request is read."""
        self.engine, self.optimizer = engine, engine.basic_optimizer
        if not isinstance(self.optimizer, SkippableAdamW):
            raise TypeError(f"the engine's optimizer is {type(self.optimizer).__name__}, not a SkippableAdamW")
        self.device = engine.device
        self.loss_sum = torch.zeros((), device=self.device)
        self.grad_sum = torch.zeros((), device=self.device)
        self.bad: dict[str, bool] | None = None
        self.stop = False
        self.signals = signals
        self._hooks = []
        if gradients:
            for p in model.parameters():
                if p.requires_grad:
                    self._hooks.append(p.register_hook(self._watch_gradient))
        backward, step = engine.backward, engine.step

        def guarded_backward(loss, *args, **kwargs):
            self.loss_sum.add_(loss.detach().float().sum())
            return backward(loss, *args, **kwargs)

        def guarded_step(*args, **kwargs):
            if not engine.is_gradient_accumulation_boundary():
                return step(*args, **kwargs)
            self._decide()
            self.optimizer.skip = bool(self.bad)
            try:
                return step(*args, **kwargs)
            finally:
                self.optimizer.skip = False

        engine.backward, engine.step = guarded_backward, guarded_step

    def _watch_gradient(self, grad: torch.Tensor) -> None:
        self.grad_sum.add_(grad.detach().float().sum())

    def _decide(self) -> None:
        requested = torch.tensor(self.signals is not None and self.signals.requested is not None)
        flags = torch.stack(
            [~torch.isfinite(self.loss_sum), ~torch.isfinite(self.grad_sum), requested.to(self.device)]
        ).to(torch.int32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_bad, grad_bad, stop = (bool(f) for f in flags.tolist())  # the guard's one host sync per step
        self.bad = {"loss": loss_bad, "gradient": grad_bad} if loss_bad or grad_bad else None
        self.stop = stop
        self.loss_sum.zero_()
        self.grad_sum.zero_()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class Skipped:
    """The loop's tally of skipped steps: each is logged with what was not finite, and the `limit`-th in a row
    stops the run. `count` is a collective (every rank skips the same steps)."""

    def __init__(self, limit: int):
        self.limit, self.total, self.in_a_row = limit, 0, 0

    def reset(self) -> None:
        self.in_a_row = 0

    def count(self, step: int, bad: dict[str, bool], values: list[dict[str, Any]]) -> None:
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
