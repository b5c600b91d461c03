"""Text members of shards: `txt` holds one caption per line (one line in img2dataset's shards; in CLIP_benchmark's
retrieval shards, every caption of the image); `json` carries `caption` (str), `captions` (list) or `text` (str or
list), as img2dataset and LAION-CLAP write them. A sample's captions are its views: training picks one at random,
evaluation takes the first (or scores every one)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .decode import BadSample, Decoder, ManifestError, decode_json


class TextDecoder(Decoder):
    modality = "text"
    suffixes = ("txt", "json")
    manifest_fields = ("captions",)

    def decode(self, sample: dict[str, Any]) -> list[str]:
        captions: list[Any] = []
        if "txt" in sample:
            try:
                captions = sample["txt"].decode("utf-8").splitlines()
            except UnicodeDecodeError:
                raise BadSample("bad_text_encoding") from None
        elif "json" in sample:
            meta = decode_json(sample["json"])
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

    def members(self, field: str, value: Any, base: Path) -> dict[str, Any]:
        """`text`: one caption, written as `.txt`; `captions`: several, written into the sample's `.json`."""
        if field == "text":
            if not isinstance(value, str) or not value.strip():
                raise ManifestError("'text' must be a non-empty string")
            if len(value.splitlines()) > 1:  # a `.txt` line is a caption: keep a multi-line one whole
                return {"json": {"caption": value}}
            return {"txt": value.encode("utf-8")}
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c.strip() for c in value):
            raise ManifestError("'captions' must be a non-empty list of non-empty strings")
        return {"json": {"captions": value}}
