"""Few-shot adaptation of the demo model: zero-shot vs linear probe vs LoRA vs CoOp prompt tuning, at k shots per class.

Every method sees the same k pictures per shape (drawn by `fewshot.seed` from the demo's `cls`-labelled training
shards) and is scored on the same held-out split (runs/demo/data/val-000000.tar, 480 pictures, 6 shapes):
- zero-shot: open_clip's classifier (mean of the templates' text embeddings) over the base model, no training;
- linear probe: logistic regression on the base's frozen image embeddings of the shots (`tessera.eval.linear_probe`, the
  CLIP paper's baseline; its L2 penalty picked on a fifth of the shots where there are five or more);
- LoRA: `configs/finetune-fewshot-demo.yaml` (rank 16 on both towers, cross-entropy against the class prompts);
- CoOp: `configs/finetune-coop-demo.yaml` (4 shared context vectors in the class prompts; nothing else trains).
The fine-tuning runs are `python -m tessera.train.finetune` subprocesses with the recipes as shipped (fewshot.k and
fewshot.seed overridden). Besides accuracy: trainable parameters, adapter file size, and held-out text->image R@1
after fine-tuning (what the adapter costs the model's retrieval).

    bash scripts/demo.sh                                   # writes runs/demo/model and runs/demo/data
    python scripts/bench_adapters.py                       # k = 1, 4, 16; seeds 0, 1
    python scripts/bench_adapters.py --shots 4 --seeds 0

Writes runs/bench_adapters/{results.json,table.md,fewshot.png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {"lora": "configs/finetune-fewshot-demo.yaml", "coop": "configs/finetune-coop-demo.yaml"}


def tensor_elements(adapter_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in adapter_dir.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def finetune(method: str, base: Path, k: int, seed: int, out: Path, log: Path) -> dict:
    args = [
        sys.executable,
        "-m",
        "tessera.train.finetune",
        "--config",
        METHODS[method],
        f"base={base}",
        f"output_dir={out}",
        f"fewshot.k={k}",
        f"fewshot.seed={seed}",
        "adapter.export_merged=false",
        "train.ckpt_every=-1",
    ]
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ}).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(args)} failed (rc {rc}); see {log}")
    seconds = time.perf_counter() - start
    zs = json.loads((out / "eval" / "zeroshot_image.json").read_text())
    retrieval = json.loads((out / "eval" / "retrieval.json").read_text())["metrics"]
    adapter = out / "adapter"
    files = [p for p in adapter.rglob("*") if p.is_file()]
    return {
        "acc1": zs["metrics"]["acc1"],
        "mean_per_class_recall": zs["metrics"]["mean_per_class_recall"],
        "text_to_image_R@1": retrieval["text_to_image_R@1"],
        "trainable": tensor_elements(adapter),
        "adapter_bytes": sum(p.stat().st_size for p in files),
        "seconds": seconds,
        "shots": str(out / "fewshot" / "shots-000000.tar"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=ROOT / "runs/demo/model")
    p.add_argument("--data", type=Path, default=ROOT / "runs/demo/data")
    p.add_argument("--shots", default="1,4,16")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", type=Path, default=ROOT / "runs/bench_adapters")
    args = p.parse_args()
    if not (args.base / "config.yaml").is_file() or not (args.data / "val-000000.tar").is_file():
        p.error(f"{args.base} or {args.data} is missing: run `bash scripts/demo.sh` first")
    shots = [int(k) for k in args.shots.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    import torch

    from tessera.data import SourceConfig
    from tessera.eval.linear_probe import linear_probe
    from tessera.eval.retrieval import evaluate_pairs
    from tessera.eval.zeroshot import embed_labelled, evaluate_zeroshot, read_classes
    from tessera.models import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    names, templates = read_classes(args.data / "classes.json")
    val = [SourceConfig(str(args.data / "val-000000.tar"))]
    base = load_model(args.base).eval()
    zero = evaluate_zeroshot(base, val, "image", names, templates, 256)
    base_retrieval = evaluate_pairs(base, val, [("image", "text")], 256, "cpu")["metrics"]["text_to_image_R@1"]
    test_x, test_y = embed_labelled(base, val, "image", 256)
    rows: list[dict] = [
        {
            "method": "zero-shot",
            "k": 0,
            "seed": None,
            "acc1": zero["metrics"]["acc1"],
            "mean_per_class_recall": zero["metrics"]["mean_per_class_recall"],
            "text_to_image_R@1": base_retrieval,
            "trainable": 0,
            "adapter_bytes": 0,
            "seconds": 0.0,
        }
    ]
    print(
        f"zero-shot: acc1 {zero['metrics']['acc1']:.1%} on {zero['n']} held-out pictures ({len(names)} classes)",
        flush=True,
    )
    for k in shots:
        for seed in seeds:
            for method in METHODS:
                run = args.out / "runs" / f"{method}-k{k}-s{seed}"
                row = finetune(method, args.base, k, seed, run, args.out / "runs" / f"{method}-k{k}-s{seed}.log")
                rows.append({"method": method, "k": k, "seed": seed, **row})
                print(
                    f"k={k:<2} seed={seed} {method:<5} acc1 {row['acc1']:.1%}  "
                    f"t->i R@1 {row['text_to_image_R@1']:.1%}"
                    f"  ({row['seconds']:.0f} s)",
                    flush=True,
                )
            # the linear probe fits the very shots the fine-tuning runs drew
            start = time.perf_counter()
            train_x, train_y = embed_labelled(base, [SourceConfig(rows[-1]["shots"])], "image", 256)
            probe = linear_probe(train_x, train_y, test_x, test_y)
            rows.append(
                {
                    "method": "linear probe",
                    "k": k,
                    "seed": seed,
                    "acc1": probe["metrics"]["acc1"],
                    "mean_per_class_recall": probe["metrics"]["mean_per_class_recall"],
                    "text_to_image_R@1": base_retrieval,
                    "trainable": train_x.shape[1] * len(names) + len(names),
                    "adapter_bytes": 4 * (train_x.shape[1] + 1) * len(names),
                    "seconds": time.perf_counter() - start,
                }
            )
            print(f"k={k:<2} seed={seed} probe acc1 {probe['metrics']['acc1']:.1%}", flush=True)

    order = ["zero-shot", "linear probe", "lora", "coop"]
    summary = []
    for method in order:
        for k in [0] if method == "zero-shot" else shots:
            picked = [r for r in rows if r["method"] == method and r["k"] == k]
            accs = [r["acc1"] for r in picked]
            summary.append(
                {
                    "method": method,
                    "k": k,
                    "acc1_mean": statistics.mean(accs),
                    "acc1_min": min(accs),
                    "acc1_max": max(accs),
                    "seeds": len(picked),
                    "text_to_image_R@1": statistics.mean(r["text_to_image_R@1"] for r in picked),
                    "trainable": picked[0]["trainable"],
                    "adapter_bytes": picked[0]["adapter_bytes"],
                    "seconds": statistics.mean(r["seconds"] for r in picked),
                }
            )
    total = sum(p.numel() for p in base.parameters())
    lines = [
        f"Few-shot shape classification, demo model ({total:,} parameters), held-out acc1 over {zero['n']} "
        f"pictures ({len(names)} classes, chance {1 / len(names):.1%}); mean (min-max) over seeds {seeds}.",
        "",
        "| method | k | acc1 | text->image R@1 after | trainable params | adapter file | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        spread = f" ({s['acc1_min']:.1%}-{s['acc1_max']:.1%})" if s["seeds"] > 1 else ""
        size = f"{s['adapter_bytes'] / 1024:.1f} KiB" if s["adapter_bytes"] else "-"
        lines.append(
            f"| {s['method']} | {s['k'] or '-'} | {s['acc1_mean']:.1%}{spread} | {s['text_to_image_R@1']:.1%} "
            f"| {s['trainable']:,} | {size} | {s['seconds']:.0f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "base": str(args.base),
                "classes": names,
                "n_test": zero["n"],
                "shots": shots,
                "seeds": seeds,
                "summary": summary,
                "runs": rows,
            },
            indent=2,
        )
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(zero["metrics"]["acc1"], color="gray", ls="--", label="zero-shot")
    ax.axhline(1 / len(names), color="lightgray", ls=":", label="chance")
    for method in order[1:]:
        pts = [s for s in summary if s["method"] == method]
        ax.errorbar(
            [s["k"] for s in pts],
            [s["acc1_mean"] for s in pts],
            marker="o",
            capsize=3,
            label=method,
            yerr=[[s["acc1_mean"] - s["acc1_min"] for s in pts], [s["acc1_max"] - s["acc1_mean"] for s in pts]],
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("shots per class (k)")
    ax.set_ylabel("held-out acc1")
    ax.set_title("Few-shot adaptation of the demo model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "fewshot.png", dpi=120)
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'table.md'} and {args.out / 'fewshot.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
