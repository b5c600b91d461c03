"""Safe per-modality decoding of raw shard samples.

A raw sample is `{"__key__": str, "__url__": str, suffix: bytes, ...}` as webdataset groups it. Each
modality has one decoder: it says which member suffixes it reads and turns their bytes into a Python
value (a PIL image, a list of captions, ...), raising `BadSample(reason)` for what it cannot use.
Nothing is ever unpickled: pickle-bearing members are never read (see `REJECTED_SUFFIXES`).
"""

from __future__ import annotations

import io
import json
import random
import warnings
from typing import Any

from PIL import Image

# Members that would need pickle to read. They are dropped unread, and counted.
REJECTED_SUFFIXES = frozenset({"pyd", "pth", "pt", "pkl", "pickle"})


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSample("bad_json", str(exc)) from None


class Decoder:
    """Base class. `suffixes` are in order of preference."""

    modality: str = ""
    suffixes: tuple[str, ...] = ()

    def present(self, sample: dict[str, Any]) -> bool:
        return any(s in sample for s in self.suffixes)

    def decode(self, sample: dict[str, Any]) -> Any:
        raise NotImplementedError

    def pick(self, value: Any, rng: random.Random) -> Any:
        """Training-time choice among several views of one sample (e.g. captions). Default: the value."""
        return value

    def first(self, value: Any) -> Any:
        """Evaluation-time deterministic choice."""
        return value

    def views(self, value: Any) -> list[Any]:
        """Every view of one sample, for evaluations that score them all (e.g. each caption as a query)."""
        return [value]


class ImageDecoder(Decoder):
    modality = "image"
    suffixes = ("jpg", "jpeg", "png", "webp")

    def decode(self, sample: dict[str, Any]) -> Image.Image:
        raw = next(sample[s] for s in self.suffixes if s in sample)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(raw))
                img.load()
            return img.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadSample("image_too_large", str(exc)) from None
        except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for unidentified or truncated data
            raise BadSample("undecodable_image", str(exc)) from None


class TextDecoder(Decoder):
    """`txt` is one caption; `json` carries `caption` (str), `captions` (list) or `text` (str or list)."""

    modality = "text"
    suffixes = ("txt", "json")

    def decode(self, sample: dict[str, Any]) -> list[str]:
        captions: list[Any] = []
        if "txt" in sample:
            try:
                captions = [sample["txt"].decode("utf-8")]
            except UnicodeDecodeError:
                raise BadSample("bad_text_encoding") from None
        elif "json" in sample:
            meta = _decode_json(sample["json"])
            if not isinstance(meta, dict):
                raise BadSample("bad_json", "json member is not an object")
            for key in ("captions", "caption", "text"):
                if key in meta:
                    value = meta[key]
                    captions = value if isinstance(value, list) else [value]
                    break
        cleaned = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        if not cleaned:
            raise BadSample("empty_text")
        return cleaned

    def pick(self, value: list[str], rng: random.Random) -> str:
        return value[0] if len(value) == 1 else rng.choice(value)

    def first(self, value: list[str]) -> str:
        return value[0]

    def views(self, value: list[str]) -> list[str]:
        return list(value)


class LabelDecoder(Decoder):
    modality = "label"
    suffixes = ("cls",)

    def decode(self, sample: dict[str, Any]) -> int:
        try:
            return int(sample["cls"].decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            raise BadSample("bad_label") from None


# The modality -> decoder table. A new modality adds one decoder class and one entry here.
DECODERS: dict[str, Decoder] = {d.modality: d for d in (ImageDecoder(), TextDecoder(), LabelDecoder())}
