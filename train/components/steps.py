"""How one micro-batch trains: its forward, its backward passes and the engine's step calls. The loop calls a step
per micro-batch and knows nothing of what happens inside.

`OneGraphStep` runs the towers over the whole micro-batch in one autograd graph. `TwoPassStep` (GradCache) makes
the contrastive batch independent of the towers' activation memory:
1. run the towers over the batch chunk by chunk without autograd, keeping only the features (and each chunk's
   random state);
2. compute the loss over all features at once (the tiled ring loss, so across ranks too) and its gradient with
   respect to the features, temperatures and biases;
3. run each chunk again with autograd, its random state replayed, and backpropagate its cached feature gradient
   into the weights.
The optimizer step it makes equals the one-graph step over the same chunks, for every parameter: dropout, patch
dropout and stochastic depth draw the same numbers in both passes, batch-norm statistics are updated once per
chunk (the first pass's updates are undone), and a locked tower is run only once (its output goes back into its head
when the head trains).

Shape legend: B micro-batch, C chunk, D embedding width.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import nn

from tessera.data import to_device
from tessera.data.derived import is_derived_key
from tessera.data.feed import chunks_on
from tessera.models.multitower import Encoded

from ..recipes.config import TrainConfig
from .objectives import ContrastiveObjective, Losses
from .precision import LossScale


def _scaled(loss: torch.Tensor, loss_scale: LossScale | None) -> torch.Tensor:
    return loss if loss_scale is None else loss_scale.scaled(loss)


class OneGraphStep:
    """Forward, one backward, one engine step."""

    def __init__(self, objective, loss_scale: LossScale | None = None):
        """`loss_scale`: what the loss is multiplied by to backpropagate (train.precision=fp16)."""
        self.objective, self.loss_scale = objective, loss_scale

    def backwards(self, batch_size: int) -> int:
        return 1

    def micro_batch(self, batch_size: int) -> int:
        return batch_size

    def __call__(self, engine, batch: dict[str, Any]) -> Losses:
        losses, report = self.objective(engine, batch)
        engine.backward(_scaled(losses["loss"], self.loss_scale))
        engine.step()
        return losses, report


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def _norm_statistics(modules: list[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, saved copy) of every batch-norm running statistic in `modules` that a forward in training mode
    updates."""
    return [
        (buf, buf.detach().clone())
        for module in modules
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]


class TwoPassStep:
    """The exact two-pass contrastive step (see the module docstring): `chunk_size` samples per tower forward."""

    def __init__(
        self,
        objective: ContrastiveObjective,
        model: nn.Module,
        chunk_size: int,
        grad_accum: int,
        loss_scale: LossScale | None = None,
    ):
        """`loss_scale`: what the loss is multiplied by to backpropagate (train.precision=fp16): the loss's own
        backward carries it into the cached feature gradients (fp16 features: theirs would underflow without it),
        and the second pass's backward passes it on to the weights, whose hooks take it back out."""
        self.objective, self.model, self.chunk_size, self.grad_accum = objective, model, chunk_size, grad_accum
        self.loss_scale = loss_scale

    def backwards(self, batch_size: int) -> int:
        return math.ceil(batch_size / self.chunk_size)

    def micro_batch(self, batch_size: int) -> int:
        return min(self.chunk_size, batch_size)

    def _chunks(self, batch: dict[str, Any] | list[dict[str, Any]]) -> list[tuple[int, int, dict[str, Any]]]:
        """(start, stop, chunk) over the micro-batch: the loader's `Chunks` as they are, or a collated batch split:
        towers split their own inputs, per-sample lists and tensors (labels, keys) are sliced, anything else (the
        source's name) is kept."""
        if isinstance(batch, list):
            bounds = itertools.accumulate((len(c["__key__"]) for c in batch), initial=0)
            return [(start, start + len(c["__key__"]), c) for start, c in zip(bounds, batch)]
        if "__key__" not in batch:
            raise ValueError("a two-pass step needs the batch's `__key__` list to know its size")
        towers, size = self.model.towers, len(batch["__key__"])
        chunks = []
        for start in range(0, size, self.chunk_size):
            stop = min(start + self.chunk_size, size)
            chunk = {}
            for key, value in batch.items():
                if key in towers:
                    chunk[key] = towers[key].split(value, start, stop)
                elif isinstance(value, (torch.Tensor, list)):
                    chunk[key] = value[start:stop]
                else:
                    chunk[key] = value
            chunks.append((start, stop, chunk))
        return chunks

    def _whole(self, batch: dict[str, Any] | list[dict[str, Any]], device) -> dict[str, Any]:
        """What the loss reads of the whole micro-batch besides the towers' inputs: a collated batch as it is; of
        the loader's `Chunks`, per-sample lists and tensors (keys, labels) joined, anything else (the source's name)
        from the first chunk."""
        if not isinstance(batch, list):
            return batch
        whole = {}
        for key, value in batch[0].items():
            if key in self.model.towers or is_derived_key(key):  # inputs: the loss reads the chunks' features
                continue
            if isinstance(value, torch.Tensor):
                whole[key] = torch.cat([c[key] for c in batch])
            elif isinstance(value, list):
                whole[key] = [x for c in batch for x in c[key]]
            else:
                whole[key] = value
        return to_device(whole, device)

    def _hooks(self, modalities, states: dict, replay: bool) -> list:
        """Forward pre-hooks on the head of each of `modalities` that record the random state it starts from (first
        pass) or restore it (second pass). With the chunk's starting state (restored by the caller) every module
        then draws the same numbers in both passes: a tower starts where the chunk or the head before it left the
        state, and a head where its tower did, even where the second pass skips a locked tower. The hooks sit on the
        heads, which run eagerly, never on the towers: under train.compile a tower's hooks run inside its compiled
        call, where Dynamo keeps the hooks it first traced (it does not guard them) and would replay a stale
        chunk's state."""
        hooks = []
        for m in modalities:
            head = self.model.heads[m]
            if replay:
                hooks.append(head.register_forward_pre_hook(lambda *_, key=m: _set_rng_state(states[key])))
            else:
                hooks.append(head.register_forward_pre_hook(lambda *_, key=m: states.__setitem__(key, _rng_state())))
        return hooks

    def _trained_towers(self) -> set[str]:
        """Towers the second pass must run: those with a trainable parameter, or every one when something outside
        the towers, heads and temperatures trains (prompt vectors enter the towers through hooks)."""
        model = self.model
        towers = {m for m, tower in model.towers.items() if any(p.requires_grad for p in tower.parameters())}
        owned = {id(p) for module in (model.towers, model.heads, model.logit_scales) for p in module.parameters()}
        owned |= {id(p) for p in getattr(model, "logit_biases", nn.ParameterDict()).parameters()}
        if any(p.requires_grad and id(p) not in owned for p in model.parameters()):
            return set(model.towers)
        return towers

    def __call__(self, engine, batch: dict[str, Any] | list[dict[str, Any]]) -> Losses:
        device = engine.device
        chunks = self._chunks(batch)
        towers, heads = self.model.towers, self.model.heads
        trained = self._trained_towers()
        # a locked tower (LiT) runs in the first pass only; where its head trains, the head takes its output again
        head_only = {m for m in towers if m not in trained and any(p.requires_grad for p in heads[m].parameters())}
        # pass 1: features only, and the random state each module of each chunk starts from; the batch-norm
        # statistics of what the second pass runs again are put back afterwards (a locked tower keeps its update)
        statistics = _norm_statistics([*(towers[m] for m in trained), *(heads[m] for m in trained | head_only)])
        states, outputs, encoded = [], [], []
        teach = getattr(self.objective, "teacher_features", None)  # distillation: a teacher's features, kept too
        taught = []
        with torch.no_grad():
            for chunk in chunks_on([c for _, _, c in chunks], device):
                present = [m for m in towers if m in chunk]
                states.append({})
                encoded.append({})
                hooks = self._hooks(present, states[-1], replay=False)
                hooks += [  # a locked tower's output, as its head receives it
                    heads[m].register_forward_pre_hook(
                        lambda mod, args, m=m, into=encoded[-1]: into.__setitem__(m, args[0])
                    )
                    for m in head_only
                    if m in chunk
                ]
                states[-1]["start"] = _rng_state()
                try:
                    outputs.append(engine(chunk))
                finally:
                    for hook in hooks:
                        hook.remove()
                if teach is not None:
                    taught.append(teach(chunk))
        after = _rng_state()
        with torch.no_grad():
            for buf, saved in statistics:
                buf.copy_(saved)
        # the loss over every feature, and its gradient with respect to features, temperatures and biases (the
        # features in the towers' dtype, as the one-graph step hands them to the loss; scales and biases in fp32)
        first = outputs[0]
        leaves = {
            "features": {m: torch.cat([o["features"][m] for o in outputs]).requires_grad_() for m in first["features"]},
            "logit_scale": {k: v.detach().float().requires_grad_() for k, v in first["logit_scale"].items()},
        }
        if taught:
            leaves["teacher"] = {m: torch.cat([t[m] for t in taught]) for m in taught[0]}
        if "logit_bias" in first:
            leaves["logit_bias"] = {k: v.detach().float().requires_grad_() for k, v in first["logit_bias"].items()}
        losses, report = self.objective.loss(leaves, self._whole(batch, device))
        _scaled(losses["loss"], self.loss_scale).backward()
        # pass 2: each chunk again with autograd, its random state replayed, its features' cached gradient pushed
        # into the weights; the temperatures' and biases' gradients enter once, with the first chunk. DeepSpeed
        # counts every chunk as a micro-step: its boundary (one gradient reduction, the optimizer step) comes after
        # the last chunk of the step's last micro-batch.
        second = [{k: v for k, v in chunk.items() if k not in towers or k in trained} for _, _, chunk in chunks]
        for i, ((start, stop, _), inputs) in enumerate(zip(chunks, chunks_on(second, device))):
            inputs.update({m: Encoded(f) for m, f in encoded[i].items()})
            hooks = self._hooks([m for m in towers if m in inputs], states[i], replay=True)
            _set_rng_state(states[i]["start"])
            try:
                out = engine(inputs)
            finally:
                for hook in hooks:
                    hook.remove()
            terms = [  # in fp32: under a loss scale, fp16 products could overflow (only the gradient matters)
                (f.float() * leaves["features"][m].grad[start:stop].float()).sum()
                for m, f in out["features"].items()
                if leaves["features"][m].grad is not None
            ]
            if i == 0:
                for group in ("logit_scale", "logit_bias"):
                    terms += [
                        (out[group][k] * leaf.grad).sum()
                        for k, leaf in leaves.get(group, {}).items()
                        if leaf.grad is not None
                    ]
            surrogate = torch.stack(terms).sum() if terms else None
            if surrogate is None or not surrogate.requires_grad:
                # nothing of this chunk trains (a batch of frozen towers' modalities), but the backward must still
                # run: DeepSpeed reduces gradients across ranks inside the boundary's backward
                surrogate = 0.0 * next(p for p in self.model.parameters() if p.requires_grad).sum()
            # what the engine backpropagates has the step's loss as its value (the first chunk's; 0 after it), for
            # the guard that watches losses, and the surrogate's gradient, which carries the loss scale already
            value = losses["loss"].detach() if i == 0 else torch.zeros((), device=surrogate.device)
            engine.backward(_ValueOf.apply(value, surrogate) / self.grad_accum, scale_wrt_gas=False)
            engine.step()
        _set_rng_state(after)
        return {k: v.detach() for k, v in losses.items()}, report


class _ValueOf(torch.autograd.Function):
    """`value` forward, `of`'s gradient backward: a surrogate whose value is a loss (a non-finite cached gradient
    then shows as a gradient that is not finite, an fp16 overflow, and not as a loss that is not)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
        return value.to(of.dtype).clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def make_step(objective, model: nn.Module, t: TrainConfig):
    """The two-pass step when towers run in chunks (`train.chunk_size`), else the one-graph step; under
    train.precision=fp16 with a loss scale on `model`'s trainable parameters."""
    loss_scale = LossScale(model) if t.precision == "fp16" else None
    if t.chunk_size:
        return TwoPassStep(objective, model, t.chunk_size, t.grad_accum, loss_scale)
    return OneGraphStep(objective, loss_scale)
