"""Retrieval by several modalities at once (`--query image+audio --target text`): each sample's parts together
find its target, under three scoring rules: the sum of pairwise cosines, Symile's multilinear inner product, and
GRAM's volume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tessera.data import SampleStats, SourceConfig
from tessera.models import MultiTowerModel

from .ranking import CHUNK_ELEMENTS, Embedded, chance_metrics, embed, metrics_from_positions, positive_positions

JOINT_RULES = ("sum", "mip", "volume")


def volume_similarity(parts: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Scores of queries made of `parts` normalised embeddings side by side, (C, parts * D), against targets (T, D):
    minus the volume the target and the query's parts span, -sqrt(det G) of their Gram matrix (GRAM's score)."""

    def score(query: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        q = query.view(query.shape[0], parts, -1)
        cross = torch.einsum("ckd,td->ctk", q, target)  # each part against each target
        gram = torch.empty(*cross.shape[:2], parts + 1, parts + 1, dtype=query.dtype)
        gram[..., 0, 0] = (target * target).sum(1)
        gram[..., 0, 1:] = cross
        gram[..., 1:, 0] = cross
        gram[..., 1:, 1:] = (q @ q.transpose(1, 2))[:, None]
        return -torch.linalg.det(gram).clamp(min=0).sqrt()

    return score


def joint_positions(emb: Embedded, query: Sequence[str], target: str, rule: str = "sum", **kwargs) -> torch.Tensor:
    """Positions of each sample's `target` among all samples' targets, queried with its `query` modalities at once
    (one row per sample, `Embedded` of first views). `rule` scores a query against a target: `sum`, the sum of
    the parts' cosine similarities to it (what a pairwise model offers); `mip`, Symile's multilinear inner product
    sum_d x_d y_d t_d; `volume`, GRAM's minus the volume they span."""
    parts = [emb.features[m] for m in query]
    owner = emb.owner[target]
    similarity = None
    if rule == "sum":
        joint = torch.stack(parts).sum(0)
    elif rule == "mip":
        joint = torch.stack(parts).prod(0)
    elif rule == "volume":
        joint, similarity = torch.cat(parts, 1), volume_similarity(len(parts))
        kwargs["chunk_elements"] = kwargs.get("chunk_elements", CHUNK_ELEMENTS) // (len(parts) + 1) ** 2
    else:
        raise ValueError(f"joint query rule '{rule}': choose one of {JOINT_RULES}")
    return positive_positions(joint, owner, emb.features[target], owner, similarity=similarity, **kwargs)


def evaluate_joint_query(
    model: MultiTowerModel,
    sources: list[SourceConfig],
    query: Sequence[str],
    target: str,
    batch_size: int,
    rules: Sequence[str] = ("sum",),
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Retrieval of `target` by several modalities at once (image + audio -> text), on the samples that carry them
    all (their first caption), under each scoring rule of `rules` (see `joint_positions`)."""
    stats = SampleStats()
    emb = embed(model, sources, (*query, target), batch_size, device, dtype, num_workers, stats, False, progress)
    name = f"{'+'.join(query)}_to_{target}"
    metrics, chance = {}, chance_metrics(torch.ones(emb.n, dtype=torch.int64), emb.n, name)
    for rule in rules:
        metrics[rule] = metrics_from_positions(joint_positions(emb, query, target, rule), name)
    return {"metrics": metrics, "chance": chance, "n": emb.n, "data": stats.to_dict()}
