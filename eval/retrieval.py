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
The ranking and its metrics are `ranking`'s; queries of several modalities at once are `joint`'s.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tessera.data import SampleStats, SourceConfig, parse_sources
from tessera.models import MultiTowerModel, truncate_embeddings

from . import commands, common
from .joint import JOINT_RULES, evaluate_joint_query
from .ranking import CURVE_KS, KS, Embedded, diagnostics, embed, retrieval_metrics

log = logging.getLogger(__name__)


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
    common.write_json(out, doc)
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
        print(f"wrote {common.write_json(common.output_path(args.out, doc), doc)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(*commands.parse("retrieval", argv))


if __name__ == "__main__":
    sys.exit(main())
