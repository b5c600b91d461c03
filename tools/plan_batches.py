"""Plan hard-negative batches for a run (B3, 2025): index the shards, embed every sample with a previous model, link
each sample to its nearest neighbours, cut that graph into communities, and write the plan for `data.batch_plan`.

    tessera plan-batches --model runs/teacher/model --data "shards/train-{000..099}.tar" --batch-size 1024 \\
        --out runs/plan.json
    tessera pretrain --config RECIPE data.batch_plan=runs/plan.json data.batch_plan_random=0.2

A sample's embedding is the normalised sum of its modalities' normalised embeddings (--modalities, by default every
tower the shards carry), so its neighbours are similar on every side of the pair. Each sample links to its
neighbours ranked skip+1 .. skip+k by cosine similarity (--skip-nearest leaves out the closest, which are the likely
near-duplicates and false negatives). The graph is cut into communities of batch_size / per_batch samples by greedy
graph growing: each community starts next to the last full one (at a random unassigned sample where none is left
there) and fills as a breadth-first ball over unassigned samples (B3 cuts with METIS, whose multilevel refinement
this leaves out). --max-similarity keeps near-copies of a member out of a community. A run then fills each global
batch from `--per-batch` communities. The shards must be local and uncompressed: the run reads samples by offset.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tessera.config import ConfigError, UserError
from tessera.data import SampleStats, ShardError, decoders, expand_shards, to_device
from tessera.data.pipeline import Source, StreamSpec, seeded_rng
from tessera.data.plan import BatchPlan, PlannedStream, index_shards
from tessera.durable import atomic_write_bytes
from tessera.eval import common

log = logging.getLogger(__name__)
KNN_ROWS = 1024  # query rows per similarity block of the k-NN search


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tessera plan-batches", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="exported model directory of a previous run (RUN_DIR/model)")
    p.add_argument(
        "--data", required=True, action="append", help="training shards (a brace pattern; repeat for more sources)"
    )
    p.add_argument("--out", required=True, type=Path, help="the plan file to write (JSON)")
    p.add_argument("--batch-size", type=int, default=256, help="the global batch (all ranks) the plan is for")
    p.add_argument("--per-batch", type=int, default=4, help="communities per batch")
    p.add_argument("--neighbors", type=int, default=10, help="k of the k-NN graph")
    p.add_argument("--skip-nearest", type=int, default=0, help="nearest neighbours left out of the graph")
    p.add_argument(
        "--max-similarity",
        type=float,
        default=1.0,
        help="leave a sample out of a community where its cosine similarity to a member passes this (near-duplicates "
        "are false negatives); 1: off",
    )
    p.add_argument("--modalities", default=None, help="comma-separated towers to embed (default: all the shards have)")
    p.add_argument("--seed", type=int, default=0, help="seed of the communities' growth")
    p.add_argument("--embed-batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="loader workers for embedding")
    args = p.parse_args(argv)
    for name in ("batch_size", "per_batch", "neighbors", "embed_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.skip_nearest < 0 or args.workers < 0:
        p.error("--skip-nearest and --workers must be >= 0")
    if not 0 < args.max_similarity <= 1:
        p.error("--max-similarity must be in (0, 1]")
    if args.batch_size < args.per_batch:
        p.error("--batch-size must be at least --per-batch (each community holds batch_size / per_batch samples)")
    return args


@torch.no_grad()
def embed_index(model, index, modalities: Sequence[str], batch_size: int, workers: int, device, stats: SampleStats):
    """(rows, embeddings): the normalised sum of each sample's modalities' embeddings, for the rows that decoded."""
    spec = StreamSpec(
        sources=[Source("plan", index.shards, 1.0, list(modalities))],
        decoders=decoders(sorted(modalities)),
        transforms=model.transforms(False),
        collators=model.collators(),
        batch_size=batch_size,
        train=False,
        drop_last=False,
        extra_keys=["__row__"],
    )
    stream = PlannedStream(spec, index, lambda epoch: range(len(index)), [0] * len(index.shards))
    rows, chunks = [], []
    with common.eval_mode(model):
        for item in DataLoader(stream, batch_size=None, num_workers=min(workers, max(1, len(index) // batch_size))):
            stats.merge(item.pop("_stats"))
            if item.pop("_heartbeat", False) or item.pop("_end", False):
                continue
            batch = to_device(item, device)
            joint = sum(model.encode(m, batch[m]).float() for m in modalities)
            chunks.append(torch.nn.functional.normalize(joint, dim=-1).cpu())
            rows.extend(item["__row__"])
    if not rows:
        raise ShardError(f"no sample of the shards decodes with all of {list(modalities)}: {stats.summary()}")
    return rows, torch.cat(chunks)


def nearest_neighbors(emb: torch.Tensor, k: int, skip: int = 0) -> torch.Tensor:
    """(n, k) indices of each row's neighbours ranked skip+1 .. skip+k by cosine similarity (rows normalised), itself
    excluded; exact, in blocks of rows."""
    n = emb.shape[0]
    k = min(k, n - 1 - skip)
    if k < 1:
        raise ShardError(f"{n} samples leave no neighbour to link after skipping the nearest {skip}")
    out = []
    for start in range(0, n, KNN_ROWS):
        sims = emb[start : start + KNN_ROWS] @ emb.T
        own = torch.arange(start, start + sims.shape[0])
        sims[own - start, own] = float("-inf")
        out.append(sims.topk(skip + k, dim=1).indices[:, skip:])
    return torch.cat(out)


def grow_communities(
    neighbors: torch.Tensor, size: int, seed: int, emb: torch.Tensor | None = None, max_similarity: float = 1.0
) -> tuple[list[list[int]], int]:
    """Cut the (symmetrised) k-NN graph into communities of `size` nodes (the last may be smaller): each community
    starts next to the last full one (or, where none is left there, at a node drawn from `seed`), and a
    breadth-first ball over unassigned nodes fills it; a ball that runs out of reachable nodes leaves the rest of the
    community to the next start.

    With `emb` (normalised rows) and `max_similarity` below 1, a node whose cosine similarity to a member passes it
    is left for another community: near-duplicates are false negatives, not hard ones. What no community took that
    way is packed last; their number is returned with the communities."""
    n = neighbors.shape[0]
    adjacent: list[list[int]] = [[] for _ in range(n)]
    for i, row in enumerate(neighbors.tolist()):
        for j in row:
            adjacent[i].append(j)
            adjacent[j].append(i)
    order = list(range(n))
    seeded_rng(seed, "communities").shuffle(order)
    starts = iter(order)
    assigned = bytearray(n)
    frontier: deque[int] = deque()  # next to the last full community: the next one grows from there
    out: list[list[int]] = []
    current: list[int] = []
    guard = emb is not None and max_similarity < 1.0
    members = emb.new_empty((size, emb.shape[1])) if guard else None

    def next_start() -> int | None:
        while frontier:
            node = frontier.popleft()
            if not assigned[node]:
                return node
        return next((node for node in starts if not assigned[node]), None)

    def add(node: int) -> None:
        nonlocal current
        if guard:
            members[len(current)] = emb[node]
        current.append(node)
        if len(current) == size:
            out.append(current)
            current = []

    while (start := next_start()) is not None:
        queue = deque([start])
        assigned[start] = 1
        while queue:
            node = queue.popleft()
            if guard and current and float((members[: len(current)] @ emb[node]).max()) > max_similarity:
                assigned[node] = 0  # too like a member: left for another community
                continue
            add(node)
            if not current:  # that one was full
                for left in queue:  # queued for it: free for the next one
                    assigned[left] = 0
                frontier = queue
                break
            for j in adjacent[node]:
                if not assigned[j]:
                    assigned[j] = 1
                    queue.append(j)
    left_over = [node for node in range(n) if not assigned[node]]
    for node in left_over:  # what the guard turned away everywhere: packed last, unguarded
        add(node)
    if current:
        out.append(current)
    return out, len(left_over)


def cohesion(emb: torch.Tensor, groups: Sequence[Sequence[int]]) -> float:
    """The mean cosine similarity of two different samples of one group."""
    total, pairs = 0.0, 0
    for g in groups:
        if len(g) > 1:
            x = emb[list(g)]
            s = x.sum(0)
            total += float(s @ s) - float((x * x).sum())
            pairs += len(g) * (len(g) - 1)
    return total / max(pairs, 1)


def make_plan(args: argparse.Namespace) -> dict:
    t0 = time.time()
    model, device = common.load(args)
    urls = [u for spec in args.data for u in expand_shards(spec)]
    stats = SampleStats()
    index = index_shards(urls, stats)
    modalities = args.modalities.split(",") if args.modalities else None
    if modalities is None:
        present = {s for m in index.members for s in m}
        modalities = [m for m in model.modalities if decoders([m])[m].present(dict.fromkeys(present))]
    unknown = [m for m in modalities if m not in model.modalities]
    if unknown or not modalities:
        raise ConfigError(f"--modalities {modalities}: the model has towers {model.modalities}")
    log.info("indexed %d samples in %d shards; embedding %s", len(index), len(urls), "+".join(modalities))
    rows, emb = embed_index(model, index, modalities, args.embed_batch_size, args.workers, device, stats)
    neighbors = nearest_neighbors(emb, args.neighbors, args.skip_nearest)
    size = max(1, args.batch_size // args.per_batch)
    communities, left_over = grow_communities(neighbors, size, args.seed, emb, args.max_similarity)
    shuffled = list(range(len(rows)))
    seeded_rng(args.seed, "random-groups").shuffle(shuffled)
    summary = {
        "samples": len(rows),
        "indexed": len(index),
        "communities": len(communities),
        "community_size": size,
        "packed_last": left_over,
        "cohesion": cohesion(emb, communities),
        "random_cohesion": cohesion(emb, [shuffled[i : i + size] for i in range(0, len(rows), size)]),
        "seconds": round(time.time() - t0, 1),
        "skipped": dict(stats.skipped),
    }
    plan = BatchPlan(
        index.subset(rows),  # the samples that embedded; rows renumbered 0..n-1 in that order
        [[int(r) for r in c] for c in communities],
        {
            "model": str(Path(args.model).resolve()),
            "modalities": modalities,
            "batch_size": args.batch_size,
            "per_batch": args.per_batch,
            "neighbors": args.neighbors,
            "skip_nearest": args.skip_nearest,
            "max_similarity": args.max_similarity,
            "seed": args.seed,
            "summary": summary,
        },
    )
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, json.dumps(plan.to_json(), separators=(",", ":")).encode())
    except OSError as exc:  # a full disk, a read-only folder: nothing partial is left
        raise ConfigError(f"cannot write the plan {args.out}: {exc}") from None
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = make_plan(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(
        f"plan: {args.out}: {summary['samples']} samples in {summary['communities']} communities of "
        f"{summary['community_size']}; mean cosine of two samples of a community {summary['cohesion']:.3f} "
        f"(of a random group {summary['random_cohesion']:.3f})"
    )
    if summary["skipped"]:
        print(f"left out (did not decode): {summary['skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
