"""The Python API: load a model, embed anything it encodes, compare, classify.

    import tessera
    model = tessera.load("runs/demo/model")      # a Tessera export, an open_clip or a transformers CLIP directory
    z_img = model.embed(images=[pil_image])      # (N, D), L2-normalised, on the CPU
    z_txt = model.embed(texts=["a red circle"])
    model.similarity(z_img, z_txt)               # (N, M) cosine similarities
    model.classify([pil_image], ["circle", "square"], templates=["a photo of a {}."])   # (N, C) probabilities

Inputs are what a user has at hand: PIL images, strings, `(waveform, sample_rate)` pairs, graphs, or paths to
files of any kind the modality's shard decoder reads (jpg, flac, smi, mp4, ...); a graph may also be a SMILES
string, a video the bytes of a video file.
The towers' own eval transforms and tokenizers are applied inside; the model runs on the GPU when there is one,
in batches, with a progress bar when there is more than one batch.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tessera import modalities
from tessera.config import ConfigError
from tessera.data import BadSample, to_device
from tessera.models import MultiTowerModel, load_model, pair_key
from tessera.models.export import is_tessera_export
from tessera.models.open_clip_io import from_open_clip

from .common import default_classified, eval_mode
from .zeroshot import ClassesError, build_classifier, prompt_modality, template_forms, templates_for


def load(path: str | Path, device: str | torch.device | None = None, truncate_dim: int | None = None) -> Model:
    """The model in `path`: a Tessera export (or a run directory holding one in model/), an open_clip model
    directory (`open_clip_config.json`, `local-dir:` prefix allowed) or a transformers CLIPModel or SiglipModel
    directory. `truncate_dim`: embed with the first N features only, renormalised (a model trained with
    loss.matryoshka keeps its quality at the widths it was trained at)."""
    p = Path(str(path).removeprefix("local-dir:"))
    if not is_tessera_export(p) and is_tessera_export(p / "model"):
        p = p / "model"  # a run directory (its own config.yaml is the run's config)
    if (p / "config.yaml").is_file():
        module = load_model(p)
    elif (p / "open_clip_config.json").is_file():
        module = from_open_clip(p)
    elif (p / "config.json").is_file():
        module = importlib.import_module("tessera.models.hf_clip_io").from_hf(p)  # imports transformers
    else:
        raise ConfigError(
            f"'{path}' is not a model directory: no config.yaml (Tessera), open_clip_config.json (open_clip) or "
            "config.json (transformers)"
        )
    if truncate_dim is not None:
        module.truncate(truncate_dim)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Model(module.to(device).eval(), device)


class Model:
    """A loaded model with its transforms: `embed`, `similarity`, `classify`. `module` is the MultiTowerModel."""

    def __init__(self, module: MultiTowerModel, device: str | torch.device = "cpu"):
        self.module, self.device = module, torch.device(device)
        self._transforms = module.transforms(is_train=False)
        self._collate = module.collators()
        self._decoders = {m: modalities.decoder(m) for m in module.modalities}

    @property
    def modalities(self) -> list[str]:
        return self.module.modalities

    def logit_scale(self, a: str, b: str) -> float:
        """The learned inverse temperature of the pair (a, b), in either order."""
        name = self.module.pair_name(a, b)
        if name is None:
            raise ConfigError(f"the model does not align {a} with {b}; its pairs: {self.module.pairs}")
        return float(self.module.logit_scale(*((a, b) if name == pair_key(a, b) else (b, a))).detach())

    def _modality(self, keyword: str) -> str:
        m = modalities.by_keyword(keyword)
        if m not in self.module.towers:
            raise ConfigError(f"'{keyword}': the model encodes {self.modalities} (as {self._keywords()})")
        return m

    def _keywords(self) -> str:
        return ", ".join(f"{modalities.modality(m).keyword or m}=" for m in self.modalities)

    def _prepare(self, modality: str, item: Any) -> Any:
        """One input -> what the tower's transform takes: a string of the prompt modality is its text, a file goes
        through the modality's shard decoder, and anything else through its `from_value`."""
        if modality == modalities.language(self.modalities) and isinstance(item, str):
            return item
        decoder = self._decoders[modality]
        names_file = isinstance(item, str) and any(item.lower().endswith("." + s) for s in decoder.suffixes)
        try:
            if isinstance(item, Path) or names_file or (isinstance(item, str) and Path(item).is_file()):
                return decoder.read_file(Path(item))
            return decoder.from_value(item)
        except BadSample as exc:
            raise ConfigError(f"{modality} input: {exc}") from None
        except OSError as exc:  # a missing or unreadable file
            raise ConfigError(f"{modality} input: cannot read {item}: {exc.strerror or exc}") from None

    @torch.no_grad()
    def embed(self, batch_size: int = 64, progress: bool | None = None, **inputs: Sequence[Any]):
        """L2-normalised embeddings, (N, D) float32 on the CPU, of each keyword's inputs (`images=`, `texts=`,
        `sounds=` or `audio=`, `graphs=`, `videos=`): a tensor for one keyword, a dict keyed like the keywords for
        several. `progress`: a progress bar (default: when there is more than one batch)."""
        if not inputs:
            raise ConfigError(f"embed what? pass {self._keywords()}")
        out = {}
        for keyword, items in inputs.items():
            m = self._modality(keyword)
            if isinstance(items, str | Path) or not isinstance(items, Sequence):
                raise ConfigError(f"{keyword}= takes a list (of {len(self.modalities)} kinds of input, one per item)")
            starts = range(0, len(items), batch_size)
            show = len(starts) > 1 if progress is None else progress
            chunks = []
            with eval_mode(self.module):
                for i in tqdm(starts, desc=f"embed {keyword}", disable=not show, unit="batch"):
                    batch = self._collate[m](
                        [self._transforms[m](self._prepare(m, x)) for x in items[i : i + batch_size]]
                    )
                    chunks.append(self.module.encode(m, to_device(batch, self.device)).float().cpu())
            out[keyword] = torch.cat(chunks) if chunks else torch.empty(0, self.module.output_dim)
        return next(iter(out.values())) if len(out) == 1 else out

    def similarity(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None, **inputs) -> torch.Tensor:
        """(N, M) cosine similarities: of two embedding tensors, or of two keywords' inputs
        (`similarity(images=[...], texts=[...])`). Scale by `logit_scale(a, b)` for the model's logits."""
        if a is None and b is None:
            if len(inputs) != 2:
                raise ConfigError(f"similarity takes two embedding tensors or two of {self._keywords()}")
            a, b = self.embed(**inputs).values()
        elif a is None or b is None or inputs:
            raise ConfigError("similarity takes two embedding tensors, or keywords, not both")
        return a.float() @ b.float().T

    @torch.no_grad()
    def classify(
        self,
        inputs: Sequence[Any],
        classnames: Sequence[str],
        templates: Sequence[str] | None = None,
        modality: str | None = None,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """(N, C) class probabilities of `inputs` (of `modality`: by default the model's first tower that does not
        write the prompts, e.g. images), zero-shot from prompts: each template with `{}` or `{c}` (CLIP_benchmark's
        form) where the class name goes; by default the modality's own template ("a photo of a {}.")."""
        m = self._modality(modality) if modality else default_classified(self.module)
        language = prompt_modality(self.module)
        if not classnames:
            raise ConfigError("classify needs at least one class name")
        try:
            forms = template_forms(list(templates), "classify") if templates is not None else None
        except ClassesError as exc:
            raise ConfigError(str(exc)) from None
        weights_DC = build_classifier(self.module, list(classnames), templates_for(m, forms), self.device)
        z_ND = self.embed(batch_size=batch_size, **{m: inputs})
        return (self.logit_scale(m, language) * z_ND @ weights_DC).softmax(dim=-1)
