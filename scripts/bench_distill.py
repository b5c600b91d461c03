"""Distillation, measured: the tiled loss's memory against open_clip's DistillClipLoss, and what a teacher, stored
embeddings, the weights' average and self-distillation do for a small student on the joint demo data.

Part `loss` (--part loss): forward + backward of each loss at global batch B, each in a fresh subprocess; the peak
resident set during it, minus the resident set just before (features and imports already there):
- tessera contrastive: `contrastive_loss` (the yardstick: the issue asks the distillation loss to stay within 2x it);
- tessera distill: `distill_loss` (the student's and the teacher's similarity matrices, tiled: never B x B);
- tessera both: the two together, as a distilling run computes them;
- open_clip: `DistillClipLoss` (its contrastive and distillation terms; both B x B matrices and their softmaxes),
  skipped where those would not fit in --mem-gib.

Part `train` (--part train): on the joint demo data (`tessera.data.demo_joint`: image, audio, text), a larger
teacher is trained once; then, for each seed, the small student recipe trained
- alone;
- distilled from the teacher online (distill.kind=both);
- distilled from the teacher's embeddings stored by `tessera embed-shards` (distill.teacher=stored);
- alone with train.ema (the average evaluated beside the raw weights);
- self-distilled from its own average (distill.teacher=ema);
all with equal steps and data; held-out retrieval R@1 for every pair and zero-shot accuracy, and the time per step
(the stored teacher runs no teacher forward). One variant trains at a time (2 cores: never two side by side).

    python scripts/bench_distill.py --part loss --batches 2048,8192,16384,65536
    python scripts/bench_distill.py --part train --seeds 0,1

Writes runs/bench_distill/{loss,train}.json and loss_memory.png, train.png.
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
OUT = ROOT / "runs" / "bench_distill"
LOSS_IMPLS = ("contrastive", "distill", "both", "open_clip")
OPENCLIP_BYTES_PER_LOGIT = 32  # student and teacher matrices, both directions' softmaxes and their gradients


def one_loss(impl: str, B: int, D: int, E: int, tile: int) -> dict:
    """Runs in the subprocess: one forward + backward of `impl` at batch B."""
    import torch
    import torch.nn.functional as F

    from tessera.losses import contrastive_loss, distill_loss

    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_(True)
    b = F.normalize(torch.randn(B, D, generator=g) + a.detach(), dim=-1).requires_grad_(True)
    ta = F.normalize(torch.randn(B, E, generator=g), dim=-1)
    tb = F.normalize(torch.randn(B, E, generator=g) + ta, dim=-1)
    scale = torch.tensor(14.3, requires_grad=True)
    teacher_scale = torch.tensor(50.0)
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    from open_clip.loss import DistillClipLoss  # imported before the measurement, as every other import

    def run(n: int):
        x, y, tx, ty = a[:n], b[:n], ta[:n], tb[:n]
        if impl == "open_clip":
            contrastive, distilled = DistillClipLoss()(x, y, scale, tx, ty, teacher_scale)
            return contrastive + distilled
        loss = 0
        if impl in ("contrastive", "both"):
            loss = loss + contrastive_loss(x, y, scale, tile_size=tile)
        if impl in ("distill", "both"):
            loss = loss + distill_loss(x, y, scale, tx, ty, teacher_scale, tile_size=tile)
        return loss

    run(min(B, 256)).backward()  # warm-up: thread pools and first-call allocations are not the loss's memory
    before = reset_peak()
    start = time.perf_counter()
    loss = run(B)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    return {"impl": impl, "B": B, "peak_mib": (peak - before) / 1024, "seconds": seconds, "loss": float(loss)}


def loss_part(args) -> list[dict]:
    rows = []
    for B in args.batches:
        for impl in LOSS_IMPLS:
            need_gib = OPENCLIP_BYTES_PER_LOGIT * B * B / 2**30
            if impl == "open_clip" and need_gib > args.mem_gib:
                rows.append({"impl": impl, "B": B, "skipped": f"needs ~{need_gib:.0f} GiB for its B x B matrices"})
                continue
            cmd = [sys.executable, __file__, "--one", impl, "--batches", str(B), "--dim", str(args.dim)]
            cmd += ["--teacher-dim", str(args.teacher_dim), "--tile", str(args.tile)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=_env())
            if proc.returncode != 0:
                rows.append({"impl": impl, "B": B, "skipped": (proc.stderr or proc.stdout).strip()[-300:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(_loss_line(rows[-1]), flush=True)
    return rows


def _loss_line(r: dict) -> str:
    if "skipped" in r:
        return f"{r['impl']:<12} B={r['B']:<6} skipped: {r['skipped']}"
    return f"{r['impl']:<12} B={r['B']:<6} peak {r['peak_mib']:9.1f} MiB  {r['seconds']:8.2f} s"


def _loss_table(rows: list[dict]) -> str:
    by = {(r["impl"], r["B"]): r for r in rows}
    lines = [
        "| B | contrastive MiB | distill MiB | distill / contrastive | both MiB | open_clip DistillClipLoss MiB |",
        "|---|---|---|---|---|---|",
    ]
    for B in sorted({r["B"] for r in rows}):
        cells = []
        for impl in LOSS_IMPLS:
            r = by.get((impl, B), {})
            cells.append(f"{r['peak_mib']:.0f}" if "peak_mib" in r else "n/a" if not r else "skipped (B^2)")
        c, d = by.get(("contrastive", B), {}), by.get(("distill", B), {})
        ratio = f"{d['peak_mib'] / c['peak_mib']:.2f}x" if "peak_mib" in c and "peak_mib" in d else "n/a"
        lines.append(f"| {B} | {cells[0]} | {cells[1]} | {ratio} | {cells[2]} | {cells[3]} |")
    return "\n".join(lines)


def _env() -> dict:
    paths = [str(ROOT / "scripts"), str(ROOT), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def _plot_loss(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for impl in LOSS_IMPLS:
        pts = sorted((r["B"], r["peak_mib"]) for r in rows if r["impl"] == impl and "peak_mib" in r)
        if pts:
            ax.loglog(*zip(*pts), marker="o", label=impl)
    ax.set_xlabel("global batch B")
    ax.set_ylabel("peak memory of forward + backward (MiB)")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


# --- part train ------------------------------------------------------------------------------------------------

# the teacher: configs/demo-triple.yaml's towers, pairwise (text the hub); the student: about a quarter of its width
PAIRWISE = ("model.tuples=[]", "loss.higher_order=none")
STUDENT = (
    "model.embed_dim=64",
    "model.towers.image.overrides={layers: [1, 1, 1, 1], width: 8, image_size: 64, head_width: 16}",
    "model.towers.text.overrides={context_length: 32, width: 64, heads: 2, layers: 1}",
    "model.towers.audio.width=64",
    "model.towers.audio.depth=1",
    "model.towers.audio.heads=2",
)
TRAIN_SOURCES = (  # (shards, weight, modalities), as configs/demo-triple.yaml
    ("train-txt-{000000..000003}.tar", 0.35, "image, text"),
    ("sounds-{000000..000003}.tar", 0.35, "audio, text"),
    ("pictures-sounds-000000.tar", 0.3, "image, audio, text"),
)
PAIRS = (("image", "text"), ("audio", "text"), ("image", "audio"))


def _data(out: Path) -> Path:
    data = out / "data"
    if not (data / "val-joint-000000.tar").is_file():
        for module in ("tessera.data.demo", "tessera.data.demo_joint"):
            subprocess.run([sys.executable, "-m", module, "--out", str(data)], check=True, cwd=ROOT)
    return data


def _train(run: Path, data: Path, steps: int, seed: int, *overrides: str) -> dict:
    """configs/demo-triple.yaml (pairwise) trained into `run`, fp32, no evaluation (done below, alike for every
    run); its wall time and median samples/s after the first log window."""
    sources = ", ".join(f"{{shards: '{data}/{s}', weight: {w}, modalities: [{m}]}}" for s, w, m in TRAIN_SOURCES)
    if not (run / "model").is_dir():
        args = ["--config", "configs/demo-triple.yaml", f"output_dir={run}", f"data.train=[{sources}]", "data.val=[]"]
        args += [f"train.steps={steps}", f"seed={seed}", "train.precision=fp32", "train.ckpt_every=-1", *PAIRWISE]
        started = time.time()
        subprocess.run([sys.executable, "-m", "tessera.train.pretrain", *args, *overrides], check=True, cwd=ROOT)
        (run / "wall_s").write_text(f"{time.time() - started:.1f}")
    rates = [
        r["samples_per_s"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r.get("kind") == "train" and "samples_per_s" in r
    ]
    rates = sorted(rates[1:] or rates)
    return {"wall_s": float((run / "wall_s").read_text()), "samples_per_s": rates[len(rates) // 2]}


def _evaluate(model_dir: Path, data: Path) -> dict[str, float]:
    """R@1 both ways for every pair on the joint held-out set (96 samples), image-text also on the demo's 480
    held-out pictures (`shapes_`), and zero-shot shape classification of those pictures and of the sounds."""
    from tessera.data import SourceConfig
    from tessera.eval.retrieval import evaluate_pairs
    from tessera.eval.zeroshot import evaluate_zeroshot, read_classes
    from tessera.models import load_model

    model = load_model(model_dir)
    params = sum(p.numel() for p in model.parameters())
    joint = [SourceConfig(str(data / "val-joint-000000.tar"), modalities=["image", "text", "audio"])]
    out = {k: v for k, v in evaluate_pairs(model, joint, list(PAIRS), 256)["metrics"].items() if k.endswith("R@1")}
    names, templates = read_classes(data / "classes.json")
    pictures = [SourceConfig(str(data / "val-000000.tar"), modalities=["image", "text"])]
    shapes = evaluate_pairs(model, pictures, [("image", "text")], 256)["metrics"]
    out.update({f"shapes_{k}": v for k, v in shapes.items() if k.endswith("R@1")})
    out["zeroshot_image"] = evaluate_zeroshot(model, pictures, "image", names, templates, 256)["metrics"]["acc1"]
    sounds = [SourceConfig(str(data / "val-joint-000000.tar"), modalities=["audio", "text"])]
    out["zeroshot_audio"] = evaluate_zeroshot(model, sounds, "audio", names, templates, 256)["metrics"]["acc1"]
    out["params"] = params
    return out


def train_part(args, out: Path) -> None:
    data = _data(out)
    teacher = out / "teacher"
    _train(teacher, data, args.teacher_steps, 0)
    taught = out / "taught"
    if not (taught / "teacher.json").is_file():
        for shards, _, _ in TRAIN_SOURCES:
            cmd = [sys.executable, "-m", "tessera.train.cli", "embed-shards", "--model", str(teacher / "model")]
            subprocess.run([*cmd, "--data", str(data / shards), "--out", str(taught)], check=True, cwd=ROOT)
    for name in ("classes.json", "val-000000.tar", "val-joint-000000.tar"):  # the stored variant's data folder
        if not (taught / name).exists():
            (taught / name).symlink_to(data / name)
    ema = ("train.ema.decay=0.99", "export.weights=both")
    variants = {  # name: (data folder, overrides, the model evaluated)
        "alone": (data, (), "model"),
        "online teacher": (data, (f"distill.teacher={teacher / 'model'}", "distill.kind=both"), "model"),
        "stored teacher": (taught, ("distill.teacher=stored", "distill.kind=both"), "model"),
        "ema": (data, ema, "model-ema"),
        "self-distilled (ema teacher)": (data, (*ema, "distill.teacher=ema", "distill.kind=logits"), "model"),
    }
    results = {"teacher": {**_evaluate(teacher / "model", data), "steps": args.teacher_steps}, "runs": {}}
    for seed in args.seeds:
        for name, (folder, overrides, evaluated) in variants.items():
            run = out / f"{name.split()[0]}-{name.split()[-1].strip('()')}-seed{seed}"
            timing = _train(run, folder, args.steps, seed, *STUDENT, *overrides)
            row = {**_evaluate(run / evaluated, data), **timing}
            if evaluated != "model":
                row["raw"] = _evaluate(run / "model", data)
            results["runs"].setdefault(name, {})[str(seed)] = row
            print(f"{name} seed {seed}: {json.dumps(row)}", flush=True)
    results.update(steps=args.steps, seeds=args.seeds)
    (out / "train.json").write_text(json.dumps(results, indent=1))
    print(_train_table(results))
    _plot_train(results, out / "train.png")


# the demo's image-text pair on its 480 held-out pictures first, then every pair on the 96 joint held-out samples
METRICS = ("shapes_image_to_text_R@1", "shapes_text_to_image_R@1")
METRICS += ("image_to_text_R@1", "text_to_image_R@1", "audio_to_text_R@1", "text_to_audio_R@1")
METRICS += ("image_to_audio_R@1", "audio_to_image_R@1", "zeroshot_image", "zeroshot_audio")


def _mean(rows: dict, key: str) -> float:
    return sum(r[key] for r in rows.values()) / len(rows)


def _train_table(results: dict) -> str:
    head = "| student | " + " | ".join(m.replace("_R@1", "").replace("_to_", "->") for m in METRICS)
    lines = [head + " | samples/s |", "|---" * (len(METRICS) + 2) + "|"]
    t = results["teacher"]
    lines.append(
        f"| teacher ({t['params'] / 1e6:.1f}M parameters) | " + " | ".join(f"{t[m]:.1%}" for m in METRICS) + " | |"
    )
    for name, rows in results["runs"].items():
        cells = " | ".join(f"{_mean(rows, m):.1%}" for m in METRICS)
        lines.append(f"| {name} | {cells} | {_mean(rows, 'samples_per_s'):.0f} |")
    return "\n".join(lines)


def _plot_train(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot()
    names = list(results["runs"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [_mean(results["runs"][name], m) for m in METRICS]
        ax.bar([x + i * width for x in range(len(METRICS))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(METRICS))])
    ax.set_xticklabels([m.replace("_R@1", "").replace("_to_", "->") for m in METRICS], rotation=30, ha="right")
    ax.set_ylabel("held-out R@1 / zero-shot acc1 (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["loss", "train"], default="loss")
    p.add_argument("--batches", default="2048,8192,16384,65536")
    p.add_argument("--dim", type=int, default=64, help="student width (loss part)")
    p.add_argument("--teacher-dim", type=int, default=128, help="teacher width (loss part)")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--mem-gib", type=float, default=None, help="memory open_clip may use (default: MemAvailable/2)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=300, help="the students' optimizer steps (part train)")
    p.add_argument("--teacher-steps", type=int, default=600, help="the teacher's (part train)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batches = [int(x) for x in args.batches.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    if args.one:
        print(json.dumps(one_loss(args.one, args.batches[0], args.dim, args.teacher_dim, args.tile)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "loss":
        args.mem_gib = args.mem_gib or meminfo_gib("MemAvailable") / 2
        rows = loss_part(args)
        doc = {"dim": args.dim, "teacher_dim": args.teacher_dim, "tile": args.tile, "rows": rows}
        (out / "loss.json").write_text(json.dumps(doc, indent=1))
        _plot_loss(rows, out / "loss_memory.png")
        print(_loss_table(rows))
        return
    train_part(args, out)


if __name__ == "__main__":
    main()
