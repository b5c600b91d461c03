"""Few-shot classification fine-tuning: k labelled samples per class, a classifier made of the text tower's
class-prompt embeddings, cross-entropy through whatever trains (LoRA on either tower, prompts, or every weight).
With learned text context (CoOp) the class prompts are that context followed by the class name; otherwise they are
classes.json's templates.

The k shots per class are chosen deterministically (by `fewshot.seed`) from the `cls`-labelled training shards
and copied into one shard under OUTPUT_DIR/fewshot, which the ordinary loader then reads; the choice reads only
the `cls` members, so nothing else is decoded twice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tessera.data import SampleStats, expand_shards
from tessera.data.make_shards import write_shards
from tessera.data.pipeline import seeded_rng
from tessera.data.shards import iter_raw_samples
from tessera.models import pair_key
from tessera.config import ConfigError

log = logging.getLogger(__name__)
SHOTS_PREFIX = "shots"


def select_shots(shard_specs: list[str | list[str]], k: int, num_classes: int, seed: int, out_dir: Path) -> str:
    """Copy k samples of every class (fewer where a class has fewer) into `out_dir`; return their shard spec."""
    urls = [u for spec in shard_specs for u in expand_shards(spec)]
    by_class: dict[int, list[str]] = {}
    for sample in iter_raw_samples(urls, SampleStats()):
        raw = sample.get("cls")
        try:
            label = int(raw.decode().strip()) if raw is not None else None
        except (UnicodeDecodeError, ValueError):
            label = None
        if label is not None and 0 <= label < num_classes:
            by_class.setdefault(label, []).append(sample["__key__"])
    if not by_class:
        raise ConfigError(f"fewshot: no sample in {shard_specs} has a `cls` label in [0, {num_classes})")
    rng = seeded_rng(seed, "shots")
    chosen = {key for label in sorted(by_class) for key in rng.sample(sorted(by_class[label]),
                                                                      min(k, len(by_class[label])))}
    short = {c: len(by_class.get(c, [])) for c in range(num_classes) if len(by_class.get(c, [])) < k}
    if short:
        log.warning("fewshot: fewer than %d shots for classes %s (samples available: %s)", k, sorted(short), short)
    samples = ((s["__key__"], {m: v for m, v in s.items() if not m.startswith("__")})
               for s in iter_raw_samples(urls, SampleStats()) if s["__key__"] in chosen)
    write_shards(samples, out_dir, SHOTS_PREFIX, samples_per_shard=max(1, len(chosen)))
    return str(out_dir / f"{SHOTS_PREFIX}-000000.tar")


class FewShotTask:
    """Cross-entropy of `modality` features against the class-prompt embeddings (the zero-shot classifier,
    recomputed each step so that an adapted text tower trains too), scaled by the pair's temperature."""

    def __init__(self, model, modality: str, classnames: list[str], templates: list[str]):
        if "text" not in model.modalities or modality not in model.modalities:
            raise ConfigError(f"fewshot classifies '{modality}' by text prompts: the model has {model.modalities}")
        pair = next((p for p in model.pairs if set(p) == {modality, "text"}), None)
        if pair is None:
            raise ConfigError(f"fewshot: the model has no learned temperature for {modality}-text")
        self.modality, self.scale_key = modality, pair_key(*pair)
        tokenize, collate = model.transforms(False)["text"], model.collators()["text"]
        self.prompts = collate([tokenize(t.format(c)) for c in classnames for t in templates])
        self.shape = (len(classnames), len(templates))
        learner = getattr(model, "prompt_learner", None)
        self.learned_context = learner is not None and learner.has_text_context   # CoOp: prompts are context + name
        self.classnames = classnames

    def __call__(self, model, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        device = batch["label"].device
        if self.learned_context:
            out = model({self.modality: batch[self.modality]})
            module = getattr(model, "module", model)   # the DeepSpeed engine's model
            classes_CD = module.prompt_learner.class_features(module, self.classnames).float()
        else:
            prompts = self.prompts.to(device) if isinstance(self.prompts, torch.Tensor) else {
                k: v.to(device) for k, v in self.prompts.items()}
            out = model({self.modality: batch[self.modality], "text": prompts})
            text_CTD = out["features"]["text"].float().view(*self.shape, -1)
            classes_CD = F.normalize(text_CTD.mean(1), dim=-1)
        scale = out["logit_scale"][self.scale_key].float()
        logits_BC = scale * out["features"][self.modality].float() @ classes_CD.T
        loss = F.cross_entropy(logits_BC, batch["label"])
        accuracy = (logits_BC.argmax(1) == batch["label"]).float().mean()
        return {"loss": loss}, {"train_acc1": accuracy.detach(), f"temperature/{self.modality}-text": 1.0 / scale.detach()}
