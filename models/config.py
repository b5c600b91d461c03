"""Configuration of a multi-tower model: one tower per modality, a shared embedding width, the pairs; and reading it
from an exported model directory (`read_model_config`). Needs no torch."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tessera import modalities
from tessera.config import ConfigError, closest, from_dict, require, to_dict

# an exported model directory: config.yaml names this format and version
FORMAT = "tessera-model"
FORMAT_VERSION = 1


@dataclass
class HeadConfig:
    kind: Literal["auto", "identity", "linear", "mlp"] = field(
        default="auto", metadata={"help": "auto: identity when the encoder already outputs embed_dim, else linear"}
    )
    hidden_dim: int | None = field(default=None, metadata={"help": "mlp hidden width; default: the input width"})
    dropout: float = field(default=0.0, metadata={"help": "dropout before the projection"})

    def __post_init__(self):
        require(0.0 <= self.dropout < 1.0, f"head.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TowerConfig:
    """`{encoder: NAME, head: {...}, **the encoder's own config}` in YAML; NAME is registered in
    `tessera.modalities`, under the modality it encodes."""

    encoder: str
    params: Any = None
    head: HeadConfig = field(default_factory=HeadConfig)

    @property
    def modality(self) -> str:
        return modalities.encoder_names()[self.encoder]

    @property
    def encoder_cls(self) -> type:
        return modalities.encoder_class(self.encoder)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> TowerConfig:
        if isinstance(data, TowerConfig):
            return data
        names = modalities.encoder_names()
        if not isinstance(data, dict) or "encoder" not in data:
            raise ConfigError(f"{where}: a tower needs 'encoder', one of {sorted(names)}")
        data = dict(data)
        name = data.pop("encoder")
        if name not in names:
            raise ConfigError(
                f"{where}.encoder: unknown encoder '{name}'.{closest(str(name), names)} Registered: {sorted(names)}"
            )
        head = from_dict(HeadConfig, data.pop("head", {}), f"{where}.head")
        params = from_dict(modalities.encoder_class(name).config_cls, data, where)
        return cls(encoder=name, params=params, head=head)

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder, **to_dict(self.params), "head": to_dict(self.head)}


# the default model: CLIP ViT-B-32 (open_clip's towers)
DEFAULT_TOWERS = {m: {"encoder": f"open_clip_{m}", "model": "ViT-B-32"} for m in ("image", "text")}


def pair_key(a: str, b: str, *more: str) -> str:
    """The name of a pair's (or a tuple's) temperature: its modalities joined by `__`."""
    return "__".join((a, b, *more))


@dataclass
class ModelConfig:
    embed_dim: int = field(default=512, metadata={"help": "width of the shared embedding space"})
    towers: dict[str, TowerConfig] = field(
        default_factory=lambda: {m: TowerConfig.from_dict(t, m) for m, t in DEFAULT_TOWERS.items()},
        # `--help` shows the default as written here: building it would import the encoders' libraries
        metadata={
            "help": "modality -> {encoder: NAME, ...encoder config}; default: CLIP ViT-B-32",
            "shown": DEFAULT_TOWERS,
        },
    )
    pairing: Literal["anchor", "all_pairs"] = field(
        default="anchor",
        metadata={
            "help": "which modality pairs the loss aligns when model.pairs is not given: anchor = every modality "
            "with the anchor (ImageBind/LanguageBind: one hub), all_pairs = every two towers"
        },
    )
    anchor: str | None = field(
        default=None,
        metadata={
            "help": "the hub modality of pairing=anchor; default: the language tower (text) when there is one, else "
            "the first"
        },
    )
    pairs: list[tuple[str, str]] | None = field(
        default=None,
        metadata={"help": "explicit modality pairs the loss aligns, each with its own temperature; overrides pairing"},
    )
    truncate_dim: int | None = field(
        default=None,
        metadata={
            "help": "serve the first N features of the embedding, renormalised: a Matryoshka-trained model "
            "(loss.matryoshka) at a smaller width; null: all embed_dim"
        },
    )
    tuples: list[list[str]] = field(
        default_factory=list,
        metadata={
            "help": "modality tuples of three or more that loss.higher_order scores jointly, each with a temperature "
            "of its own, e.g. [[image, audio, text]]: the sources carrying all of a tuple's modalities add its loss"
        },
    )
    init_temperature: float = field(default=0.07, metadata={"help": "initial softmax temperature (CLIP: 0.07)"})
    max_logit_scale: float = field(default=100.0, metadata={"help": "clamp on 1/temperature"})
    init_logit_bias: float | None = field(
        default=None,
        metadata={
            "help": "a learnable logit bias per pair, starting here (SigLIP: -10, with "
            "init_temperature 0.1); null: none (InfoNCE has no use for one)"
        },
    )

    def __post_init__(self):
        require(self.embed_dim > 0, f"model.embed_dim must be positive, got {self.embed_dim}")
        require(
            self.truncate_dim is None or 0 < self.truncate_dim <= self.embed_dim,
            f"model.truncate_dim must be in [1, embed_dim={self.embed_dim}], got {self.truncate_dim}",
        )
        require(len(self.towers) >= 1, "model.towers is empty: add e.g. image: {encoder: open_clip_image}")
        for name, tower in self.towers.items():
            require(
                tower.modality == name,
                f"model.towers.{name}: encoder '{tower.encoder}' encodes '{tower.modality}'; "
                f"put it under towers.{tower.modality}",
            )
        for a, b in self.pairs or []:
            for m in (a, b):
                require(m in self.towers, f"model.pairs: '{m}' has no tower.{closest(m, self.towers)}")
            require(a != b, f"model.pairs: ({a}, {b}) pairs a modality with itself")
        for group in self.tuples:
            require(
                len(group) >= 3 and len(set(group)) == len(group),
                f"model.tuples: {group} is not three or more different modalities (pairs go in model.pairs)",
            )
            for m in group:
                require(m in self.towers, f"model.tuples: '{m}' has no tower.{closest(m, self.towers)}")
        require(
            self.anchor is None or self.anchor in self.towers,
            f"model.anchor: '{self.anchor}' has no tower.{closest(str(self.anchor), self.towers)}",
        )
        require(
            len(self.towers) >= 2,
            f"model.towers has only {list(self.towers)}: a contrastive model needs at least two towers",
        )
        require(0.0 < self.init_temperature, "model.init_temperature must be positive")
        require(
            self.max_logit_scale >= 1.0 / self.init_temperature,
            f"model.max_logit_scale ({self.max_logit_scale}) is below 1/init_temperature",
        )

    def pair_list(self) -> list[tuple[str, str]]:
        """The pairs the loss aligns, each as (a, b) in tower order (which names its temperature `a__b`)."""
        if self.pairs is not None:
            return [tuple(p) for p in self.pairs]
        every = list(itertools.combinations(self.towers, 2))
        if self.pairing == "all_pairs":
            return every
        return [(a, b) for a, b in every if self.hub in (a, b)]

    @property
    def hub(self) -> str:
        """The anchor modality of pairing=anchor."""
        if self.anchor is not None:
            return self.anchor
        return modalities.language(list(self.towers)) or next(iter(self.towers))

    @property
    def init_logit_scale(self) -> float:
        return math.log(1.0 / self.init_temperature)


def _resolve_relative(node: Any, base: Path) -> Any:
    if isinstance(node, dict):
        return {k: _resolve_relative(v, base) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_relative(v, base) for v in node]
    if isinstance(node, str) and node.startswith("./"):
        return str(base / node[2:])
    return node


def read_model_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    path = model_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"'{model_dir}' is not an exported Tessera model: no config.yaml "
            "(a run directory keeps its export in RUN_DIR/model)"
        )
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a Tessera model config (format != {FORMAT!r})")
    if doc.get("version", 0) > FORMAT_VERSION:
        raise ConfigError(f"{path} has format version {doc['version']}; this Tessera reads up to {FORMAT_VERSION}")
    return from_dict(ModelConfig, _resolve_relative(doc["model"], model_dir.resolve()), "model")
