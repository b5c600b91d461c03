"""Training throughput: Tessera's pretraining vs open_clip's `open_clip_train.main`, side by side.

Both train the same open_clip model config on the same jpg+txt shards, with the same per-rank batch,
the same number of steps, one loader worker, on this machine's CPU (or GPU if present), one after the
other in this run. Both log every step. Precisions are compared pairwise at equal numerics: fp32 vs fp32,
and bf16 compute with fp32 master weights (Tessera's bf16 vs open_clip's `amp_bf16`).

Two recipes (model rows): `model`, the open_clip config named by `--model` (ViT-B-32 by default), and `demo`,
configs/demo.yaml's towers (open_clip's RN50 shrunk to one block per stage at 64 px, and a 2-layer text tower
from ViT-B-32; embed_dim 128, batch 128). open_clip_train gets the demo as a model config JSON,
`TesseraDemo.json`, written into its venv's `open_clip/model_configs/`; Tessera gets the same JSON as its towers'
overrides; both parameter counts are printed.

Reported per recipe, precision and system:
- samples/s, steady state: total samples / total step time over the steps after `--warmup`;
- model FLOP/s: the FLOPs of one training step (forward and backward of both towers and the loss), counted with
  `torch.utils.flop_counter.FlopCounterMode` on the open_clip model built here, times samples/s; and that as a
  fraction of this machine's `torch.mm` rate in the same precision, measured here too;
- time to the first step, from launch to the first step's record (open_clip_train's first `Train Epoch: 0 [`
  line, read as it is printed; Tessera's first `time` in metrics.jsonl);
- data wait: the mean share of a steady step spent waiting for its batch (open_clip_train's `Data (t)` over its
  step time; Tessera's `data_wait`).

open_clip_train needs `open_clip_torch[training]`, which pins webdataset <= 0.2.86, so it runs from a
venv of its own (`.venv-openclip`, made on first use with the torch/open_clip pins of pyproject.toml).

    python scripts/bench_train.py                      # ViT-B-32 (batch 32) and the demo (batch 128), 20 steps
    python scripts/bench_train.py --recipes demo --steps 10 --precisions bf16

Precisions default to fp32 and bf16 where this machine computes bf16 natively (GPU, or a CPU with AMX or
AVX512-BF16), else fp32 only: an AVX2 CPU emulates bf16 matmuls at about 1/25 of its fp32 rate.
Writes runs/bench_train/results.json and runs/bench_train/throughput.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import first_logged_step, launch

ROOT = Path(__file__).resolve().parents[1]
PEER_VENV = ROOT / ".venv-openclip"
PEER_WEBDATASET = "webdataset==0.2.86"  # open_clip_torch[training] needs webdataset <= 0.2.86
PEER_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}
PEER_FIRST_STEP = re.compile(r"Train Epoch: 0 \[")
# with --log-every-n-steps 1 its meters are reset at each log, so these are the step's own data time and samples/s
PEER_STEP = re.compile(r"Data \(t\): ([0-9.]+) Batch \(t\): [0-9.]+, ([0-9.e+]+)/s,")
OURS_PARAMS = re.compile(r"([0-9,]+) trainable parameters")
SYSTEMS = ("open_clip", "tessera")


@dataclass(frozen=True)
class Recipe:
    """One model row: the open_clip model config both systems train, written as Tessera's towers take it (a named
    open_clip config per tower plus overrides of its fields, as in configs/demo.yaml)."""

    label: str
    model: str  # the name open_clip_train's --model gets (a JSON of that name is written for an unnamed config)
    image: str
    text: str
    batch_size: int
    embed_dim: int | None = None  # None: the named config's
    image_overrides: dict[str, Any] = field(default_factory=dict)
    text_overrides: dict[str, Any] = field(default_factory=dict)

    def is_named(self) -> bool:
        """An open_clip config as it is, which open_clip_train takes by name; else one written out as `model`.json."""
        unchanged = not (self.image_overrides or self.text_overrides or self.embed_dim)
        return unchanged and self.image == self.text == self.model

    def model_cfg(self) -> dict[str, Any]:
        """The open_clip model config (its JSON) this recipe describes."""
        import open_clip

        if self.is_named():
            return open_clip.get_model_config(self.model)
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {**open_clip.get_model_config(self.image)["vision_cfg"], **self.image_overrides},
            "text_cfg": {**open_clip.get_model_config(self.text)["text_cfg"], **self.text_overrides},
        }


def named_recipe(model: str, batch_size: int = 32) -> Recipe:
    return Recipe(model, model, model, model, batch_size)


# configs/demo.yaml's towers, embed_dim and batch
DEMO = Recipe(
    label="demo",
    model="TesseraDemo",
    image="RN50",
    text="ViT-B-32",
    batch_size=128,
    embed_dim=128,
    image_overrides={"layers": [1, 1, 1, 1], "width": 16, "image_size": 64, "head_width": 32},
    text_overrides={"context_length": 32, "width": 128, "heads": 4, "layers": 2},
)


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


def register_model_config(recipe: Recipe, peer_python: Path, out: Path) -> None:
    """Write the recipe's model config as `<model>.json` where open_clip_train (which takes only names) finds it, the
    peer venv's `open_clip/model_configs/`, and register it with the open_clip of this process."""
    import open_clip

    path = out / "model_configs" / f"{recipe.model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe.model_cfg(), indent=2))
    where = "import open_clip, pathlib; print(pathlib.Path(open_clip.__file__).parent / 'model_configs')"
    peer_dir = subprocess.run([str(peer_python), "-c", where], capture_output=True, text=True, check=True).stdout
    shutil.copy(path, Path(peer_dir.strip()) / path.name)
    open_clip.add_model_config(path)


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


def ours_overrides(shards: str, recipe: Recipe, batch_size: int, workers: int, precision: str) -> list[str]:
    """Tessera's overrides for the same model, shards, batch, workers and precision as `peer_command`: each tower is
    its named config with the fields of the recipe's model config (the JSON open_clip_train reads) over it."""
    cfg = recipe.model_cfg()
    towers = {
        "image": {"encoder": "open_clip_image", "model": recipe.image, "overrides": cfg["vision_cfg"]},
        "text": {"encoder": "open_clip_text", "model": recipe.text, "overrides": cfg["text_cfg"]},
    }
    return [
        f"model={json.dumps({'embed_dim': cfg['embed_dim'], 'towers': towers})}",  # JSON is YAML flow syntax
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


@dataclass
class Run:
    per_step: list[float]  # samples/s of each step
    data_wait: list[float]  # the share of each step spent waiting for its batch
    first_step: float  # seconds from the launch to the first step's record
    params: int | None = None  # trainable parameters, where the system logs them


def run_peer(python: Path, shards: str, recipe: Recipe, batch_size: int, args, precision: str, log: Path) -> Run:
    cmd = peer_command(
        python, shards, recipe.model, batch_size, args.steps * batch_size, args.workers, precision, args.cuda
    )
    # --logs none still makes ./none/<run name>/: run it inside the benchmark's own directory
    run = launch(cmd, log, cwd=log.parent, first=PEER_FIRST_STEP)
    steps = [(float(data), float(rate)) for data, rate in PEER_STEP.findall(run.output)][: args.steps]
    if len(steps) < args.steps or run.first_match is None:
        raise RuntimeError(f"open_clip_train logged {len(steps)} of {args.steps} steps; see {log}")
    # its Data (t) has 3 decimals: the wait is known to 1 ms a step; the step time comes from its samples/s
    return Run([r for _, r in steps], [d * r / batch_size for d, r in steps], run.first_match)


def run_ours(shards: str, recipe: Recipe, batch_size: int, args, precision: str, out_dir: Path, log: Path) -> Run:
    shutil.rmtree(out_dir, ignore_errors=True)  # no stale metrics, and nothing to resume from
    cmd = [
        sys.executable,
        "-m",
        "tessera.train.pretrain",
        f"output_dir={out_dir}",
        f"train.steps={args.steps}",
        *ours_overrides(shards, recipe, batch_size, args.workers, precision),
    ]
    run = launch(cmd, log, ROOT)
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    params = OURS_PARAMS.search(run.output)
    return Run(
        [x["samples_per_s"] for x in train],
        [x["data_wait"] for x in train],
        first_logged_step(out_dir / "metrics.jsonl", run.started),
        int(params.group(1).replace(",", "")) if params else None,
    )


def steady_rate(per_step: list[float], batch_size: int, warmup: int) -> float:
    """Samples/s over the steps after warmup: total samples / total step time."""
    steady = per_step[warmup:]
    return len(steady) * batch_size / sum(batch_size / r for r in steady)


def step_flops(model: str, batch_size: int) -> tuple[float, int]:
    """FLOPs per sample of one training step (forward and backward of both towers, and the CLIP loss) at this batch
    size, and the model's parameter count. Counted on the meta device: no arithmetic is done, and attention runs
    as its math path, whose matmuls the counter sees (on a CPU the fused attention kernel has no FLOP formula, and
    would count as zero)."""
    import open_clip
    import torch
    from open_clip.loss import ClipLoss
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        clip = open_clip.create_model(model, device="meta")
    cfg = open_clip.get_model_config(model)
    size = cfg["vision_cfg"]["image_size"]
    hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    images = torch.zeros(batch_size, 3, *hw, device="meta")
    texts = torch.zeros(batch_size, cfg["text_cfg"]["context_length"], dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        ClipLoss()(*clip(images, texts)[:3]).backward()
    return counter.get_total_flops() / batch_size, sum(p.numel() for p in clip.parameters())


def mm_rate(dtype, n: int, device: str, rounds: int = 5, seconds: float = 0.4) -> float:
    """torch.mm FLOP/s on n x n matrices, the best of `rounds` rounds of at least `seconds` each after a warm-up
    product: the machine's peak, which a round slowed by a neighbour on a shared host would understate."""
    import torch

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = 0.0
    for _ in range(rounds):
        reps, t0 = 0, time.perf_counter()
        while reps < 1 or time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            sync()
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def mm_rates(cuda: bool, native_bf16: bool) -> dict[str, float]:
    """This machine's fp32 and bf16 torch.mm rates: the peaks the steps' FLOP/s are measured against. Emulated bf16
    (a CPU without AMX or AVX512-BF16) is ~25x slower, so it gets a smaller product."""
    import torch

    if cuda:
        return {"fp32": mm_rate(torch.float32, 8192, "cuda"), "bf16": mm_rate(torch.bfloat16, 8192, "cuda")}
    return {
        "fp32": mm_rate(torch.float32, 2048, "cpu"),
        "bf16": mm_rate(torch.bfloat16, 2048 if native_bf16 else 512, "cpu"),
    }


def cpu_features() -> dict[str, bool]:
    """What decides whether bf16 is native on this CPU (AMX, AVX512-BF16) or emulated."""
    import torch

    probes = ("amx_tile", "avx512_bf16", "avx512", "avx2")
    return {name: bool(getattr(torch.cpu, f"_is_{name}_supported", lambda: False)()) for name in probes}


def summary(run: Run, batch_size: int, warmup: int, flops_per_sample: float, mm: float) -> dict[str, Any]:
    rate = steady_rate(run.per_step, batch_size, warmup)
    return {
        "samples_per_s": rate,
        "flop_per_s": flops_per_sample * rate,
        "fraction_of_mm": flops_per_sample * rate / mm,
        "first_step_s": run.first_step,
        "data_wait": statistics.fmean(run.data_wait[warmup:]),
        "params": run.params,
        "per_step": run.per_step,
        "data_wait_per_step": run.data_wait,
    }


def bench_recipe(recipe: Recipe, args, peer_python: Path, mm: dict[str, float]) -> list[dict[str, Any]]:
    """Both systems on one recipe, at each precision: a results row each."""
    batch = args.batch_size or recipe.batch_size
    if not recipe.is_named():
        register_model_config(recipe, peer_python, args.out)
    cfg = recipe.model_cfg()
    flops, params = step_flops(recipe.model, batch)
    image_size = cfg["vision_cfg"]["image_size"]
    shards = make_shards(args.out / f"shards-{image_size}", args.steps * batch, image_size)
    rows = []
    for precision in args.precisions:
        print(f"[bench] {recipe.label} ({recipe.model}) batch {batch} x {args.steps} steps, {precision}", flush=True)
        name = f"{recipe.label}_{precision}"
        peer = run_peer(peer_python, shards, recipe, batch, args, precision, args.out / f"open_clip_{name}.log")
        ours = run_ours(
            shards, recipe, batch, args, precision, args.out / f"tessera_{name}", args.out / f"tessera_{name}.log"
        )
        row = {
            "recipe": recipe.label,
            "model": recipe.model,
            "model_cfg": cfg,
            "batch_size": batch,
            "precision": precision,
            "open_clip_precision": PEER_PRECISION[precision],
            "flops_per_sample": flops,
            "open_clip_params": params,  # counted here, on the model built from the same config
            **{s: summary(r, batch, args.warmup, flops, mm[precision]) for s, r in zip(SYSTEMS, (peer, ours))},
        }
        row["ratio"] = row["tessera"]["samples_per_s"] / row["open_clip"]["samples_per_s"]
        rows.append(row)
    return rows


def flop_unit(cuda: bool) -> tuple[str, float]:
    return ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)


def print_header(args, device: str, features: dict[str, bool], mm: dict[str, float], results: list[dict]) -> None:
    unit, scale = flop_unit(args.cuda)
    print(f"\n{args.steps} steps (first {args.warmup} left out), {args.workers} loader worker(s), {device}")
    print("CPU features: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in features.items()))
    print("torch.mm rate: " + ", ".join(f"{p} {r / scale:.1f} {unit}" for p, r in mm.items()))
    for r in {r["recipe"]: r for r in results}.values():
        ours = {x["tessera"]["params"] for x in results if x["recipe"] == r["recipe"]}
        same = "same" if ours == {r["open_clip_params"]} else "MISMATCH"
        print(
            f"{r['recipe']} ({r['model']}), batch {r['batch_size']}: "
            f"{r['flops_per_sample'] / 1e9:.3f} GFLOP per sample per step; parameters: "
            f"open_clip {r['open_clip_params']:,}, tessera {', '.join(f'{n:,}' if n else '?' for n in ours)} ({same})"
        )


def print_table(results: list[dict], cuda: bool) -> None:
    unit, scale = flop_unit(cuda)
    heads = ["recipe", "precision", "open_clip samples/s", "tessera samples/s", "ratio", f"tessera {unit}", "% of mm"]
    heads += ["1st step oc (s)", "tessera (s)", "ratio", "wait oc", "wait tessera"]
    print("  ".join(f"{h:>{max(len(h), 9)}}" if i > 1 else f"{h:<16}" for i, h in enumerate(heads)))
    for r in results:
        oc, ours = r["open_clip"], r["tessera"]
        cells = [
            r["recipe"],
            f"{r['precision']}/{r['open_clip_precision']}",
            f"{oc['samples_per_s']:.2f}",
            f"{ours['samples_per_s']:.2f}",
            f"{r['ratio']:.2f}x",
            f"{ours['flop_per_s'] / scale:.2f}",
            f"{100 * ours['fraction_of_mm']:.1f}%",
            f"{oc['first_step_s']:.1f}",
            f"{ours['first_step_s']:.1f}",
            f"{ours['first_step_s'] / oc['first_step_s']:.2f}x",
            f"{100 * oc['data_wait']:.1f}%",
            f"{100 * ours['data_wait']:.1f}%",
        ]
        print(
            "  ".join(f"{c:>{max(len(h), 9)}}" if i > 1 else f"{c:<16}" for i, (c, h) in enumerate(zip(cells, heads)))
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="the open_clip config of the `model` recipe")
    parser.add_argument("--recipes", nargs="+", default=["model", "demo"], choices=["model", "demo"])
    parser.add_argument(
        "--batch-size", type=int, help="per-rank batch of every recipe; default: 32 for `model`, 128 for `demo`"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="leading steps left out of the rate")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--precisions", nargs="+", choices=sorted(PEER_PRECISION), help="default: fp32, and bf16 where it is native"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_train")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    import torch

    from tessera.train.components.precision import native_precision

    args.cuda = torch.cuda.is_available()
    native_bf16 = native_precision() == "bf16"
    if args.precisions is None:
        args.precisions = ["fp32", "bf16"] if native_bf16 else ["fp32"]
        if not native_bf16:
            print("[bench] fp32 only: no GPU, and this CPU has neither AMX nor AVX512-BF16 (bf16 would be emulated)")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    peer_python = ensure_peer_venv()
    device = torch.cuda.get_device_name() if args.cuda else f"CPU x{os.cpu_count()}"
    features = cpu_features()
    mm = mm_rates(args.cuda, native_bf16)
    recipes = {"model": named_recipe(args.model), "demo": DEMO}
    results = [row for key in args.recipes for row in bench_recipe(recipes[key], args, peer_python, mm)]

    print_header(args, device, features, mm, results)
    print_table(results, args.cuda)
    doc = {
        "steps": args.steps,
        "warmup": args.warmup,
        "workers": args.workers,
        "device": device,
        "cpu_features": features,
        "mm_flop_per_s": mm,
        "results": results,
    }
    (args.out / "results.json").write_text(json.dumps(doc, indent=2))
    plot(results, args, args.out / "throughput.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'throughput.png'}")
    return 0


def plot(results: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("samples_per_s", 1, "samples/s (steady)"),
        ("fraction_of_mm", 100, "% of torch.mm rate (same precision)"),
        ("first_step_s", 1, "time to first step (s)"),
        ("data_wait", 100, "% of step waiting for data"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    labels = [f"{r['recipe']}\n{r['precision']}" for r in results]
    for ax, (key, scale, title) in zip(axes.flat, panels):
        for i, system in enumerate(SYSTEMS):
            xs = [j + (i - 0.5) * 0.4 for j in range(len(results))]
            ax.bar(xs, [scale * r[system][key] for r in results], width=0.4, label=system)
        ax.set_xticks(range(len(results)), labels)
        ax.set_title(title, fontsize=10)
        if key == "samples_per_s":
            ax.set_yscale("log")  # the recipes are orders of magnitude apart
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"training, {args.steps} steps (first {args.warmup} left out): open_clip_train vs Tessera")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
