"""Batch keys derived from a sample's modality, beside the modality's own input: what a distillation teacher takes.

A `Derived` sits in the loader's transforms under its own batch key (`teacher_key(m)`), with a collator beside it,
and the workers make it from the same sample as modality `m`'s input:
- `View`: the teacher's own transform of the same decoded value (the same caption the student drew), where the
  teacher's input differs from the student's (image size, normalisation, tokenizer);
- `StoredEmbedding`: the teacher's embedding written into the shard by `tessera embed-shards` (an fp16 `.npy`
  member, read with allow_pickle=False), so training never runs the teacher. A sample without it is skipped and
  counted (`missing_teacher_<m>`); a member of the wrong shape or dtype is an error naming it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .decode import BadSample, torch_module
from .shards import ShardError

TEACHER_MANIFEST = "teacher.json"  # beside shards `tessera embed-shards` wrote: the teacher of their embeddings
TEACHER_PREFIX = "teacher/"
LOCAL_PREFIX = "local/"  # a local crop of a modality for the student (SILC's self-distillation)
# a stored embedding's member: KEY.teacher-<name>.<modality>.npy
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def teacher_key(modality: str) -> str:
    """The batch key of the teacher's input (or stored embedding) of `modality`."""
    return TEACHER_PREFIX + modality


def local_key(modality: str) -> str:
    """The batch key of a local crop of `modality`, which the student encodes beside the whole sample."""
    return LOCAL_PREFIX + modality


def is_derived_key(key: str) -> bool:
    """Whether a batch key is a derived input (a teacher's, or a local crop) rather than a modality's own."""
    return key.startswith((TEACHER_PREFIX, LOCAL_PREFIX))


def check_teacher_name(name: str) -> str:
    """A teacher's name as it enters member names: lower-case letters, digits, '-' and '_'."""
    if not _NAME_RE.match(name):
        raise ValueError(f"teacher name '{name}' must be 1-64 of a-z, 0-9, '-', '_' (starting with a letter or digit)")
    return name


def embedding_suffix(teacher: str, modality: str) -> str:
    """The member suffix of `teacher`'s stored embedding of `modality`."""
    return f"teacher-{teacher}.{modality}.npy"


class Derived:
    """Made from a raw sample and the value its modality decoded to (after the training-time pick)."""

    modality: str

    def __call__(self, sample: dict[str, Any], value: Any) -> Any:
        raise NotImplementedError


@dataclass
class View(Derived):
    modality: str
    transform: Callable[[Any], Any]

    def __call__(self, sample: dict[str, Any], value: Any) -> Any:
        return self.transform(value)


@dataclass
class StoredEmbedding(Derived):
    modality: str
    suffix: str
    width: int

    def __call__(self, sample: dict[str, Any], value: Any) -> Any:
        raw = sample.get(self.suffix)
        if raw is None:
            raise BadSample(f"missing_teacher_{self.modality}")
        where = f"{sample.get('__url__', '?')}: member {sample.get('__key__', '?')}.{self.suffix}"
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ShardError(f"{where} is not a .npy array ({exc})") from None
        if array.shape != (self.width,) or array.dtype.kind != "f":
            raise ShardError(
                f"{where} holds a {array.dtype} array of shape {array.shape}; the teacher's manifest says "
                f"({self.width},) floats: the shards and the manifest are of different teachers"
            )
        return torch_module().from_numpy(array.astype(np.float16, copy=False))  # compact in transit


def stack(values: list[Any]) -> Any:
    """The collator of stored embeddings: (B, E) fp16."""
    return torch_module().stack(values)
