"""Zero-shot retrieval between two modalities of a model, on held-out shards.

    python -m tessera.eval.retrieval --model RUN_DIR/model --data "val-{000000..000003}.tar" \\
        --query text --target image --out results.json

Every view of a sample is scored: a sample whose json carries several `captions` contributes each caption as
a text query, with that sample as its one positive; in the other direction a query counts as a hit at k when
any of the sample's captions is in the top k (CLIP_benchmark's convention, also AudioCaps/Clotho's). Metrics,
in both directions, with open_clip's names: `{query}_to_{target}_R@{1,5,10}`, `..._mean_rank`,
`..._median_rank` (1-based rank of the best positive), `..._mAP@10` (average precision over every positive in
the top 10), each beside its chance level. Also, per pair, the representation diagnostics of the
contrastive-learning literature (see `diagnostics`). Similarities are computed in chunks of queries sized so
that a chunk's similarity matrix stays under ~256 MB: 100k x 100k items fit in bounded memory.

The JSON has CLIP_benchmark's shape and names (dataset, model, pretrained, task, language, metrics with
`image_retrieval_recall@k` = text-to-image R@k and `text_retrieval_recall@k` = image-to-text R@k), plus chance and
diagnostics; `--out DIR/` names it as CLIP_benchmark does. --out also writes R@K curves (K = 1..50) as
`<out>_recall.png` and a markdown summary `<out>.md` that links both. --data may be a CLIP_benchmark webdataset
(`nshards.txt`, `{i}.tar`, multi-line `.txt` captions): its test split is read.
Shape legend: Q query rows, T target rows, N samples, M positives per query, D embedding width.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tessera.data import SampleStats, SourceConfig, eval_batches, parse_sources, to_device
from tessera.models import MultiTowerModel, truncate_embeddings

from . import commands, common

log = logging.getLogger(__name__)
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
            model.transforms(False),
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


def benchmark_names(metrics: dict[str, float], ks=KS) -> dict[str, float]:
    """CLIP_benchmark's names of our recalls: `{target}_retrieval_recall@k` is `{query}_to_{target}_R@k` (for an
    image-text pair: image_retrieval_recall is text-to-image), for each direction whose target modality is the
    target of no other evaluated direction (where two are, the name would be ambiguous)."""
    directions = sorted({k.rsplit("_R@", 1)[0] for k in metrics if "_R@" in k})
    targets = Counter(d.split("_to_", 1)[1] for d in directions)
    return {
        f"{t}_retrieval_recall@{k}": metrics[f"{d}_R@{k}"]
        for d in directions
        if targets[t := d.split("_to_", 1)[1]] == 1
        for k in ks
    }


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


def evaluate_pairs(
    model: MultiTowerModel,
    sources: list[SourceConfig],
    pairs: Sequence[tuple[str, str]],
    batch_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
    progress: bool = False,
    skip_missing: bool = False,
    widths: Sequence[int] = (),
) -> dict[str, Any]:
    """Retrieval metrics, chance levels, diagnostics and R@K curves for each pair, and the eval data's counts. With
    `skip_missing`, a pair no sample carries is left out (listed under `skipped`) instead of an error; at least one
    pair must have samples. `widths`: also the metrics of the embeddings' first `w` features, renormalised, for each
    w (a Matryoshka model's prefixes; from the same embeddings), under `widths`."""
    result: dict[str, Any] = {"metrics": {}, "chance": {}, "diagnostics": {}, "curves": {}, "n": {}, "rows": {}}
    if widths:
        result["widths"] = {str(w): {} for w in widths}
    stats = SampleStats()
    skipped = []
    for a, b in pairs:
        try:
            emb = embed(model, sources, (a, b), batch_size, device, dtype, num_workers, stats, progress=progress)
        except common.NoSamples as exc:
            if not skip_missing or len(skipped) + 1 == len(pairs):
                raise
            log.warning("retrieval: %s; the pair %s-%s is left out", exc, a, b)
            skipped.append(f"{a}-{b}")
            continue
        metrics, chance, curves = retrieval_metrics(emb, a, b)
        for w in widths:
            prefix = Embedded({m: truncate_embeddings(f, w) for m, f in emb.features.items()}, emb.owner, emb.n)
            result["widths"][str(w)].update(retrieval_metrics(prefix, a, b)[0])
        result["metrics"].update(metrics)
        result["chance"].update(chance)
        result["curves"].update(curves)
        result["diagnostics"].update(diagnostics(emb, a, b))
        result["n"][f"{a}-{b}"] = emb.n
        result["rows"][f"{a}-{b}"] = {a: emb.features[a].shape[0], b: emb.features[b].shape[0]}
    result["metrics"].update(benchmark_names(result["metrics"]))
    result["chance"].update(benchmark_names(result["chance"]))
    result["data"] = stats.to_dict()
    if skipped:
        result["skipped"] = skipped
    return result


def summary_table(result: dict[str, Any], ks=KS) -> str:
    lines = [f"{'direction':<22}" + "".join(f"{'R@' + str(k):>9}" for k in ks) + f"{'mAP@10':>9}{'chance R@1':>12}"]
    directions = sorted({k.rsplit("_R@", 1)[0] for k in result["metrics"] if "_R@" in k})
    # the full width, then each Matryoshka prefix evaluated (`widths`)
    tables = [("", result["metrics"])] + [(f" @{w}", m) for w, m in result.get("widths", {}).items()]
    for suffix, metrics in tables:
        for d in (d for d in directions if f"{d}_mAP@10" in metrics):
            row = "".join(f"{100 * metrics[f'{d}_R@{k}']:>8.1f}%" for k in ks)
            chance = 100 * result["chance"][f"{d}_R@1"]
            lines.append(f"{d + suffix:<22}{row}{100 * metrics[f'{d}_mAP@10']:>8.1f}%{chance:>11.2f}%")
    return "\n".join(lines)


def write_report(doc: dict[str, Any], out: Path, extra: list[str] = ()) -> list[Path]:
    """JSON at `out`; R@K curves beside it as <stem>_recall.png; a markdown summary <stem>.md linking both
    (and ending with the `extra` markdown lines)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    png = out.with_name(out.stem + "_recall.png")
    _plot_curves(doc["curves"], doc["chance"], png)
    md = out.with_suffix(".md")
    lines = [
        f"# Zero-shot retrieval: {doc['model']}",
        "",
        f"Data: `{doc['dataset']}`; samples per pair: {doc['n']}; rows (captions included): {doc['rows']}.",
        "",
        "| direction | R@1 | R@5 | R@10 | mAP@10 | mean rank | median rank | chance R@1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    m, c = doc["metrics"], doc["chance"]
    for d in sorted(doc["curves"]):
        lines.append(
            f"| {d} | {m[d + '_R@1']:.1%} | {m[d + '_R@5']:.1%} | {m[d + '_R@10']:.1%} | "
            f"{m[d + '_mAP@10']:.1%} | {m[d + '_mean_rank']:.1f} | {m[d + '_median_rank']:.0f} | "
            f"{c[d + '_R@1']:.2%} |"
        )
    lines += ["", "| diagnostic | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(doc["diagnostics"].items())]
    lines += ["", f"Recall at K = 1..{CURVE_KS}: ![R@K]({png.name})", "", f"Every number: [{out.name}]({out.name})", ""]
    lines += list(extra)
    md.write_text("\n".join(lines))
    return [out, png, md]


def _plot_curves(curves: dict[str, list[float]], chance: dict[str, float], path: Path) -> None:
    fig = common.figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, ys in sorted(curves.items()):
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    ax.set_xlabel("K")
    ax.set_ylabel("R@K")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`tessera eval retrieval` with its command line read (`tessera.eval.commands`)."""
    if (args.query is None) != (args.target is None):
        parser.error("give both --query and --target, or neither (every pair the model was trained on)")
    model, device = common.load(args)
    if args.query is not None and "+" in args.query:
        return run_joint(args, parser, model, device)
    pairs = [(args.query, args.target)] if args.query else model.pairs
    for m in (m for pair in pairs for m in pair):
        if m not in model.modalities:
            parser.error(f"the model has no '{m}' tower (it has {model.modalities})")
    if args.query is not None and args.query == args.target:
        parser.error("--query and --target must be two different modalities")
    try:
        sources = parse_sources(args.data, "--data")
        # by default every pair the model was trained on, less those the data does not carry
        result = evaluate_pairs(
            model,
            sources,
            pairs,
            args.batch_size,
            device,
            None,
            args.workers,
            progress=True,
            skip_missing=args.query is None,
        )
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    doc = {**common.benchmark_fields(args.data, args.model, "zeroshot_retrieval"), **result}
    print(summary_table(result))
    if args.out:
        for path in write_report(doc, common.output_path(args.out, doc)):
            print(f"wrote {path}")
    return 0


def run_joint(args: argparse.Namespace, parser: argparse.ArgumentParser, model, device) -> int:
    """`--query image+audio --target text`: one query of several modalities, under each of `--rules`."""
    query = args.query.split("+")
    for m in (*query, args.target):
        if m not in model.modalities:
            parser.error(f"the model has no '{m}' tower (it has {model.modalities})")
    if len(set(query)) != len(query) or args.target in query:
        parser.error("a joint --query names each modality once, and not the --target")
    rules = args.rules.split(",")
    if any(r not in JOINT_RULES for r in rules):
        parser.error(f"--rules {args.rules}: choose from {','.join(JOINT_RULES)}")
    try:
        result = evaluate_joint_query(
            model,
            parse_sources(args.data, "--data"),
            query,
            args.target,
            args.batch_size,
            rules,
            device,
            num_workers=args.workers,
            progress=True,
        )
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    name = f"{args.query}_to_{args.target}"
    print(f"{name} ({result['n']} samples; chance R@1 {result['chance'][f'{name}_R@1']:.2%})")
    print("| rule | R@1 | R@5 | R@10 |\n|---|---|---|---|")
    for rule, m in result["metrics"].items():
        print(f"| {rule} | {m[f'{name}_R@1']:.2%} | {m[f'{name}_R@5']:.2%} | {m[f'{name}_R@10']:.2%} |")
    if args.out:
        doc = {**common.benchmark_fields(args.data, args.model, "zeroshot_retrieval"), "query": query, **result}
        path = common.output_path(args.out, doc)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(*commands.parse("retrieval", argv))


if __name__ == "__main__":
    sys.exit(main())
