"""MTEB (and MIEB, its image extension) as a client: a Tessera model as an `mteb` encoder, and local zero-shot
classification from shards, so that `mteb.evaluate` runs offline.

    pip install -e ".[mteb]"
    python -m tessera.eval.mteb --model RUN_DIR/model --data "val-000000.tar" --classes classes.json --out mteb/

`TesseraEncoder(tessera.load(...))` is what `mteb.evaluate(model, tasks)` takes, for any mteb task whose
modalities the model has (text, image, audio): its `encode` reads mteb's batches (`text`, `image`, `audio`
columns), embeds them with the towers' own transforms, and, for inputs with two of them, adds the embeddings (as
mteb's open_clip wrapper does). The command wraps labelled shards (ours, or a CLIP_benchmark webdataset) as
mteb's ZeroShotClassification task with one prompt per class (the first template), runs it, and writes mteb's
result JSON. Nothing is downloaded: tasks that fetch a dataset from the Hugging Face hub need network.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.config import ConfigError, MissingExtra

try:  # the optional `mteb` extra
    import mteb
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.abstasks.zeroshot_classification import AbsTaskZeroShotClassification
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta
except ImportError as exc:
    message = f"tessera.eval.mteb needs mteb ({exc.name} is missing): pip install -e '.[mteb]'"
    if __name__ == "__main__":
        raise SystemExit(f"error: {message}") from None
    raise MissingExtra(message) from exc

from tessera.data import LABEL, eval_batches, parse_sources
from tessera.data.label import keep
from tessera.data.shards import benchmark_root

from . import commands
from .api import Model, load
from .common import default_classified
from .zeroshot import ClassesError, read_classes, templates_for

# mteb batch column -> our keyword for it (mteb has no graph modality)
COLUMNS = {"text": "texts", "image": "images", "audio": "sounds"}


class TesseraEncoder(AbsEncoder):
    """A loaded Tessera model (`tessera.load`) behind mteb's encoder protocol."""

    def __init__(self, model: Model, name: str = "tessera/model"):
        self.model = model
        self.mteb_model_meta = ModelMeta(
            loader=None,
            name=name,
            revision=None,
            release_date=None,
            languages=None,
            n_parameters=sum(p.numel() for p in model.module.parameters()),
            memory_usage_mb=None,
            max_tokens=None,
            embed_dim=model.module.output_dim,
            license=None,
            open_weights=True,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            similarity_fn_name="cosine",
            use_instructions=False,
            training_datasets=None,
            modalities=[m for m in ("text", "image", "audio") if m in model.modalities],
        )

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs) -> np.ndarray:
        parts = []
        for batch in inputs:
            embedded = []
            for column, keyword in COLUMNS.items():
                if column in batch:
                    items = [_audio(x) for x in batch[column]] if column == "audio" else list(batch[column])
                    embedded.append(self.model.embed(progress=False, **{keyword: items}))
            if not embedded:
                raise ConfigError(f"mteb gave a batch of {sorted(batch)}; the model embeds {self.model.modalities}")
            parts.append(torch.stack(embedded).sum(0))
        return torch.cat(parts).numpy()

    def similarity(self, embeddings1, embeddings2):
        a, b = torch.as_tensor(np.asarray(embeddings1)), torch.as_tensor(np.asarray(embeddings2))
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T

    def similarity_pairwise(self, embeddings1, embeddings2):
        a, b = torch.as_tensor(np.asarray(embeddings1)), torch.as_tensor(np.asarray(embeddings2))
        return (torch.nn.functional.normalize(a, dim=-1) * torch.nn.functional.normalize(b, dim=-1)).sum(-1)


def _audio(item: Any):
    """mteb's audio item ({"array", "sampling_rate"}) -> the (waveform, rate) pair our audio towers take."""
    return (item["array"], int(item["sampling_rate"])) if isinstance(item, dict) else item  # from_value converts


def zeroshot_task(data: list[str], modality: str, prompts: list[str], name: str):
    """mteb's ZeroShotClassification task over the labelled samples of `data` (shard specs): `modality` inputs,
    candidate labels `prompts` (one per class)."""
    column = modality if modality in COLUMNS else None  # mteb's column of a modality is its name
    if column is None:
        raise ConfigError(f"mteb has no {modality} modality (it has text, image and audio)")
    inputs, labels = [], []
    identity = {modality: keep, LABEL: keep}  # decoded values as they are
    for batch in eval_batches(parse_sources(data, "--data"), identity, {k: list for k in identity}, list(identity), 64):
        inputs.extend(batch[modality])
        labels.extend(int(x) for x in batch[LABEL])
    if not inputs:
        raise ConfigError(f"{data}: no labelled {modality} sample")
    features = {column: [_as_mteb(modality, x) for x in inputs], "label": labels}

    class ShardsZeroShot(AbsTaskZeroShotClassification):
        input_column_name = column
        metadata = TaskMetadata(
            name=name,
            description=f"zero-shot classification of the {modality} samples of {' '.join(data)}",
            dataset={"path": "local", "revision": "local"},
            type="ZeroShotClassification",
            category="i2t" if modality == "image" else "a2t",
            modalities=[modality, "text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="accuracy",
        )

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = DatasetDict({"test": Dataset.from_dict(features)})
            self.data_loaded = True

        def get_candidate_labels(self) -> list[str]:
            return prompts

    return ShardsZeroShot()


def _as_mteb(modality: str, value: Any) -> Any:
    if modality == "audio":
        wave, rate = value
        return {"array": np.asarray(wave, dtype=np.float32), "sampling_rate": rate}
    return value


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`tessera eval mteb` with its command line read (`tessera.eval.commands`)."""
    try:
        model = load(args.model)
        classes = args.classes or benchmark_root(args.data[0])
        if classes is None:
            raise ConfigError("--classes is required unless --data is a CLIP_benchmark dataset")
        classnames, templates = read_classes(classes)
        modality = args.modality or default_classified(model.module)
        template = templates_for(modality, templates)[0]
        task = zeroshot_task(args.data, modality, [template.format(c) for c in classnames], "TesseraShards")
        warnings.filterwarnings("ignore", module="sklearn")  # precision of classes never predicted: mteb's business
        result = mteb.evaluate(
            TesseraEncoder(model, f"tessera/{Path(args.model).name}"), task, cache=None, show_progress_bar=False
        )
    except (ConfigError, ClassesError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    scores = result.task_results[0].scores["test"][0]
    print(f"mteb {task.metadata.name}: accuracy {100 * scores['accuracy']:.1f}% (prompt {template!r})")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{task.metadata.name}.json"
        path.write_text(json.dumps(result.task_results[0].to_dict(), indent=2, default=str))
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(*commands.parse("mteb", argv))


if __name__ == "__main__":
    sys.exit(main())
