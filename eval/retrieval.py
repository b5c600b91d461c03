"""Zero-shot retrieval between two modalities of a model, on held-out shards.

    python -m eval.retrieval --model RUN_DIR/model --data "val-{000000..000003}.tar" \\
        --query text --target image --out results.json

Sample i's `query` is the positive of sample i's `target`. Metrics follow open_clip's names, in both
directions: `{query}_to_{target}_R@{1,5,10}`, `..._mean_rank`, `..._median_rank` (1-based ranks), each
with its chance level. Similarities are computed in chunks of queries, so memory stays bounded.
Shape legend: Q queries, T targets, D embedding width.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from data import SampleStats, SourceConfig, eval_batches, to_device
from data.config import parse_sources
from models import MultiTowerModel

KS = (1, 5, 10)


@torch.no_grad()
def embed(model: MultiTowerModel, sources: list[SourceConfig], modalities: Sequence[str], batch_size: int,
          device: torch.device | str = "cpu", dtype: torch.dtype | None = None, num_workers: int = 0,
          stats: SampleStats | None = None) -> dict[str, torch.Tensor]:
    """Normalised fp32 embeddings (N, D) per modality, in shard order; samples lacking one are skipped."""
    was_training = model.training
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    try:
        for batch in eval_batches(sources, model.transforms(False), model.collators(), list(modalities),
                                  batch_size, num_workers, stats):
            batch = to_device(batch, device, dtype)
            for m in modalities:
                chunks[m].append(model.encode(m, batch[m]).float().cpu())
    finally:
        model.train(was_training)
    if not chunks[modalities[0]]:
        raise ValueError(f"no sample in {[s.shards for s in sources]} carries all of {list(modalities)}")
    return {m: torch.cat(c) for m, c in chunks.items()}


def positive_ranks(query_QD: torch.Tensor, target_TD: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """1-based rank of target i among all targets for query i; ties go to the lower index (as topk)."""
    ranks = []
    for start in range(0, query_QD.shape[0], chunk):
        q_CD = query_QD[start:start + chunk]
        sims_CT = q_CD @ target_TD.T
        idx = torch.arange(start, start + q_CD.shape[0])
        pos_C1 = sims_CT[torch.arange(q_CD.shape[0]), idx].unsqueeze(1)
        cols = torch.arange(target_TD.shape[0]).unsqueeze(0)
        better = (sims_CT > pos_C1) | ((sims_CT == pos_C1) & (cols < idx.unsqueeze(1)))
        ranks.append(better.sum(1) + 1)
    return torch.cat(ranks)


def retrieval_metrics(a_ND: torch.Tensor, b_ND: torch.Tensor, a: str, b: str, ks=KS) -> dict[str, float]:
    out: dict[str, float] = {}
    for q, t, qn, tn in ((a_ND, b_ND, a, b), (b_ND, a_ND, b, a)):
        ranks = positive_ranks(q, t).float()
        for k in ks:
            out[f"{qn}_to_{tn}_R@{k}"] = (ranks <= k).float().mean().item()
        out[f"{qn}_to_{tn}_mean_rank"] = ranks.mean().item()
        # open_clip's convention: floor of the (interpolated) median of 0-based ranks, plus one
        out[f"{qn}_to_{tn}_median_rank"] = float(math.floor(torch.quantile(ranks - 1, 0.5).item()) + 1)
    return out


def chance_metrics(n: int, a: str, b: str, ks=KS) -> dict[str, float]:
    out: dict[str, float] = {}
    for qn, tn in ((a, b), (b, a)):
        for k in ks:
            out[f"{qn}_to_{tn}_R@{k}"] = min(k, n) / n
        out[f"{qn}_to_{tn}_mean_rank"] = (n + 1) / 2
        out[f"{qn}_to_{tn}_median_rank"] = (n + 1) / 2
    return out


def evaluate_pairs(model: MultiTowerModel, sources: list[SourceConfig], pairs: Sequence[tuple[str, str]],
                   batch_size: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                   num_workers: int = 0) -> dict[str, Any]:
    """Retrieval metrics for each pair, plus chance levels and the bad-sample counts of the eval data."""
    metrics: dict[str, float] = {}
    chance: dict[str, float] = {}
    counts: dict[str, int] = {}
    stats = SampleStats()
    for a, b in pairs:
        emb = embed(model, sources, (a, b), batch_size, device, dtype, num_workers, stats)
        n = emb[a].shape[0]
        metrics.update(retrieval_metrics(emb[a], emb[b], a, b))
        chance.update(chance_metrics(n, a, b))
        counts[f"{a}-{b}"] = n
    return {"metrics": metrics, "chance": chance, "n": counts, "data": stats.to_dict()}


def summary_table(result: dict[str, Any], ks=KS) -> str:
    lines = [f"{'direction':<22}" + "".join(f"{'R@' + str(k):>9}" for k in ks) + f"{'chance R@1':>12}"]
    directions = sorted({k.rsplit("_R@", 1)[0] for k in result["metrics"] if "_R@" in k})
    for d in directions:
        row = "".join(f"{100 * result['metrics'][f'{d}_R@{k}']:>8.1f}%" for k in ks)
        lines.append(f"{d:<22}{row}{100 * result['chance'][f'{d}_R@1']:>11.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.retrieval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported model directory (RUN_DIR/model)")
    parser.add_argument("--data", required=True, nargs="+", help="held-out shard spec(s)")
    parser.add_argument("--query", default="text")
    parser.add_argument("--target", default="image")
    parser.add_argument("--out", type=Path, help="write the result JSON here")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)

    from models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device=device)
    for m in (args.query, args.target):
        if m not in model.modalities:
            parser.error(f"the model has no '{m}' tower (it has {model.modalities})")
    result = evaluate_pairs(model, parse_sources(args.data, "--data"), [(args.query, args.target)], args.batch_size,
                            device, None, args.workers)
    doc = {"dataset": " ".join(args.data), "model": str(args.model), "task": "retrieval", **result}
    print(summary_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
