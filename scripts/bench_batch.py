"""The largest contrastive batch that completes one exact optimizer step within a memory limit: Tessera's two-pass
step (`train.chunk_size`) against open_clip_train's `--accum-freq`, on the same model, side by side in one run.

Both systems train one optimizer step of a contrastive batch of B samples from jpg+txt shards, one loader worker,
bf16 compute (DeepSpeed bf16 vs `amp_bf16`), their towers running C samples at a time: Tessera with
`train.batch_size=B train.chunk_size=C`, open_clip with `--batch-size C --accum-freq B/C`. open_clip's loss
materialises the B x B logits once per micro-batch; Tessera's tiled ring loss never does. Each run is a process of
its own; a watchdog sums the proportional set size (PSS) of its process tree every 0.2 s and stops it above the
limit. A batch size "completes" when the process exits cleanly within the limit and logs its step.

Recipes: `small` (the demo's towers shrunk: 32 px ModifiedResNet, 1-layer text; a step of 262,144 fits in
minutes) and `demo` (configs/demo.yaml's towers). open_clip builds the same model from an `open_clip_config.json`
(`--model local-dir:...`); the parameter counts are checked equal. `exact` marks Tessera rows whose recipe and
chunk passed a gradient check: the two-pass step against the same model run over the same chunks in one autograd
graph (fp32, every parameter, rtol 1e-5), done here in-process at B = 256. open_clip rows are not checked.

    python scripts/bench_batch.py --quick   # small recipe ceiling search and the chunked/unchunked ratio, < 25 min
    python scripts/bench_batch.py           # longer ladders, and the demo recipe up to 262,144 (hours)
    python scripts/bench_batch.py --recipes demo --tessera-batches 65536 --open-clip-batches 16384 32768

Each system climbs its ladder of batch sizes until a run goes over the memory limit or fails. --quick runs the
small recipe's steps that fit in 25 minutes: open_clip 8,192, 16,384 and 65,536 (over a 24 GiB limit within about
two minutes; 32,768 completes but its step recomputes the 32,768^2 loss 32 times, about 27 minutes here) and
Tessera up to 131,072 (262,144 takes about 20 minutes). The ceilings come from fits of peak memory against B over
the completed steps: quadratic for open_clip, linear for Tessera. A run still going after --timeout seconds is
stopped: it counts as not completed, its peak memory so far is kept, and the ladder goes on.

Writes runs/bench_batch/results.json, table.md and memory.png (peak memory against B).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_train import ensure_peer_venv, make_shards  # noqa: E402
from benchlib import meminfo_gib  # noqa: E402

GIB = 2**30
TEXT_BASE = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}  # ViT-B-32's
RECIPES = {
    "small": {
        "embed_dim": 64,
        "image": {"layers": [1, 1, 1, 1], "width": 8, "image_size": 32, "head_width": 16},
        "text": {"context_length": 16, "width": 64, "heads": 2, "layers": 1},
    },
    "demo": {  # configs/demo.yaml
        "embed_dim": 128,
        "image": {"layers": [1, 1, 1, 1], "width": 16, "image_size": 64, "head_width": 32},
        "text": {"context_length": 32, "width": 128, "heads": 4, "layers": 2},
    },
}


def tessera_model(recipe: str) -> dict:
    r = RECIPES[recipe]
    return {
        "embed_dim": r["embed_dim"],
        "towers": {
            "image": {"encoder": "open_clip_image", "model": "RN50", "overrides": r["image"]},
            "text": {"encoder": "open_clip_text", "model": "ViT-B-32", "overrides": r["text"]},
        },
    }


def open_clip_dir(recipe: str, out: Path) -> Path:
    """An open_clip model directory (config only: open_clip initialises the weights) for `--model local-dir:`."""
    r = RECIPES[recipe]
    vision = {**r["image"], "patch_size": None}
    cfg = {"model_cfg": {"embed_dim": r["embed_dim"], "vision_cfg": vision, "text_cfg": {**TEXT_BASE, **r["text"]}}}
    path = out / f"open_clip_{recipe}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    return path


def parameter_counts(recipe: str, out: Path) -> tuple[int, int]:
    import logging

    import open_clip

    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded": none are wanted

    from tessera.config import from_dict
    from tessera.models import ModelConfig, build_model

    ours = build_model(from_dict(ModelConfig, tessera_model(recipe), "model"))
    peer = open_clip.create_model(f"local-dir:{open_clip_dir(recipe, out)}")
    return sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in peer.parameters())


def gradient_check(recipe: str, batch: int = 256, chunk: int = 64) -> float:
    """The largest relative gradient difference, over every parameter, between the two-pass step and the same
    model run over the same chunks in one autograd graph (fp32)."""
    import copy

    import torch

    from tessera.config import from_dict
    from tessera.models import ModelConfig, build_model
    from tessera.train.components.objectives import ContrastiveObjective
    from tessera.train.components.steps import TwoPassStep
    from tessera.train.recipes.config import LossConfig

    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, tessera_model(recipe), "model")).train()
    size, context = RECIPES[recipe]["image"]["image_size"], RECIPES[recipe]["text"]["context_length"]
    g = torch.Generator().manual_seed(1)
    batch_ = {
        "__key__": [str(i) for i in range(batch)],
        "image": torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8),
        "text": torch.randint(1, 49000, (batch, context), generator=g),
    }
    objective = ContrastiveObjective(model.pairs, LossConfig())
    reference, chunked = model, copy.deepcopy(model)
    outs = [
        reference({k: v[s : s + chunk] for k, v in batch_.items() if k != "__key__"}) for s in range(0, batch, chunk)
    ]
    features = {m: torch.cat([o["features"][m] for o in outs]) for m in outs[0]["features"]}
    objective.loss({"features": features, "logit_scale": outs[0]["logit_scale"]}, batch_)[0]["loss"].backward()

    class Engine:
        device = torch.device("cpu")

        def __call__(self, b):
            return chunked(b)

        def backward(self, loss, scale_wrt_gas=True):
            loss.backward()

        def step(self):
            pass

    TwoPassStep(objective, chunked, chunk, 1)(Engine(), batch_)
    got = dict(chunked.named_parameters())
    worst = 0.0
    for name, p in reference.named_parameters():
        diff = (got[name].grad - p.grad).abs().max().item()
        worst = max(worst, diff / max(p.grad.abs().max().item(), 1e-12))
    return worst


class Watchdog:
    """Peak PSS of a process tree, sampled; kills the tree (its process group) above `limit` bytes."""

    def __init__(self, proc: subprocess.Popen, limit: int):
        self.proc, self.limit, self.peak, self.killed = proc, limit, 0, False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _tree(self) -> list[int]:
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    todo += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
            except OSError:
                pass
        return pids

    def _pss(self) -> int:
        total = 0
        for pid in self._tree():
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
            except OSError:
                pass
        return total

    def _watch(self) -> None:
        while self.proc.poll() is None:
            pss = self._pss()
            self.peak = max(self.peak, pss)
            if pss > self.limit:
                self.killed = True
                os.killpg(self.proc.pid, signal.SIGKILL)
                return
            time.sleep(0.2)


def run_limited(cmd: list[str], log: Path, limit: int, cwd: Path, timeout: float) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        dog = Watchdog(proc, limit)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        dog.thread.join()
    wall = time.perf_counter() - t0
    reason = (
        "over the memory limit" if dog.killed else ("timed out" if rc == -9 else (None if rc == 0 else f"exit {rc}"))
    )
    return {"rc": rc, "wall_s": wall, "peak_rss_bytes": dog.peak, "reason": reason}


def run_tessera(recipe, shards, batch, chunk, steps, out: Path, limit, timeout) -> dict:
    run_dir = out / f"tessera_{recipe}_{batch}_{chunk}"
    cmd = [
        sys.executable,
        "-m",
        "tessera.train.pretrain",
        f"output_dir={run_dir}",
        f"model={json.dumps(tessera_model(recipe))}",
        f"data.train={shards}",
        "data.val=[]",
        "data.num_workers=1",
        f"train.steps={steps}",
        f"train.batch_size={batch}",
        f"train.chunk_size={chunk if chunk < batch else 0}",
        "train.precision=bf16",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.ckpt_every=-1",
        "train.export=false",
        "deepspeed.zero_stage=0",
        "seed=0",
    ]
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    res = run_limited(cmd, out / f"{run_dir.name}.log", limit, ROOT, timeout)
    metrics = run_dir / "metrics.jsonl"
    steps_done = []
    if metrics.is_file():
        steps_done = [json.loads(x) for x in metrics.read_text().splitlines()]
        steps_done = [batch / x["samples_per_s"] for x in steps_done if x.get("kind") == "train"]
    return {**res, "step_seconds": steps_done}


def run_open_clip(python, recipe, shards, batch, chunk, steps, out: Path, limit, timeout) -> dict:
    accum = max(1, batch // chunk)
    micro = min(chunk, batch)
    flags = {
        "train-data": shards,
        "dataset-type": "webdataset",
        "train-num-samples": batch * steps,
        "model": f"local-dir:{open_clip_dir(recipe, out)}",
        "batch-size": micro,
        "accum-freq": accum,
        "epochs": 1,
        "workers": 1,
        "precision": "amp_bf16",
        "lr": "5e-4",
        "wd": 0.2,
        "warmup": 1,
        "log-every-n-steps": 1,
        "logs": str(out / "open_clip_logs"),
        "name": f"{recipe}_{batch}_{chunk}_{time.time_ns()}",
        "seed": 0,
        "device": "cpu",
    }
    cmd = [str(python), "-m", "open_clip_train.main", *(x for k, v in flags.items() for x in (f"--{k}", str(v)))]
    log = out / f"open_clip_{recipe}_{batch}_{chunk}.log"
    res = run_limited(cmd, log, limit, out, timeout)
    times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", log.read_text())]
    if res["reason"] is None and len(times) < steps:
        res["reason"] = f"logged {len(times)} of {steps} steps"
    return {**res, "step_seconds": times}


def row(system, recipe, batch, chunk, res, exact: bool) -> dict:
    completed = res["reason"] is None and bool(res["step_seconds"])
    sps = statistics.median(res["step_seconds"]) if completed else None
    return {
        "system": system,
        "recipe": recipe,
        "batch": batch,
        "chunk": chunk,
        "completed": completed,
        "exact": exact and completed,
        "peak_rss_bytes": res["peak_rss_bytes"],
        "seconds_per_step": sps,
        "samples_per_s": batch / sps if sps else None,
        "wall_s": round(res["wall_s"], 1),
        "reason": res["reason"],
    }


def print_row(r: dict) -> None:
    done = f"{r['seconds_per_step']:9.1f}  {r['samples_per_s']:9.0f}" if r["completed"] else f"{'-':>9}  {'-':>9}"
    print(
        f"{r['system']:<10}{r['recipe']:<7}{r['batch']:>9,}{r['chunk']:>7}  {str(r['completed']):<6}"
        f"{r['peak_rss_bytes'] / GIB:8.2f}  {done}  {r['reason'] or ''}",
        flush=True,
    )


def fit_ceiling(rows, system, recipe, limit, power) -> int | None:
    """The batch at which the least-squares fit m(B) = c0 + c1 * B**power of the completed rows' peak memory
    reaches the limit: power 1 for Tessera (features, inputs), 2 for open_clip (its B x B logits dominate)."""
    pts = [
        (r["batch"], r["peak_rss_bytes"])
        for r in rows
        if r["system"] == system and r["recipe"] == recipe and r["completed"] and r["peak_rss_bytes"] > 0
    ]
    if len(pts) < 2:
        return None
    import numpy as np

    b, m = np.array(pts, dtype=float).T
    (c0, c1), *_ = np.linalg.lstsq(np.stack([np.ones_like(b), b**power], 1), m, rcond=None)
    return int(((limit - c0) / c1) ** (1 / power)) if c1 > 0 and limit > c0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small recipe's ceiling search and the ratio only")
    parser.add_argument("--chunk", type=int, default=1024, help="samples per tower forward (both systems)")
    parser.add_argument(
        "--limit-gib",
        type=float,
        default=None,
        help="memory limit of one run (default: 24 GiB, or less if this machine has less available)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds before a run is stopped and counts as not completed (default: 600 with --quick, else 4 hours); "
        "a run stopped so still shows its peak memory, and the ladder goes on",
    )
    parser.add_argument("--recipes", nargs="+", default=["small", "demo"], choices=sorted(RECIPES))
    parser.add_argument("--tessera-batches", type=int, nargs="+", help="Tessera's ladder (default: the mode's)")
    parser.add_argument("--open-clip-batches", type=int, nargs="+", help="open_clip's ladder (default: the mode's)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_batch")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    available = meminfo_gib("MemAvailable") - 1.5
    limit_gib = args.limit_gib or min(24.0, available)
    limit = int(limit_gib * GIB)
    print(f"[bench] memory limit per run: {limit_gib:.1f} GiB (MemAvailable less 1.5 GiB, at most 24)", flush=True)
    peer = ensure_peer_venv()
    t_start = time.perf_counter()

    if args.quick:  # the steps that fit 25 minutes; the fits of peak memory against B give both ceilings
        plan = {"small": {"open_clip": [8192, 16384, 65536], "tessera": [8192, 65536, 131072]}}
    else:
        plan = {
            "small": {"open_clip": [8192, 16384, 32768, 65536], "tessera": [8192, 32768, 131072, 262144, 524288]},
            "demo": {"open_clip": [16384, 32768, 65536], "tessera": [16384, 65536, 262144]},
        }
    plan = {recipe: plan[recipe] for recipe in args.recipes if recipe in plan}
    for recipe in plan:
        plan[recipe]["open_clip"] = args.open_clip_batches or plan[recipe]["open_clip"]
        plan[recipe]["tessera"] = args.tessera_batches or plan[recipe]["tessera"]
    cap = args.timeout if args.timeout is not None else (600 if args.quick else 4 * 3600)
    checks, params = {}, {}
    for recipe in plan:
        ours_n, peer_n = parameter_counts(recipe, out)
        params[recipe] = {"tessera": ours_n, "open_clip": peer_n}
        if ours_n != peer_n:
            raise SystemExit(f"{recipe}: Tessera builds {ours_n:,} parameters, open_clip {peer_n:,}: not one model")
        checks[recipe] = gradient_check(recipe)
        print(
            f"[bench] {recipe}: {ours_n:,} parameters in both; two-pass vs one graph, worst relative gradient "
            f"difference {checks[recipe]:.1e}",
            flush=True,
        )

    rows: list[dict] = []
    print(
        f"\n{'system':<10}{'recipe':<7}{'batch':>9}{'chunk':>7}  {'done':<6}{'peak GiB':>8}  {'s/step':>9}  "
        f"{'samples/s':>9}",
        flush=True,
    )
    for recipe, systems in plan.items():
        size = RECIPES[recipe]["image"]["image_size"]
        most = max(max(b) for b in systems.values())
        shards = make_shards(out / f"shards_{size}px_{most}", most, size)
        exact = checks[recipe] <= 1e-5
        # not recorded: a first run builds DeepSpeed's C++ ops where their cache is stale (a compiler taking GiBs)
        (out / "warmup").mkdir(exist_ok=True)
        run_tessera(recipe, shards, 256, args.chunk, 1, out / "warmup", limit, cap)
        for system in ("open_clip", "tessera"):
            for batch in systems[system]:  # up the ladder, until a batch runs out of memory or fails
                if system == "open_clip":
                    res = run_open_clip(peer, recipe, shards, batch, args.chunk, 1, out, limit, cap)
                else:
                    res = run_tessera(recipe, shards, batch, args.chunk, 1, out, limit, cap)
                rows.append(row(system, recipe, batch, args.chunk, res, exact and system == "tessera"))
                print_row(rows[-1])
                if not rows[-1]["completed"] and rows[-1]["reason"] != "timed out":
                    break

    # the second pass's cost: chunked against unchunked steps at a batch that fits both, steady state
    ratio_batch, ratio_chunk, ratio_steps = 1024, 256, 8
    shards = make_shards(out / f"shards_64px_{ratio_batch * ratio_steps}", ratio_batch * ratio_steps, 64)
    ratio = {}
    for chunk in (ratio_batch, ratio_chunk):
        res = run_tessera("demo", shards, ratio_batch, chunk, ratio_steps, out, limit, 3600)
        if res["reason"] is not None:
            raise SystemExit(f"the ratio run (chunk {chunk}) failed: {res['reason']}")
        ratio[chunk] = statistics.median(res["step_seconds"][2:])
    ratio_row = {
        "recipe": "demo",
        "batch": ratio_batch,
        "chunk": ratio_chunk,
        "unchunked_seconds_per_step": ratio[ratio_batch],
        "chunked_seconds_per_step": ratio[ratio_chunk],
        "ratio": ratio[ratio_chunk] / ratio[ratio_batch],
    }
    print(
        f"\n[bench] demo recipe, batch {ratio_batch}: chunks of {ratio_chunk} take {ratio_row['ratio']:.2f}x the "
        f"unchunked step (median of steps 3-{ratio_steps})",
        flush=True,
    )

    ceilings = {}
    for recipe in plan:
        for system, power in (("tessera", 1), ("open_clip", 2)):
            done = [r["batch"] for r in rows if r["system"] == system and r["recipe"] == recipe and r["completed"]]
            ceilings[f"{system}/{recipe}"] = {
                "largest_completed": max(done) if done else None,
                "fitted_at_limit": fit_ceiling(rows, system, recipe, limit, power),
            }
    doc = {
        "limit_bytes": limit,
        "chunk": args.chunk,
        "quick": args.quick,
        "timeout_s": cap,
        "precision": "bf16 (Tessera DeepSpeed bf16, open_clip amp_bf16)",
        "device": f"CPU x{os.cpu_count()}",
        "parameters": params,
        "gradient_check_max_rel_diff": checks,
        "rows": rows,
        "ceilings": ceilings,
        "chunked_vs_unchunked": ratio_row,
        "seconds": round(time.perf_counter() - t_start),
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    (out / "table.md").write_text(markdown(doc))
    print("\n" + markdown(doc))
    _plot(doc, out / "memory.png")
    print(f"wrote {out / 'results.json'}, {out / 'table.md'} and {out / 'memory.png'} ({doc['seconds']} s)")
    return 0


def markdown(doc: dict) -> str:
    lines = [
        f"Memory limit {doc['limit_bytes'] / GIB:.1f} GiB per run, towers in chunks of {doc['chunk']}, "
        f"{doc['precision']}, {doc['device']}.",
        "",
        "| system | recipe | batch | completed | exact | peak memory (GiB) | s/step | samples/s | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        sps = f"{r['seconds_per_step']:.1f}" if r["completed"] else "-"
        rate = f"{r['samples_per_s']:.0f}" if r["completed"] else "-"
        lines.append(
            f"| {r['system']} | {r['recipe']} | {r['batch']:,} | {r['completed']} | {r['exact']} | "
            f"{r['peak_rss_bytes'] / GIB:.2f} | {sps} | {rate} | {r['reason'] or ''} |"
        )
    lines += ["", "| system/recipe | largest completed | fitted batch at the limit |", "|---|---|---|"]
    for key, c in doc["ceilings"].items():
        largest = f"{c['largest_completed']:,}" if c["largest_completed"] else "-"
        fitted = f"{c['fitted_at_limit']:,}" if c["fitted_at_limit"] else "-"
        lines.append(f"| {key} | {largest} | {fitted} |")
    r = doc["chunked_vs_unchunked"]
    lines += [
        "",
        f"Chunked vs unchunked ({r['recipe']} recipe, batch {r['batch']}, chunks of {r['chunk']}): "
        f"{r['chunked_seconds_per_step']:.2f} s vs {r['unchunked_seconds_per_step']:.2f} s per step, "
        f"{r['ratio']:.2f}x.",
    ]
    return "\n".join(lines) + "\n"


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (system, recipe), style in {
        ("tessera", "small"): "o-",
        ("open_clip", "small"): "s-",
        ("tessera", "demo"): "o--",
        ("open_clip", "demo"): "s--",
    }.items():
        pts = [r for r in doc["rows"] if r["system"] == system and r["recipe"] == recipe]
        if not pts:
            continue
        ax.plot([r["batch"] for r in pts], [r["peak_rss_bytes"] / GIB for r in pts], style, label=f"{system} {recipe}")
        for r in pts:
            if not r["completed"]:
                ax.annotate("x", (r["batch"], r["peak_rss_bytes"] / GIB), color="red", ha="center", va="center")
    ax.axhline(doc["limit_bytes"] / GIB, color="grey", ls=":", label="limit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("contrastive batch B (one optimizer step)")
    ax.set_ylabel("peak memory of the run (GiB, PSS)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
