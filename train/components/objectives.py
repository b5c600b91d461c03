"""What a training step optimises: one forward of a batch through the engine, returning a dict of losses (`loss` is
the one to backpropagate) and a report of detached tensors, which the loop turns into numbers only at log steps
(`.item()` would synchronise a GPU every step)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tessera import modalities
from tessera.config import ConfigError
from tessera.data import LABEL
from tessera.losses import contrastive_loss, gram_loss, matryoshka_losses, symile_loss
from tessera.losses.options import fused_kernel
from tessera.models import REVERSED, pair_key

from ..recipes.config import LossConfig

Losses = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
NOT_FUSED = "the fused kernel covers InfoNCE and SigLIP"


class ContrastiveObjective:
    """Sum of the contrastive losses of every configured pair present in the batch."""

    def __init__(
        self,
        pairs: list[tuple[str, str]],
        loss_cfg: LossConfig,
        process_group=None,
        tuples: list[list[str]] = (),
        uniform_batches: bool = False,
        time_axes: dict[str, int] | None = None,
    ):
        """`uniform_batches`: every rank's batches hold the same number of samples (the training loader's), so the
        losses skip their exchange of sizes. `time_axes`: the time axis of each modality whose batches have one
        (`Encoder.time_axis`), which loss.reversal_negatives flips."""
        self.pairs = pairs
        self.tuples = [list(t) for t in tuples]
        self.loss_cfg = loss_cfg
        self.group = process_group
        self.uniform_batches = uniform_batches
        self.gather_budget = int(loss_cfg.gather_budget * 2**30) or None  # 0: always the ring
        self._weights: dict = {}  # the Matryoshka weights, made once per device
        self.time_axes = dict(time_axes or {}) if loss_cfg.reversal_negatives else {}
        self.language = modalities.language([m for pair in pairs for m in pair])

    def __call__(self, engine, batch: dict[str, Any]) -> Losses:
        return self.loss(engine(self.with_reversals(batch)), batch)

    def with_reversals(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` and, with loss.reversal_negatives, its timed modalities played backwards (under REVERSED)."""
        timed = {m: batch[m].flip(axis) for m, axis in self.time_axes.items() if m in batch and self.language in batch}
        return {**batch, REVERSED: timed} if timed else batch

    def reversal_term(self, out: dict[str, Any], a: str, b: str, scale: torch.Tensor) -> torch.Tensor | None:
        """The arrow-of-time loss of the pair a-b, where one side was also encoded played backwards: each caption's
        cross-entropy over its own clip and that clip reversed (log(1 + e^(s (t.r - t.v)))), the mean over this
        rank's samples. None where the batch has no reversed side for the pair."""
        reversed_ = out.get("reversed", {})
        timed = next((m for m in (a, b) if m in reversed_), None)
        if timed is None or self.language not in (a, b) or timed == self.language:
            return None
        text = out["features"][self.language].float()
        clip, back = out["features"][timed].float(), reversed_[timed].float()
        return F.softplus(scale.float() * ((back - clip) * text).sum(-1)).mean()

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        """A tower's features as the loss takes them (loss.precision): as they come on a GPU, whose GEMMs take
        bf16/fp16 and accumulate and write fp32; fp32 on CPU, where a bf16 GEMM would round its logits (of up to
        100) to 1 part in 256, and wherever loss.precision is fp32."""
        if self.loss_cfg.precision == "fp32" or x.device.type == "cpu":
            return x.float()
        return x

    def pair_scale(self, out: dict[str, Any], a: str, b: str) -> torch.Tensor:
        """The logit scale of the pair a-b in a model output, within loss.temperature_range where it sets one."""
        scale = out["logit_scale"][pair_key(a, b)]
        bounds = self.loss_cfg.per_pair("temperature_range", a, b)
        if bounds is not None:  # as the model's own max_logit_scale: a clamp in the forward pass
            scale = scale.clamp(1.0 / bounds[1], 1.0 / bounds[0])
        return scale

    def loss(self, out: dict[str, Any], batch: dict[str, Any]) -> Losses:
        """The losses of a model output (features, logit scales and biases) over `batch` (its labels)."""
        features = out["features"]
        labels = None
        if self.loss_cfg.positives == "label":
            if LABEL not in batch:
                raise ValueError("loss.positives=label, but this batch has no `cls` labels")
            labels = batch[LABEL]
        losses: dict[str, torch.Tensor] = {}
        report: dict[str, torch.Tensor] = {}
        cfg = self.loss_cfg
        present = []
        for a, b in self.pairs:
            if a not in features or b not in features:
                continue
            present.append((a, b))
            key = pair_key(a, b)
            scale = self.pair_scale(out, a, b)
            bias = out.get("logit_bias", {}).get(key)
            args = (self.operand(features[a]), self.operand(features[b]))
            args += (scale.float(), None if bias is None else bias.float())
            kw = dict(
                kind=cfg.kind,
                tile_size=cfg.tile_size,
                process_group=self.group,
                labels=labels,
                dcl=cfg.dcl,
                label_smoothing=cfg.label_smoothing,
                impl=cfg.impl,
                uniform_batches=self.uniform_batches,
                gather_budget=self.gather_budget,
            )
            if cfg.matryoshka:
                fused_kernel(cfg.kernel, args[0], "the matryoshka loss", NOT_FUSED)
                width = args[0].shape[1]
                widths, weights = cfg.nested_widths(width), cfg.nested_weights(width)
                nested = matryoshka_losses(*args, dims=widths, **kw)
                key = (nested.device, tuple(weights))
                if key not in self._weights:  # a host-to-device copy: once, not every step
                    self._weights[key] = nested.new_tensor(weights)
                losses[f"loss/{a}-{b}"] = nested @ self._weights[key]
                report.update({f"loss/{a}-{b}@{w}": x for w, x in zip(widths, nested.detach())})
            else:
                losses[f"loss/{a}-{b}"] = contrastive_loss(*args, kernel=cfg.kernel, **kw)
            reversal = self.reversal_term(out, a, b, scale) if self.time_axes else None
            if reversal is not None:
                losses[f"loss/reversal/{a}-{b}"] = reversal
            report[f"temperature/{a}-{b}"] = 1.0 / scale.detach()
            if bias is not None:
                report[f"logit_bias/{a}-{b}"] = bias.detach()
        if not losses:
            raise ValueError(f"batch with {sorted(features)} covers none of the pairs {self.pairs}")
        terms = [cfg.per_pair("weights", *pair, 1.0) * losses[f"loss/{pair[0]}-{pair[1]}"] for pair in present]
        terms += [cfg.reversal_negatives * v for k, v in losses.items() if k.startswith("loss/reversal/")]
        for group in self.tuples:  # a higher-order loss where the batch carries the whole tuple
            if all(m in features for m in group):
                scale = out["logit_scale"][pair_key(*group)]
                name = "-".join(group)
                higher_order = symile_loss if cfg.higher_order == "symile" else gram_loss
                tuple_features = [self.operand(features[m]) for m in group]
                fused_kernel(cfg.kernel, tuple_features[0], f"the {cfg.higher_order} loss", NOT_FUSED)
                losses[f"loss/{name}"] = higher_order(
                    tuple_features, scale.float(), cfg.tile_size, self.group, gather_budget=self.gather_budget
                )
                report[f"temperature/{name}"] = 1.0 / scale.detach()
                terms.append(cfg.higher_order_weight * losses[f"loss/{name}"])
        losses["loss"] = torch.stack(terms).sum()
        return losses, report


class ClassificationObjective:
    """Cross-entropy of `modality` features against the class-prompt embeddings (the zero-shot classifier,
    recomputed each step so that an adapted prompt tower trains too), scaled by the pair's temperature. With learned
    context (CoOp) the class prompts are that context followed by the class name; otherwise they are `templates`.

    `model` is the module the engine wraps: learned context enters the prompts through it, with hooks that the
    engine's forward would not place."""

    def __init__(self, model, modality: str, classnames: list[str], templates: list[str]):
        language = modalities.language(model.modalities)
        if language is None or modality not in model.modalities:
            raise ConfigError(f"fewshot classifies '{modality}' by text prompts: the model has {model.modalities}")
        pair = next((p for p in model.pairs if set(p) == {modality, language}), None)
        if pair is None:
            raise ConfigError(f"fewshot: the model has no learned temperature for {modality}-{language}")
        self.model, self.modality, self.language, self.scale_key = model, modality, language, pair_key(*pair)
        tokenize, collate = model.transforms(False)[language], model.collators()[language]
        self.prompts = collate([tokenize(t.format(c)) for c in classnames for t in templates])
        self.shape = (len(classnames), len(templates))
        learner = getattr(model, "prompt_learner", None)
        self.learned_context = learner is not None and learner.has_context
        self.classnames = classnames

    def __call__(self, engine, batch: dict[str, Any]) -> Losses:
        labels = batch[LABEL]
        if self.learned_context:
            out = engine({self.modality: batch[self.modality]})
            classes_CD = self.model.prompt_learner.class_features(self.model, self.classnames).float()
        else:
            prompts = (
                self.prompts.to(labels.device)
                if isinstance(self.prompts, torch.Tensor)
                else {k: v.to(labels.device) for k, v in self.prompts.items()}
            )
            out = engine({self.modality: batch[self.modality], self.language: prompts})
            prompts_CTD = out["features"][self.language].float().view(*self.shape, -1)
            classes_CD = F.normalize(prompts_CTD.mean(1), dim=-1)
        scale = out["logit_scale"][self.scale_key].float()
        logits_BC = scale * out["features"][self.modality].float() @ classes_CD.T
        loss = F.cross_entropy(logits_BC, labels)
        accuracy = (logits_BC.argmax(1) == labels).float().mean()
        return {"loss": loss}, {
            "train_acc1": accuracy.detach(),
            f"temperature/{self.modality}-{self.language}": 1.0 / scale.detach(),
        }
