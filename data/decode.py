"""Safe per-modality decoding of raw shard samples: the interface every modality's decoder implements.

A raw sample is `{"__key__": str, "__url__": str, suffix: bytes, ...}` as webdataset groups it. Each
modality has one decoder (registered in `tessera.modalities`): it says which member suffixes it reads and
turns their bytes into a Python value (a PIL image, a list of captions, ...), raising `BadSample(reason)` for
what it cannot use. It also says how `make_shards` writes a manifest field of its modality.
Nothing is ever unpickled: pickle-bearing members are never read (see `REJECTED_SUFFIXES`).
"""

from __future__ import annotations

import functools
import importlib
import json
import random
from pathlib import Path
from typing import Any

from tessera import modalities

# Members that would need pickle to read. They are dropped unread, and counted.
REJECTED_SUFFIXES = frozenset({"pyd", "pth", "pt", "pkl", "pickle"})


@functools.cache
def torch_module():
    """torch, imported when a decoder makes its first tensor: what the decoders declare (suffixes, manifest fields,
    `tessera make-shards --help`) is read without it. Cached: the loader calls it for every sample."""
    return importlib.import_module("torch")


class BadSample(Exception):
    """A sample that cannot be used; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ManifestError(ValueError):
    """A `make_shards` manifest line that cannot be written; the message says what is wrong with it."""


def decode_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSample("bad_json", str(exc)) from None


def file_suffix(path: Path) -> str:
    """Everything after the first dot of the file name, as a shard member suffix."""
    return path.name.split(".", 1)[1].lower() if "." in path.name else ""


def read_member(field: str, value: Any, base: Path) -> bytes:
    """The bytes of the file a manifest field names (relative to the manifest's folder)."""
    try:
        return (base / str(value)).read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read {field} file '{value}': {exc.strerror}") from None


class Decoder:
    """Base class. `suffixes` are in order of preference; `manifest_fields` are the manifest fields (besides the
    modality's own name) whose values this modality writes."""

    modality: str = ""
    suffixes: tuple[str, ...] = ()
    manifest_fields: tuple[str, ...] = ()

    def present(self, sample: dict[str, Any]) -> bool:
        return any(s in sample for s in self.suffixes)

    def decode(self, sample: dict[str, Any]) -> Any:
        raise NotImplementedError

    def decode_for(self, sample: dict[str, Any], transform) -> Any:
        """`decode`, for what `transform` makes of the value next (an image decoder reads the transform's
        `decode_size`: how large it needs the picture). Default: `decode`."""
        return self.decode(sample)

    def read_file(self, path: Path) -> Any:
        """A file of this modality (its name ends in a suffix this decoder reads) -> its value, as `decode` gives it
        for a shard member; the Python API's file inputs."""
        name = path.name.lower()
        suffix = next((s for s in self.suffixes if name.endswith("." + s)), None)
        if suffix is None:
            raise BadSample("unknown_suffix", f"{path}: a {self.modality} file ends in one of {list(self.suffixes)}")
        return self.decode({suffix: path.read_bytes()})

    def from_value(self, value: Any) -> Any:
        """A value a user has at hand (the Python API's input: a PIL image, a waveform, ...) -> the value `decode`
        would give for it. Default: the value itself."""
        return value

    def pick(self, value: Any, rng: random.Random) -> Any:
        """Training-time choice among several views of one sample (e.g. captions). Default: the value."""
        return value

    def first(self, value: Any) -> Any:
        """Evaluation-time deterministic choice."""
        return value

    def views(self, value: Any) -> list[Any]:
        """Every view of one sample, for evaluations that score them all (e.g. each caption as a query)."""
        return [value]

    def members(self, field: str, value: Any, base: Path) -> dict[str, Any]:
        """`make_shards`: one manifest field of this modality -> tar members `{suffix: bytes}`; a `json` member given
        as a dict is merged into the sample's metadata. Default: `value` names a file whose suffix this modality
        reads."""
        suffix = file_suffix(Path(str(value)))
        if suffix not in self.suffixes:
            raise ManifestError(f"{field} file '{value}' has suffix '{suffix}'; {field} takes {self.suffixes}")
        return {suffix: read_member(field, value, base)}


def decoders(names: list[str] | tuple[str, ...]) -> dict[str, Decoder]:
    """One decoder per modality name; a name no modality has is a `ConfigError` naming the known ones."""
    return {name: modalities.decoder(name) for name in names}
