"""Zero-shot classification of any modality the model encodes, with class-name prompts through the tower that
encodes prompts (the language modality of `tessera.modalities`: text).

    python -m tessera.eval.zeroshot --model RUN_DIR/model --data "val-{000000..000003}.tar" --modality image \\
        --classes classes.json --out results.json

`classes.json` is `{"classnames": [...], "templates": ["a photo of a {}.", ...]}`; `"templates": "imagenet"`
uses open_clip's 80 OpenAI ImageNet templates; without templates, the classified modality's own default template
(`tessera.modalities`: "a photo of a {}." for images, "the sound of a {}." for audio, the bare name otherwise).
Labels are each sample's `cls` member: an index into classnames.
The classifier is open_clip's: per class, the mean of its L2-normalised template embeddings, renormalised
(`open_clip.zero_shot_classifier.build_zero_shot_classifier`). Metrics as CLIP_benchmark names them: `acc1`,
`acc5`, `mean_per_class_recall`; beside them their chance levels, and a confusion matrix PNG (`<out>_confusion.png`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from tessera import modalities
from tessera.config import UserError
from tessera.data import LABEL, SampleStats, SourceConfig, eval_batches, parse_sources, to_device
from tessera.data.label import collate_labels, keep
from tessera.data.shards import benchmark_root
from tessera.models import MultiTowerModel, truncate_embeddings

from . import commands, common


class ClassesError(UserError, ValueError):
    pass


def read_benchmark_classes(root: Path) -> tuple[list[str], list[str] | None]:
    """classnames and templates of a CLIP_benchmark dataset root: `classnames.txt` and
    `zeroshot_classification_templates.txt`, one per line, templates with `{c}` where the class name goes."""
    names_file, templates_file = root / "classnames.txt", root / "zeroshot_classification_templates.txt"
    if not names_file.is_file():
        raise ClassesError(f"{root}: a CLIP_benchmark dataset for classification needs classnames.txt")
    names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    if not names:
        raise ClassesError(f"{names_file} lists no class")
    if not templates_file.is_file():
        return names, None
    templates = [line.strip() for line in templates_file.read_text().splitlines() if line.strip()]
    return names, template_forms(templates, templates_file) or None


def read_classes(path: str | Path) -> tuple[list[str], list[str] | None]:
    """classnames and templates from classes.json (or a CLIP_benchmark dataset root), checked; templates are None
    where the file gives none (the classified modality's default template applies, see `templates_for`)."""
    if Path(path).is_dir():
        return read_benchmark_classes(benchmark_root(path) or Path(path))
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ClassesError(f"{path}: cannot read classes ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("classnames"), list) or not doc["classnames"]:
        raise ClassesError(f"{path}: needs a non-empty list 'classnames'")
    names = doc["classnames"]
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise ClassesError(f"{path}: every classname must be a non-empty string")
    templates = doc.get("templates")
    if templates is None:
        return names, None
    if templates == "imagenet":
        return names, [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    if not isinstance(templates, list) or not templates:
        raise ClassesError(f"{path}: 'templates' must be a non-empty list of strings (or \"imagenet\")")
    return names, template_forms(templates, path)


def template_forms(templates: list[Any], where: Any) -> list[str]:
    """Class-prompt templates with `{}` (ours) or `{c}` (CLIP_benchmark's) where the class name goes, in the `{}`
    form; a ClassesError names one that has not exactly one of them."""
    forms = []
    for t in templates:
        form = t.replace("{c}", "{}") if isinstance(t, str) else t
        if not isinstance(form, str) or form.count("{}") != 1:
            raise ClassesError(f"{where}: template {t!r} must contain '{{}}' (or '{{c}}') exactly once")
        forms.append(form)
    return forms


def templates_for(modality: str, templates: list[str] | None) -> list[str]:
    """The templates of classes.json, or the classified modality's default one."""
    return templates if templates is not None else [modalities.modality(modality).template]


def prompt_modality(model: MultiTowerModel) -> str:
    """The model's tower that encodes class prompts; a ValueError when it has none."""
    language = modalities.language(model.modalities)
    if language is None:
        raise ValueError(f"zero-shot classification writes class prompts in text; the model has {model.modalities}")
    return language


class _Movable(dict):
    """A tower input that is a dict of tensors (a Hugging Face tokenizer's ids and mask), with the `.to(device)` that
    open_clip's classifier builder calls on what the tokenizer returns."""

    def to(self, device) -> _Movable:
        return _Movable({k: v.to(device) for k, v in self.items()})


class _PromptTowerAsCLIP:
    """What open_clip's classifier builder calls: encode_text(tokens, normalize=True)."""

    def __init__(self, model: MultiTowerModel):
        self.model, self.modality = model, prompt_modality(model)

    def encode_text(self, tokens, normalize: bool = True):
        return self.model.encode(self.modality, tokens, normalize=normalize)


@torch.no_grad()
def build_classifier(
    model: MultiTowerModel, classnames: list[str], templates: list[str], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(D, C) zero-shot weights from class prompts (with a prompt adapter's learned context, when it has one)."""
    language = prompt_modality(model)
    learner = getattr(model, "prompt_learner", None)
    if learner is not None and learner.has_context:  # CoOp: learned context + class name, no templates
        with common.eval_mode(model):
            return learner.class_features(model, classnames).float().cpu().T
    transform, collate = model.transforms(False)[language], model.collators()[language]

    def tokenizer(texts: list[str]):
        tokens = collate([transform(t) for t in texts])
        return _Movable(tokens) if isinstance(tokens, dict) else tokens

    with common.eval_mode(model):
        weights = build_zero_shot_classifier(
            _PromptTowerAsCLIP(model), tokenizer, classnames, templates, num_classes_per_batch=10, device=device
        )
    return weights.float().cpu()


@torch.no_grad()
def embed_labelled(
    model: MultiTowerModel,
    sources: list[SourceConfig],
    modality: str,
    batch_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
    stats: SampleStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) normalised embeddings and (N,) `cls` labels of every sample carrying both."""
    if modality not in model.modalities:
        raise ValueError(f"the model has no '{modality}' tower (it has {model.modalities})")
    transforms = {modality: model.transforms(False, compact=True)[modality], LABEL: keep}
    collators = {modality: model.collators()[modality], LABEL: collate_labels}
    feats, labels = [], []
    with common.eval_mode(model):
        for batch in eval_batches(
            common.sources_with(sources, [modality], [LABEL]),
            transforms,
            collators,
            [modality, LABEL],
            batch_size,
            num_workers,
            stats,
        ):
            labels.append(batch[LABEL])
            feats.append(model.encode(modality, to_device(batch, device, dtype)[modality]).float().cpu())
    if not feats:
        raise common.NoSamples(
            f"no sample in {[s.shards for s in sources]} carries both '{modality}' and a `cls` label"
        )
    return torch.cat(feats), torch.cat(labels)


def classification_metrics(logits_NC: torch.Tensor, labels_N: torch.Tensor) -> dict[str, float]:
    n_classes = logits_NC.shape[1]
    bad = (labels_N < 0) | (labels_N >= n_classes)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} label(s) outside the {n_classes} classes of classes.json, e.g. "
            f"{labels_N[bad][:5].tolist()}"
        )
    top = logits_NC.topk(min(5, n_classes), dim=1).indices
    hit = top == labels_N[:, None]
    pred = top[:, 0]
    recalls = [(pred[labels_N == c] == c).float().mean() for c in labels_N.unique()]
    return {
        "acc1": hit[:, :1].any(1).float().mean().item(),
        "acc5": hit.any(1).float().mean().item(),
        "mean_per_class_recall": torch.stack(recalls).mean().item(),
    }


def confusion_matrix(pred_N: torch.Tensor, labels_N: torch.Tensor, n_classes: int) -> torch.Tensor:
    return torch.bincount(labels_N * n_classes + pred_N, minlength=n_classes**2).view(n_classes, n_classes)


def evaluate_zeroshot(
    model: MultiTowerModel,
    sources: list[SourceConfig],
    modality: str,
    classnames: list[str],
    templates: list[str] | None,
    batch_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
    widths: Sequence[int] = (),
) -> dict[str, Any]:
    """Metrics, chance levels and the confusion matrix of classifying `modality` by class prompts (`templates`, or
    the modality's default template when None). `widths`: also the metrics of the model truncated to each width w
    (a Matryoshka model's prefixes: the samples are embedded once), under `widths`."""
    stats = SampleStats()
    templates = templates_for(modality, templates)
    weights_DC = build_classifier(model, classnames, templates, device)
    feats_ND, labels_N = embed_labelled(model, sources, modality, batch_size, device, dtype, num_workers, stats)
    logits = feats_ND @ weights_DC
    metrics = classification_metrics(logits, labels_N)
    by_width = {}
    served = model.cfg.truncate_dim
    try:
        for w in widths:  # class prompts are few: each width builds its own classifier, as the truncated model would
            weights_wC = build_classifier(model.truncate(w), classnames, templates, device)
            by_width[str(w)] = classification_metrics(truncate_embeddings(feats_ND, w) @ weights_wC, labels_N)
    finally:
        model.truncate(served)
    C = len(classnames)
    chance = {"acc1": 1 / C, "acc5": min(5, C) / C, "mean_per_class_recall": 1 / C}
    return {
        **({"widths": by_width} if widths else {}),
        "metrics": metrics,
        "chance": chance,
        "n": len(labels_N),
        "classes": C,
        "confusion": confusion_matrix(logits.argmax(1), labels_N, C).tolist(),
        "data": stats.to_dict(),
    }


def plot_confusion(confusion: list[list[int]], classnames: list[str], path: Path) -> None:
    cm = torch.tensor(confusion, dtype=torch.float64)
    cm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    C = len(classnames)
    fig = common.figure(figsize=(min(3 + 0.3 * C, 16), min(2.5 + 0.3 * C, 15)))
    ax = fig.subplots()
    im = ax.imshow(cm.numpy(), vmin=0, vmax=1, cmap="Blues")
    if C <= 40:
        ax.set_xticks(range(C), classnames, rotation=90, fontsize=7)
        ax.set_yticks(range(C), classnames, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`tessera eval zeroshot` with its command line read (`tessera.eval.commands`)."""
    if args.classes is None:
        roots = [benchmark_root(d) for d in args.data]
        if len(roots) != 1 or roots[0] is None:
            parser.error("--classes is required unless --data is one CLIP_benchmark dataset (with classnames.txt)")
        args.classes = roots[0]
    try:
        classnames, templates = read_classes(args.classes)
    except ClassesError as exc:
        parser.error(str(exc))
    model, device = common.load(args)
    args.modality = args.modality or common.default_classified(model)
    try:
        result = evaluate_zeroshot(
            model,
            parse_sources(args.data, "--data"),
            args.modality,
            classnames,
            templates,
            args.batch_size,
            device,
            None,
            args.workers,
        )
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    doc = {**common.benchmark_fields(args.data, args.model, "zeroshot_classification"), "modality": args.modality}
    doc.update(result)
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        print(f"{key:<24}{100 * result['metrics'][key]:6.1f}%   chance {100 * result['chance'][key]:5.1f}%")
    if args.out:
        out = common.write_json(common.output_path(args.out, doc), doc)
        png = out.with_name(out.stem + "_confusion.png")
        plot_confusion(result["confusion"], classnames, png)
        print(f"wrote {out} and {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(*commands.parse("zeroshot", argv))


if __name__ == "__main__":
    sys.exit(main())
