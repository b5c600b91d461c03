"""Beyond the plain objective: each option against its baseline at equal compute, in one run.

Matryoshka (loss.matryoshka), two parts:
- `loss`: forward + backward time of the loss at every prefix from shared tiles (train/matryoshka.py), against the
  plain loss at full width and against the obvious alternative, one plain loss per prefix on truncated features.
  One process, median of --repeats, fp32, B x D features.
- `train`: the demo recipe (configs/demo.yaml, embed_dim 128) trained twice for --steps on the demo data, plainly
  and with loss.matryoshka=[16, 32, 64], then both evaluated at 1/8, 1/4, 1/2 and all of the width (each prefix
  renormalised): retrieval R@1 both ways and zero-shot shape classification, from one embedding pass per model.

    python scripts/bench_beyond.py                        # both parts, about 25 min on 2 cores
    python scripts/bench_beyond.py --only loss --batch 8192
    python scripts/bench_beyond.py --only train --steps 600

Writes runs/bench_beyond/results.json, results.md (the tables) and matryoshka.png (R@1 against width). Run it alone:
two torch processes side by side slow each other down several times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = (16, 32, 64)  # of the demo's 128: 1/8, 1/4, 1/2


def time_loss(batch: int, dim: int, repeats: int) -> dict:
    from tessera.models import truncate_embeddings
    from tessera.train.losses import contrastive_loss
    from tessera.train.matryoshka import matryoshka_losses

    dims = (dim // 8, dim // 4, dim // 2, dim)
    g = torch.Generator().manual_seed(0)
    a0 = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    b0 = F.normalize(torch.randn(batch, dim, generator=g) + a0, dim=-1)
    scale0 = torch.tensor(14.3)

    def plain(a, b, s):
        return contrastive_loss(a, b, s)

    def shared(a, b, s):
        return matryoshka_losses(a, b, s, dims=dims).mean()

    def per_prefix(a, b, s):
        cut = truncate_embeddings
        return torch.stack([contrastive_loss(cut(a, d), cut(b, d), s) for d in dims]).mean()

    out = {}
    for name, fn in (("plain", plain), ("matryoshka", shared), ("per_prefix", per_prefix)):
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            a, b, s = (t.clone().requires_grad_(True) for t in (a0, b0, scale0))
            t0 = time.perf_counter()
            fn(a, b, s).backward()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times[1:])
    return {"batch": batch, "dim": dim, "dims": list(dims), "seconds": out}


def train_demo(out: Path, steps: int, matryoshka: bool) -> dict:
    data = out / "data"
    if not (data / "classes.json").is_file():
        subprocess.run([sys.executable, "-m", "tessera.data.demo", "--out", str(data)], check=True, cwd=ROOT)
    run = out / ("matryoshka" if matryoshka else "plain")
    args = [
        sys.executable,
        "-m",
        "tessera.train.pretrain",
        "--config",
        "configs/demo.yaml",
        f"output_dir={run}",
        f"data.train=[{{shards: '{data}/train-txt-{{000000..000003}}.tar', weight: 0.6}},"
        f" {{shards: '{data}/train-json-{{000000..000003}}.tar', weight: 0.4}}]",
        "data.val=[]",  # evaluated below, the same way for both
        f"train.steps={steps}",
        "train.precision=fp32",
        "train.ckpt_every=-1",
    ]
    if matryoshka:
        args.append(f"loss.matryoshka={list(PREFIXES)}")
    t0 = time.time()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.time() - t0
    return {"seconds": seconds, **evaluate(run / "model", data)}


def evaluate(model_dir: Path, data: Path) -> dict:
    from tessera.data import SourceConfig
    from tessera.eval.retrieval import evaluate_pairs
    from tessera.eval.zeroshot import evaluate_zeroshot, read_classes
    from tessera.models import load_model

    model = load_model(model_dir)
    val = [SourceConfig(str(data / "val-000000.tar"))]
    retrieval = evaluate_pairs(model, val, model.pairs, 256, widths=PREFIXES)
    names, templates = read_classes(data / "classes.json")
    zeroshot = evaluate_zeroshot(model, val, "image", names, templates, 256, widths=PREFIXES)
    full = str(model.cfg.embed_dim)
    by_width = {**retrieval["widths"], full: retrieval["metrics"]}
    acc = {**zeroshot["widths"], full: zeroshot["metrics"]}
    return {
        str(w): {
            "text_to_image_R@1": by_width[str(w)]["text_to_image_R@1"],
            "image_to_text_R@1": by_width[str(w)]["image_to_text_R@1"],
            "zeroshot_acc1": acc[str(w)]["acc1"],
        }
        for w in (*PREFIXES, int(full))
    }


def tables(results: dict) -> str:
    lines = []
    if "loss" in results:
        r = results["loss"]
        s = r["seconds"]
        lines += [
            f"## Matryoshka loss, forward + backward (B={r['batch']}, D={r['dim']}, prefixes {r['dims']}, fp32)",
            "",
            "| loss | time / plain |",
            "|---|---|",
            "| plain, full width | 1.00x |",
            f"| Matryoshka, shared tiles | {s['matryoshka'] / s['plain']:.2f}x |",
            f"| one plain loss per prefix | {s['per_prefix'] / s['plain']:.2f}x |",
            "",
        ]
    if "train" in results:
        r = results["train"]
        plain, mrl = r["plain"], r["matryoshka"]
        widths = [w for w in plain if w != "seconds"]
        lines += [
            f"## Demo recipe, {r['steps']} steps: plain vs loss.matryoshka={list(PREFIXES)}",
            "",
            "| width | t2i R@1 plain | t2i R@1 MRL | i2t R@1 plain | i2t R@1 MRL | zero-shot plain | zero-shot MRL |",
            "|---|---|---|---|---|---|---|",
        ]
        for w in widths:
            p, m = plain[w], mrl[w]
            lines.append(
                f"| {w} | {p['text_to_image_R@1']:.1%} | {m['text_to_image_R@1']:.1%} | {p['image_to_text_R@1']:.1%} "
                f"| {m['image_to_text_R@1']:.1%} | {p['zeroshot_acc1']:.1%} | {m['zeroshot_acc1']:.1%} |"
            )
        lines += ["", f"Training time, Matryoshka / plain: {mrl['seconds'] / plain['seconds']:.2f}x", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results["train"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, style in (("plain", "o--"), ("matryoshka", "s-")):
        widths = [w for w in r[name] if w != "seconds"]
        ax.plot([int(w) for w in widths], [r[name][w]["text_to_image_R@1"] for w in widths], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding width used (prefix, renormalised)")
    ax.set_ylabel("text-to-image R@1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("loss", "train"), help="run one part")
    p.add_argument("--batch", type=int, default=4096, help="loss part: global batch")
    p.add_argument("--dim", type=int, default=512, help="loss part: embedding width")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=300, help="train part: steps of each run")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_beyond")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    if args.only in (None, "loss"):
        results["loss"] = time_loss(args.batch, args.dim, args.repeats)
    if args.only in (None, "train"):
        results["train"] = {
            "steps": args.steps,
            "plain": train_demo(args.out, args.steps, matryoshka=False),
            "matryoshka": train_demo(args.out, args.steps, matryoshka=True),
        }
        plot(results, args.out / "matryoshka.png")
    text = tables(results)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}, results.md" + (", matryoshka.png" if "train" in results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
