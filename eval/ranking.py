"""Ranking and its metrics, shared by every retrieval evaluation: embedding held-out samples (every view of each),
the position of each query's positives among all targets (in bounded memory), recall at k, mAP@10, rank statistics,
their chance levels, and the representation diagnostics of the contrastive-learning literature.

Shape legend: Q query rows, T target rows, N samples, M positives per query, D embedding width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tessera.data import SampleStats, SourceConfig, eval_batches, to_device
from tessera.models import MultiTowerModel

from . import common

KS = (1, 5, 10)
CURVE_KS = 50
CHUNK_ELEMENTS = 2**26  # similarities per chunk (256 MB in fp32)


@dataclass
class Embedded:
    """Normalised fp32 rows per modality; the rows of one sample are contiguous, samples in shard order."""

    features: dict[str, torch.Tensor]  # modality -> (V, D)
    owner: dict[str, torch.Tensor]  # modality -> (V,) index of the sample each row belongs to
    n: int  # samples

    def first_rows(self, modality: str) -> torch.Tensor:
        """One row per sample: its first view."""
        owner = self.owner[modality]
        first = torch.ones_like(owner, dtype=torch.bool)
        first[1:] = owner[1:] != owner[:-1]
        return self.features[modality][first]


@torch.no_grad()
def embed(
    model: MultiTowerModel,
    sources: list[SourceConfig],
    modalities: Sequence[str],
    batch_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
    stats: SampleStats | None = None,
    all_views: bool = True,
    progress: bool = False,
) -> Embedded:
    """Embeddings of every sample that carries all of `modalities` (and, with `all_views`, of every caption)."""
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    owners: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    n = 0
    with common.eval_mode(model):
        batches = eval_batches(
            common.sources_with(sources, modalities),
            model.transforms(False, compact=True),
            model.collators(),
            list(modalities),
            batch_size,
            num_workers,
            stats,
            all_views=all_views,
        )
        for batch in tqdm(batches, desc="embedding", unit="batch", disable=not progress, mininterval=5):
            views = batch.pop("__views__", None)
            batch = to_device(batch, device, dtype)
            size = len(batch["__key__"])
            for m in modalities:
                chunks[m].append(model.encode(m, batch[m]).float().cpu())
                counts = torch.tensor(views[m]) if views is not None else torch.ones(size, dtype=torch.int64)
                owners[m].append(torch.repeat_interleave(torch.arange(n, n + size), counts))
            n += size
    if n == 0:
        raise common.NoSamples(f"no sample in {[s.shards for s in sources]} carries all of {list(modalities)}")
    return Embedded({m: torch.cat(c) for m, c in chunks.items()}, {m: torch.cat(o) for m, o in owners.items()}, n)


def positive_positions(
    query_QD: torch.Tensor,
    query_owner: torch.Tensor,
    target_TD: torch.Tensor,
    target_owner: torch.Tensor,
    chunk_elements: int = CHUNK_ELEMENTS,
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(Q, M) 1-based positions of each query's positives in its ranking of all targets, ascending, +inf where a
    query has fewer than M. A positive is a target with the query's owner. Ties go to the lower target index
    (as a stable sort). `target_owner` must be non-decreasing (rows of one sample contiguous). `similarity(queries,
    targets)` scores a chunk of query rows against every target (default: their dot products)."""
    if target_owner.numel() and not bool((target_owner[1:] >= target_owner[:-1]).all()):
        raise ValueError("target rows must be grouped by sample (owner non-decreasing)")
    n_owners = int(max(query_owner.max(), target_owner.max())) + 1
    count = torch.bincount(target_owner, minlength=n_owners)
    start = torch.cumsum(count, 0) - count
    M = int(count[query_owner].max()) if query_owner.numel() else 0
    T = target_TD.shape[0]
    chunk = max(1, chunk_elements // max(T, 1))
    cols = torch.arange(T)
    out = torch.full((query_QD.shape[0], max(M, 1)), math.inf)
    for lo in range(0, query_QD.shape[0], chunk):
        chunk_CD = query_QD[lo : lo + chunk]
        sims_CT = chunk_CD @ target_TD.T if similarity is None else similarity(chunk_CD, target_TD)
        rows = torch.arange(sims_CT.shape[0])
        own = query_owner[lo : lo + chunk]
        for j in range(M):  # the j-th positive of every query in the chunk
            valid = count[own] > j
            t = (start[own] + j).clamp(max=T - 1)
            s = sims_CT[rows, t].unsqueeze(1)
            better = torch.count_nonzero(sims_CT > s, dim=1)
            # exact ties (rare in fp32) go to the lower index: only rows with one pay for the second look
            tied = (torch.count_nonzero(sims_CT == s, dim=1) > 1).nonzero().squeeze(1)
            if tied.numel():
                better[tied] += torch.count_nonzero((sims_CT[tied] == s[tied]) & (cols < t[tied, None]), dim=1)
            out[lo : lo + chunk, j] = torch.where(valid, (better + 1).float(), math.inf)
    return out.sort(dim=1).values


def metrics_from_positions(pos_QM: torch.Tensor, name: str, ks=KS) -> dict[str, float]:
    best = pos_QM[:, 0]
    out = {f"{name}_R@{k}": (best <= k).float().mean().item() for k in ks}
    out[f"{name}_mean_rank"] = best.mean().item()
    # open_clip's convention: floor of the (interpolated) median of 0-based ranks, plus one
    out[f"{name}_median_rank"] = float(math.floor(torch.quantile(best - 1, 0.5).item()) + 1)
    out[f"{name}_mAP@10"] = average_precision_at(pos_QM, 10).mean().item()
    return out


def average_precision_at(pos_QM: torch.Tensor, k: int) -> torch.Tensor:
    """Per query: sum over its positives ranked in the top k of (positives so far / position), over min(M, k)."""
    m = torch.isfinite(pos_QM).sum(1).clamp(min=1)
    hits = torch.arange(1, pos_QM.shape[1] + 1, dtype=pos_QM.dtype).expand_as(pos_QM)
    precision = torch.where(pos_QM <= k, hits / pos_QM, 0.0)
    return precision.sum(1) / m.clamp(max=k)


def recall_curve(pos_QM: torch.Tensor, kmax: int = CURVE_KS) -> list[float]:
    best = pos_QM[:, 0]
    return [(best <= k).float().mean().item() for k in range(1, kmax + 1)]


def chance_metrics(positives: torch.Tensor, targets: int, name: str, ks=KS) -> dict[str, float]:
    """Expected metrics of a random ranking, for queries with `positives[q]` positives among `targets` rows."""
    out: dict[str, float] = {}
    m, T = positives.double(), float(targets)
    T_ = torch.tensor(T, dtype=torch.float64)

    def log_comb(n, r):
        return torch.lgamma(n + 1) - torch.lgamma(r + 1) - torch.lgamma(n - r + 1)

    for k in ks:  # P(no positive in the top k) = C(T - m, k) / C(T, k)
        kk = torch.full_like(m, float(min(k, targets)))
        miss = torch.where(T - m >= kk, torch.exp(log_comb(T - m, kk) - log_comb(T_, kk)), 0.0)
        out[f"{name}_R@{k}"] = (1 - miss).mean().item()
    out[f"{name}_mean_rank"] = ((T + 1) / (m + 1)).mean().item()  # expected best position
    medians = {}
    for mv in m.unique().tolist():  # smallest r with P(best <= r) >= 1/2; P(best > r) = C(T - r, m) / C(T, m)
        r = torch.arange(1, targets + 1, dtype=torch.float64)
        mv_ = torch.tensor(mv, dtype=torch.float64)
        above = torch.where(T - r >= mv, torch.exp(log_comb(T - r, mv_) - log_comb(T_, mv_)), 0.0)
        medians[mv] = float(r[(1 - above) >= 0.5 - 1e-9][0])
    out[f"{name}_median_rank"] = sum(medians[v] for v in m.tolist()) / len(m)
    # E[AP@10]: position r holds a positive with prob m/T, and then the top r-1 hold (r-1)(m-1)/(T-1) more
    r = torch.arange(1, min(10, targets) + 1, dtype=torch.float64)
    extra = torch.outer(m - 1, r - 1) / (T - 1) if targets > 1 else torch.zeros(len(m), len(r), dtype=torch.float64)
    ap = ((m[:, None] / (T * r)) * (1 + extra)).sum(1) / m.clamp(max=10)
    out[f"{name}_mAP@10"] = ap.mean().item()
    return out


def diagnostics(emb: Embedded, a: str, b: str, max_uniformity: int = 4096, seed: int = 0) -> dict[str, float]:
    """For the pair (a, b), on each sample's first view:
    - alignment: mean squared distance between positives, E||f(x) - g(y)||^2 (Wang & Isola 2020, alpha = 2);
    - uniformity of each modality: log E exp(-2 ||f(x) - f(x')||^2) over distinct samples (t = 2), on at most
      `max_uniformity` samples drawn with a fixed seed;
    - modality gap: distance between the two modalities' centroids (Liang et al. 2022);
    - mean cosine of positive pairs and of negative pairs (all i != j, from the feature sums: no N x N)."""
    x, y = emb.first_rows(a), emb.first_rows(b)
    n = x.shape[0]
    pos = (x * y).sum(1)
    out = {
        f"{a}-{b}_alignment": (x - y).pow(2).sum(1).mean().item(),
        f"{a}-{b}_modality_gap": (x.mean(0) - y.mean(0)).norm().item(),
        f"{a}-{b}_positive_cosine": pos.mean().item(),
        f"{a}-{b}_negative_cosine": ((x.sum(0) @ y.sum(0) - pos.sum()) / max(n * (n - 1), 1)).item(),
    }
    g = torch.Generator().manual_seed(seed)
    for name, f in ((a, x), (b, y)):
        if n > max_uniformity:
            f = f[torch.randperm(n, generator=g)[:max_uniformity]]
        if f.shape[0] < 2:
            continue
        sq = (2 - 2 * f @ f.T).clamp(min=0)
        off = ~torch.eye(f.shape[0], dtype=torch.bool)
        out[f"{a}-{b}_uniformity_{name}"] = torch.logsumexp(-2 * sq[off], 0).item() - math.log(off.sum().item())
    return out


def retrieval_metrics(emb: Embedded, a: str, b: str, ks=KS) -> tuple[dict, dict, dict]:
    """Metrics, chance levels and R@K curves of both directions between modalities a and b."""
    metrics, chance, curves = {}, {}, {}
    for q, t in ((a, b), (b, a)):
        name = f"{q}_to_{t}"
        pos = positive_positions(emb.features[q], emb.owner[q], emb.features[t], emb.owner[t])
        metrics.update(metrics_from_positions(pos, name, ks))
        per_owner = torch.bincount(emb.owner[t], minlength=emb.n)
        chance.update(chance_metrics(per_owner[emb.owner[q]], emb.features[t].shape[0], name, ks))
        curves[name] = recall_curve(pos)
    return metrics, chance, curves
