"""The modalities Tessera knows: one entry each, the one place where a modality is registered.

An entry names its parts by import path ("module:attribute"); each part lives in its own module and declares
everything about itself:
- `decoder` (in `tessera.data`): the safe decoder of the modality's shard members. It declares the member
  suffixes it reads, how several views of a sample are chosen (captions), and how `make_shards` turns a manifest
  field of the modality into members.
- `encoders` (in `tessera.models`), by the name a config's `encoder:` key uses. Each encoder owns its typed
  config, its transform and collate, its LoRA targets and its prompt hooks.
- `keyword`: what the Python API calls its inputs (`model.embed(images=...)`); the modality's name works too.
- eval defaults: `template`, the class-prompt template of zero-shot classification when classes.json gives
  none; `language`, whether class prompts are written in this modality (its tower classifies the others).

Parts are imported on first use, never as a side effect of importing a package: reading shards imports the
decoders of the modalities a run reads and no encoder, and building a model imports the encoders it uses and
no decoder. So a loader worker imports open_clip, transformers or torch_geometric only when a transform needs
them. Adding a modality is its own decoder and encoder modules, and one entry below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError, closest


@dataclass(frozen=True)
class Modality:
    name: str
    decoder: str
    encoders: dict[str, str] = field(default_factory=dict)
    keyword: str = ""
    template: str = "{}"
    language: bool = False


MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality(
            "image",
            "tessera.data.image:ImageDecoder",
            {"open_clip_image": "tessera.models.open_clip_image:OpenClipImageEncoder"},
            keyword="images",
            template="a photo of a {}.",
        ),
        Modality(
            "text",
            "tessera.data.text:TextDecoder",
            {
                "open_clip_text": "tessera.models.open_clip_text:OpenClipTextEncoder",
                "hf_text": "tessera.models.hf_text:HFTextEncoder",
            },
            keyword="texts",
            language=True,
        ),
        Modality(
            "audio",
            "tessera.data.audio:AudioDecoder",
            {"ast": "tessera.models.audio:ASTEncoder", "hf_audio": "tessera.models.audio:HFAudioEncoder"},
            keyword="sounds",
            template="the sound of a {}.",
        ),
        Modality(
            "graph", "tessera.data.graph:GraphDecoder", {"gnn": "tessera.models.graph:GraphEncoder"}, keyword="graphs"
        ),
        Modality(
            "video",
            "tessera.data.video:VideoDecoder",
            {"open_clip_video": "tessera.models.video:OpenClipVideoEncoder"},
            keyword="videos",
            template="a video of a {}.",
        ),
        # `cls` members: integer class ids, the targets of label positives and classification; never a tower
        Modality("label", "tessera.data.label:LabelDecoder"),
    )
}

_resolved: dict[str, Any] = {}


def resolve(path: str) -> Any:
    """The object a "module:attribute" path names, imported on first use."""
    if path not in _resolved:
        module, _, attr = path.partition(":")
        _resolved[path] = getattr(importlib.import_module(module), attr)
    return _resolved[path]


def modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise ConfigError(f"unknown modality '{name}'.{closest(name, MODALITIES)} Known: {sorted(MODALITIES)}")
    return MODALITIES[name]


def decoder(name: str) -> Any:
    """A decoder instance for modality `name`."""
    return resolve(modality(name).decoder)()


def encoder_names() -> dict[str, str]:
    """Every registered encoder name -> the modality it encodes."""
    return {enc: m.name for m in MODALITIES.values() for enc in m.encoders}


def encoder_class(name: str) -> type:
    """The Encoder class registered as `name`."""
    names = encoder_names()
    if name not in names:
        raise ConfigError(f"unknown encoder '{name}'.{closest(str(name), names)} Registered: {sorted(names)}")
    return resolve(MODALITIES[names[name]].encoders[name])


def by_keyword(word: str) -> str | None:
    """The modality a Python API keyword names: its `keyword` (images=) or its own name (image=)."""
    for m in MODALITIES.values():
        if word in (m.keyword, m.name):
            return m.name
    return None


def language(modalities: list[str] | tuple[str, ...] | None = None) -> str | None:
    """The modality class prompts are written in (among `modalities`, when given), or None."""
    for m in MODALITIES.values():
        if m.language and (modalities is None or m.name in modalities):
            return m.name
    return None
