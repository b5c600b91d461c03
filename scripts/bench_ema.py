"""What the weight EMA (train.ema) costs: step time and peak memory of the demo recipe with and without it.

Each run is `python -m tessera.train.pretrain --config configs/demo.yaml` for a few steps (no evaluation, checkpoint
or export, so that only the steps differ), launched fresh; the variants alternate (off, on, off, on, ...) so that
drift of the machine's speed hits them alike. Measured per run:
- step time: the median over the logged windows after the first (which carries the build and first step) of
  train.batch_size / samples_per_s, from metrics.jsonl;
- peak RSS: the training process's peak resident set (os.wait4's ru_maxrss: the process and the loader workers it
  waited for, whichever peaked higher);
- the average's size, as the run logs it.
Whole-run step times on a shared CPU drift by several percent between runs, more than the EMA costs, so the update
itself is also timed in this process: `WeightEMA.update` over the recipe's model, the median of 50 calls.

    python -m tessera.data.demo --out runs/demo/data      # once (bash scripts/demo.sh does it too)
    python scripts/bench_ema.py                           # 30 steps, 3 repeats
    python scripts/bench_ema.py --steps 60 --repeats 5 train.ema.every=4

Extra arguments are overrides for every run, but train.ema.* ones, which go to the EMA variant (train.ema.decay=0.9999
unless given). Writes runs/bench_ema/results.json.
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
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
EMA_KEYS = "train.ema."
SHADOW = re.compile(r"weight EMA on: .*?([\d.]+) MiB fp32")


def run_once(args, variant: str, extra: list[str], out_dir: Path, log: Path) -> dict:
    fixed = [
        f"output_dir={out_dir}",
        f"train.steps={args.steps}",
        f"train.log_every={args.log_every}",
        "train.ckpt_every=-1",
        "train.export=false",
        "data.val=[]",
        "eval.classes=null",
    ]
    common = [o for o in args.overrides if not o.startswith(EMA_KEYS)]
    cmd = [sys.executable, "-m", "tessera.train.pretrain", "--config", args.config, *fixed, *common, *extra]
    shutil.rmtree(out_dir, ignore_errors=True)
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{variant}: the run failed; see {log}")
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    config = (out_dir / "config.yaml").read_text()
    batch = int(re.search(r"^  batch_size: (\d+)$", config, re.M).group(1))
    step_s = [batch / x["samples_per_s"] for x in lines if x["kind"] == "train"][1:]
    shadow = SHADOW.search(log.read_text())
    return {
        "step_s": statistics.median(step_s),
        "windows": step_s,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "wall_s": wall,
        "shadow_mib": float(shadow.group(1)) if shadow else 0.0,
        "precision": re.search(r"^  precision: (\w+)$", config, re.M).group(1),
    }


def update_ms(args, overrides: list[str]) -> float:
    """The median time of one `WeightEMA.update` over the recipe's model (its trainable parameters), in ms."""
    from tessera.models import build_model
    from tessera.train.components.ema import WeightEMA
    from tessera.train.recipes.load import load_config

    cfg = load_config(args.config, [o for o in args.overrides if not o.startswith(EMA_KEYS)] + overrides)
    model = build_model(cfg.model)
    engine = SimpleNamespace(module=model, optimizer=None, zero_optimization_stage=lambda: 0)
    ema = WeightEMA(engine, cfg.train.ema)
    times = []
    for step in range(1, 51):
        t0 = time.perf_counter()
        ema.update(step)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[5:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_ema")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.config == "configs/demo.yaml" and not (ROOT / "runs/demo/data/sizes.json").is_file():
        parser.error("runs/demo/data is missing: run `python -m tessera.data.demo --out runs/demo/data` first")
    if args.steps < 2 * args.log_every:
        parser.error("--steps must cover at least two logged windows (the first carries the build)")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    ema = [o for o in args.overrides if o.startswith(EMA_KEYS)]
    variants = {
        "ema off": [],
        "ema on": ema if any(o.startswith("train.ema.decay=") for o in ema) else [*ema, "train.ema.decay=0.9999"],
    }
    rows: dict[str, list[dict]] = {name: [] for name in variants}
    for i in range(args.repeats):
        for j, (name, extra) in enumerate(variants.items()):
            rows[name].append(run_once(args, name, extra, args.out / f"run{j}", args.out / f"run{j}_{i}.log"))
        print(
            f"[bench] repeat {i + 1}/{args.repeats}: "
            + ", ".join(
                f"{k} {v[-1]['step_s'] * 1000:.0f} ms/step {v[-1]['peak_rss_mib']:.0f} MiB" for k, v in rows.items()
            ),
            flush=True,
        )

    update = update_ms(args, variants["ema on"])
    summary = {
        name: {
            "step_s": statistics.median(r["step_s"] for r in runs),
            "step_s_min": min(r["step_s"] for r in runs),
            "step_s_max": max(r["step_s"] for r in runs),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "shadow_mib": runs[0]["shadow_mib"],
        }
        for name, runs in rows.items()
    }
    base = summary["ema off"]
    precision = rows["ema off"][0]["precision"]
    print(
        f"\n{args.config}, {args.steps} steps ({args.log_every}-step windows after the first), {precision}, "
        f"CPU x{os.cpu_count()}, median of {args.repeats}"
    )
    print(f"{'variant':<10}{'ms/step':>10}{'min':>8}{'max':>8}{'vs off':>8}", end="")
    print(f"{'peak RSS MiB':>14}{'vs off':>8}{'EMA MiB':>9}")
    for name, s in summary.items():
        print(
            f"{name:<10}{s['step_s'] * 1000:>10.0f}{s['step_s_min'] * 1000:>8.0f}{s['step_s_max'] * 1000:>8.0f}"
            f"{s['step_s'] / base['step_s']:>7.3f}x{s['peak_rss_mib']:>14.0f}"
            f"{s['peak_rss_mib'] / base['peak_rss_mib']:>7.3f}x{s['shadow_mib']:>9.1f}"
        )
    print(f"the update alone: {update:.1f} ms per update ({update / 1000 / base['step_s']:.1%} of a step without it)")
    doc = {
        "config": args.config,
        "update_ms": update,
        "steps": args.steps,
        "log_every": args.log_every,
        "repeats": args.repeats,
        "overrides": args.overrides,
        "variants": variants,
        "precision": precision,
        "cpus": os.cpu_count(),
        "summary": summary,
        "runs": rows,
    }
    (args.out / "results.json").write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
