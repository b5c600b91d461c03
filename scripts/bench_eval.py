"""Retrieval metrics over N x N items: Tessera's chunked computation vs the naive full matrix, side by side.

The naive one is what open_clip_train's `get_clip_metrics` does: the whole N x N similarity matrix, argsort
of every row, the positive's position read off. Tessera's `tessera.eval.retrieval` computes a chunk of query rows at
a time (at most 2^26 similarities) and counts, per positive, the targets that beat it: no sort, no N x N.
Both compute R@1/5/10, mean and median rank in both directions on the same embeddings (D = 512, each text
a noisy copy of its image), and their metrics are checked equal. Every configuration runs in a fresh
subprocess; peak memory is the peak resident set above the embeddings'. Naive runs are skipped where the
matrix and its argsort (12 bytes per pair) would not fit in memory.

    python scripts/bench_eval.py                       # N = 10k, 20k, 40k, 100k
    python scripts/bench_eval.py --sizes 5000,20000

Writes runs/bench_eval/results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchlib import meminfo_gib, reset_peak, status_kib

ROOT = Path(__file__).resolve().parents[1]
NAIVE_BYTES_PER_PAIR = 12  # fp32 similarities + int64 argsort


def one(impl: str, n: int, dim: int) -> dict:
    import math

    import torch
    import torch.nn.functional as F

    from tessera.eval.ranking import metrics_from_positions, positive_positions

    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    text = F.normalize(image + 1.5 * torch.randn(n, dim, generator=g), dim=-1)
    ids = torch.arange(n)
    before = reset_peak()
    t0 = time.perf_counter()
    metrics = {}
    if impl == "naive":
        logits = image @ text.T
        for name, lg in (("image_to_text", logits), ("text_to_image", logits.T)):
            ranking = torch.argsort(lg, dim=1, descending=True, stable=True)
            preds = torch.where(ranking == ids[:, None])[1].float()
            for k in (1, 5, 10):
                metrics[f"{name}_R@{k}"] = (preds < k).float().mean().item()
            metrics[f"{name}_mean_rank"] = preds.mean().item() + 1
            metrics[f"{name}_median_rank"] = math.floor(torch.quantile(preds, 0.5).item()) + 1
            del ranking
    else:
        for name, q, t in (("image_to_text", image, text), ("text_to_image", text, image)):
            pos = positive_positions(q, ids, t, ids)
            m = metrics_from_positions(pos, name)
            metrics.update({k: v for k, v in m.items() if "mAP" not in k})
    seconds = time.perf_counter() - t0
    return {
        "impl": impl,
        "N": n,
        "D": dim,
        "seconds": seconds,
        "peak_mib": (status_kib("VmHWM") - before) / 1024,
        "metrics": metrics,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,20000,40000,100000")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_eval"))
    p.add_argument("--one", choices=["naive", "tessera"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.one:
        print(json.dumps(one(args.one, sizes[0], args.dim)))
        return
    budget = 0.85 * meminfo_gib("MemAvailable")
    rows = []
    for n in sizes:
        for impl in ("naive", "tessera"):
            need = NAIVE_BYTES_PER_PAIR * n * n / 2**30
            if impl == "naive" and need > budget:
                row = {"impl": impl, "N": n, "skipped": f"needs about {need:.0f} GiB, {budget:.0f} GiB available"}
            else:
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", impl, "--sizes", str(n), "--dim", str(args.dim)],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
                why = (
                    "killed: out of memory"
                    if proc.returncode == -9
                    else f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
                )
                row = (
                    json.loads(proc.stdout.strip().splitlines()[-1])
                    if proc.returncode == 0
                    else {"impl": impl, "N": n, "skipped": why}
                )
            rows.append(row)
            print(
                row["impl"],
                n,
                row.get("skipped") or f"{row['seconds']:.2f} s, peak {row['peak_mib']:.0f} MiB",
                flush=True,
            )
    by = {(r["impl"], r["N"]): r for r in rows}
    lines = [
        "| N | naive time | Tessera time | time ratio | naive peak | Tessera peak | memory ratio | same metrics |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        a, b = by[("naive", n)], by[("tessera", n)]
        if "skipped" in a or "skipped" in b:

            def cell(r, key, fmt):
                return "skipped" if "skipped" in r else fmt.format(r[key])

            lines.append(
                f"| {n} | {cell(a, 'seconds', '{:.2f} s')} | {cell(b, 'seconds', '{:.2f} s')} | - | "
                f"{cell(a, 'peak_mib', '{:.0f} MiB')} | {cell(b, 'peak_mib', '{:.0f} MiB')} | - | - |"
            )
            continue
        same = all(
            abs(a["metrics"][k] - b["metrics"][k]) <= 1e-5 * max(1.0, abs(a["metrics"][k])) for k in a["metrics"]
        )
        lines.append(
            f"| {n} | {a['seconds']:.2f} s | {b['seconds']:.2f} s | {b['seconds'] / a['seconds']:.2f}x | "
            f"{a['peak_mib']:.0f} MiB | {b['peak_mib']:.0f} MiB | 1/{a['peak_mib'] / b['peak_mib']:.0f} | "
            f"{'yes' if same else 'NO'} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    (out / "table.md").write_text(table + "\n")
    print(f"\nwrote {out}/results.json and table.md")


if __name__ == "__main__":
    main()
