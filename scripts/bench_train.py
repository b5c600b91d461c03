"""Training throughput: Tessera's pretraining vs open_clip's `open_clip_train.main`, side by side.

Both train the same open_clip model config on the same jpg+txt shards, with the same per-rank batch,
the same number of steps, one loader worker, on this machine's CPU (or GPU if present), one after the
other in this run. Both log every step; throughput is the steady-state samples/s over the steps after
`--warmup` (total samples / total step time). Precisions are compared pairwise at equal numerics:
fp32 vs fp32, and bf16 compute with fp32 master weights (Tessera's DeepSpeed bf16 vs open_clip's
`amp_bf16`).

open_clip_train needs `open_clip_torch[training]`, which pins webdataset <= 0.2.86, so it runs from a
venv of its own (`.venv-openclip`, made on first use with the torch/open_clip pins of pyproject.toml).

    python scripts/bench_train.py                      # ViT-B-32, batch 32, 20 steps, fp32 and bf16
    python scripts/bench_train.py --steps 10 --precisions bf16

Writes runs/bench_train/results.json and runs/bench_train/throughput.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_VENV = ROOT / ".venv-openclip"
PEER_WEBDATASET = "webdataset==0.2.86"  # open_clip_torch[training] needs webdataset <= 0.2.86
PEER_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}


def pinned(names: list[str]) -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {re.split(r"[=<>\[]", d)[0].lower(): d for d in deps}
    return [pins[n.lower()] for n in names]


def ensure_peer_venv() -> Path:
    python = PEER_VENV / "bin" / "python"
    want = pinned(["torch", "torchvision", "open_clip_torch"])
    want = [w.replace("open_clip_torch", "open_clip_torch[training]") for w in want] + [PEER_WEBDATASET]
    stamp = PEER_VENV / ".bench-install"
    if python.exists() and stamp.is_file() and stamp.read_text() == " ".join(want):
        return python
    print(f"[bench] creating {PEER_VENV} with {' '.join(want)}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *want], check=True)
    stamp.write_text(" ".join(want))
    return python


def make_shards(out: Path, n: int, image_size: int) -> str:
    """jpg+txt shards of the demo's shapes, rendered at the model's resolution."""
    import random

    from tessera.data.demo import COMBOS, _encode, caption, render
    from tessera.data.make_shards import write_shards

    if (out / "sizes.json").is_file() and sum(json.loads((out / "sizes.json").read_text()).values()) == n:
        return str(out / f"bench-{{000000..{(n - 1) // 256:06d}}}.tar")
    rng = random.Random(0)

    def samples():
        for i in range(n):
            combo = rng.choice(COMBOS)
            yield (
                f"{i:07d}",
                {
                    "jpg": _encode(render(*combo, rng, canvas=image_size), "jpg", rng),
                    "txt": caption(*combo, rng).encode(),
                },
            )

    sizes = write_shards(samples(), out, "bench", 256)
    return str(out / f"bench-{{000000..{len(sizes) - 1:06d}}}.tar")


def peer_command(
    python: Path, shards: str, model: str, batch_size: int, samples: int, workers: int, precision: str, cuda: bool
) -> list[str]:
    """open_clip_train's command line for `samples` samples of one epoch, logging every step, with Tessera's
    defaults where the two differ (lr, weight decay, warmup, gradient clipping), so both do the same work."""
    flags = {
        "train-data": shards,
        "dataset-type": "webdataset",
        "train-num-samples": samples,
        "model": model,
        "batch-size": batch_size,
        "epochs": 1,
        "workers": workers,
        "precision": PEER_PRECISION[precision],
        "lr": "5e-4",
        "wd": 0.2,
        "warmup": 2,
        "grad-clip-norm": 1.0,
        "log-every-n-steps": 1,
        "logs": "none",
        "seed": 0,
        "device": "cuda" if cuda else "cpu",
    }
    return [str(python), "-m", "open_clip_train.main", *(x for k, v in flags.items() for x in (f"--{k}", str(v)))]


def ours_overrides(shards: str, model: str, batch_size: int, workers: int, precision: str) -> list[str]:
    """Tessera's overrides for the same model, shards, batch, workers and precision as `peer_command`."""
    towers = (
        f"{{image: {{encoder: open_clip_image, model: {model}}}, text: {{encoder: open_clip_text, model: {model}}}}}"
    )
    return [
        f"model={{embed_dim: 512, towers: {towers}}}",
        f"data.train={shards}",
        "data.val=[]",
        f"data.num_workers={workers}",
        f"train.batch_size={batch_size}",
        "train.lr=5e-4",
        "train.warmup_steps=2",
        "train.weight_decay=0.2",
        f"train.precision={precision}",
        "train.log_every=1",
        "train.ckpt_every=-1",
        "train.export=false",
        "deepspeed.zero_stage=0",
        "seed=0",
    ]


def run_peer(python: Path, shards: str, args, precision: str, log: Path) -> list[float]:
    cmd = peer_command(
        python, shards, args.model, args.batch_size, args.steps * args.batch_size, args.workers, precision, args.cuda
    )
    # --logs none still makes ./none/<run name>/: run it inside the benchmark's own directory
    out = _run(cmd, log, cwd=log.parent)
    rates = [float(m) for m in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.e+]+)/s,", out)]
    if len(rates) < args.steps:
        raise RuntimeError(f"open_clip_train logged {len(rates)} of {args.steps} steps; see {log}")
    return rates[: args.steps]


def run_ours(shards: str, args, precision: str, out_dir: Path, log: Path) -> list[float]:
    cmd = [
        sys.executable,
        "-m",
        "tessera.train.pretrain",
        f"output_dir={out_dir}",
        f"train.steps={args.steps}",
        *ours_overrides(shards, args.model, args.batch_size, args.workers, precision),
    ]
    _run(cmd, log)
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["samples_per_s"] for x in lines if x["kind"] == "train"]


def _run(cmd: list[str], log: Path, cwd: Path = ROOT) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    log.write_text(f"$ {' '.join(cmd)}\n# wall {time.perf_counter() - t0:.1f}s\n{proc.stdout}\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[2]} failed (exit {proc.returncode}); see {log}")
    return proc.stdout + proc.stderr


def steady_rate(per_step: list[float], batch_size: int, warmup: int) -> float:
    """Samples/s over the steps after warmup: total samples / total step time."""
    steady = per_step[warmup:]
    return len(steady) * batch_size / sum(batch_size / r for r in steady)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="leading steps left out of the rate")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(PEER_PRECISION))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_train")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    import open_clip
    import torch

    args.cuda = torch.cuda.is_available()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    image_size = open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]
    shards = make_shards(args.out / "shards", args.steps * args.batch_size, image_size)
    peer_python = ensure_peer_venv()

    results = []
    for precision in args.precisions:
        print(f"[bench] {args.model} batch {args.batch_size} x {args.steps} steps, {precision}", flush=True)
        peer = run_peer(peer_python, shards, args, precision, args.out / f"open_clip_{precision}.log")
        ours = run_ours(
            shards, args, precision, args.out / f"tessera_{precision}", args.out / f"tessera_{precision}.log"
        )
        row = {
            "precision": precision,
            "open_clip_precision": PEER_PRECISION[precision],
            "open_clip_samples_per_s": steady_rate(peer, args.batch_size, args.warmup),
            "tessera_samples_per_s": steady_rate(ours, args.batch_size, args.warmup),
            "open_clip_per_step": peer,
            "tessera_per_step": ours,
        }
        row["ratio"] = row["tessera_samples_per_s"] / row["open_clip_samples_per_s"]
        results.append(row)

    device = torch.cuda.get_device_name() if args.cuda else f"CPU x{os.cpu_count()}"
    print(
        f"\n{args.model}, per-rank batch {args.batch_size}, {args.steps} steps (first {args.warmup} left out), "
        f"{args.workers} loader worker(s), {device}"
    )
    print(f"{'precision':<16}{'open_clip (samples/s)':>24}{'tessera (samples/s)':>22}{'ratio':>9}")
    for r in results:
        label = f"{r['precision']}/{r['open_clip_precision']}"
        print(f"{label:<16}{r['open_clip_samples_per_s']:>24.2f}{r['tessera_samples_per_s']:>22.2f}{r['ratio']:>8.2f}x")
    doc = {
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "workers": args.workers,
        "device": device,
        "results": results,
    }
    (args.out / "results.json").write_text(json.dumps(doc, indent=2))
    _plot(results, args, args.out / "throughput.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'throughput.png'}")
    return 0


def _plot(results, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        steps = range(1, len(r["tessera_per_step"]) + 1)
        ax.plot(steps, r["tessera_per_step"], marker="o", label=f"tessera {r['precision']}")
        ax.plot(
            range(1, len(r["open_clip_per_step"]) + 1),
            r["open_clip_per_step"],
            marker="x",
            linestyle="--",
            label=f"open_clip {r['open_clip_precision']}",
        )
    ax.axvspan(0.5, args.warmup + 0.5, color="0.9", label="left out (warmup)")
    ax.set_xlabel("step")
    ax.set_ylabel("samples/s")
    ax.set_title(f"{args.model}, batch {args.batch_size}: training throughput per step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
