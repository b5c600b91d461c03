"""Does the temporal tower read what a frame average cannot? The video tower with the temporal transformer
(CLIP4Clip's seqTransf), with and without reversed clips as negatives (loss.reversal_negatives, "Test of Time"),
against the frame average (meanP), trained alike on the demo's moving shapes, where every caption names the
direction of motion. Two sets of held-out clips: the demo's first clips (`val-video`: the shape travels edge to edge
in the clip, so where it sits early on gives its sense away) and the motion-only clips (`val-motion`: it crosses at a
random speed from a random start, so only the frames' order tells the sense); each is probed apart.

An average of frames is blind to their order. It can tell the axis of motion (the shape's positions spread across
or down the canvas) but not its sense: a clip of a shape moving left, played backwards, is a clip of it moving
right, and averages the same frames. So the sense of motion is where the two towers must part:

- sense: for each eval clip, its own caption with the true direction against the same caption with the opposite
  sense (left/right, up/down): how often the true one scores higher (chance 50%);
- reversal: the clip against itself played backwards, scored with its own caption: how often the clip as it is
  scores higher (ties count half; the frame average ties on every clip, exactly, since the eval frames of a clip
  and of its reversal are the same frames, written losslessly);
- direction: the true direction among all four, with the clip's shape and colour in the prompt (chance 25%);
- axis: whether that pick lies on the true axis (chance 50%);
- text->video R@1 and zero-shot direction over the averaged prompts, as each run's own final evaluation reports.

Each (variant, seed) is one `python -m tessera.train.pretrain --config CONFIG` run (configs/demo-motion.yaml: the
motion-only training clips; configs/demo-video.yaml: the first ones), in turn, alone on the machine; every variant
sees the same data, steps and seeds.

    python scripts/bench_video.py                      # 3 variants x 2 seeds x 400 steps, about 40 minutes on 2 cores
    python scripts/bench_video.py --config configs/demo-video.yaml --variants mean,transformer --seeds 0

Writes runs/bench_video/results.json, table.md and sense.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

from tessera.data.demo_video import COMBOS, DIRECTIONS, FPS, build, encode_video
from tessera.data.video import VideoDecoder, open_container
from tessera.eval.api import load

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
# variant -> its overrides of the recipe
VARIANTS = {
    "mean": ["model.towers.video.temporal=mean", "loss.reversal_negatives=0"],
    "transformer": ["model.towers.video.temporal=transformer", "loss.reversal_negatives=0"],
    "transformer+reversal": ["model.towers.video.temporal=transformer", "loss.reversal_negatives=1.0"],
}
SETS = {"video": "val-video-000000.tar", "motion": "val-motion-000000.tar"}  # the held-out clips probed
# PNG frames in avi: lossless and each frame coded alone, so a clip and its reversal hold exactly the same frames
LOSSLESS = ("avi", "png", "rgb24")
CHANCE = {"sense": 0.5, "reversal": 0.5, "direction": 0.25, "axis": 0.5}


def val_clips(shard: Path) -> list[tuple[tuple[str, str, str], bytes, bytes]]:
    """The eval shard's clips as ((shape, colour, direction), the clip forwards, the clip backwards), decoded and
    written again losslessly (`LOSSLESS`)."""
    out = []
    with tarfile.open(shard) as tar:
        members = {}
        for m in tar.getmembers():
            key, _, suffix = m.name.partition(".")
            if suffix in VideoDecoder.suffixes:
                members[key] = (suffix, tar.extractfile(m).read())
    for key in sorted(members):
        suffix, data = members[key]
        with open_container(data, suffix) as f:
            frames = [frame.to_ndarray(format="rgb24") for frame in f.decode(video=0)]
        combo = COMBOS[int(key.removeprefix("val"))]
        out.append((combo, *(encode_video(f, FPS, "avi", codec=LOSSLESS) for f in (frames, frames[::-1]))))
    return out


def caption(shape: str, color: str, direction: str) -> str:
    return f"a {color} {shape} moving {direction}"


def probe_run(model_dir: Path, clips) -> dict[str, float]:
    """The sense, reversal, direction and axis measures of one exported model on the eval clips."""
    model = load(model_dir)
    decoder = VideoDecoder()
    forward = model.embed(videos=[decoder.decode({"avi": f}) for _, f, _ in clips], progress=False)
    backward = model.embed(videos=[decoder.decode({"avi": b}) for _, _, b in clips], progress=False)
    names = list(DIRECTIONS)
    prompts = [caption(shape, color, d) for (shape, color, _), _, _ in clips for d in names]
    texts = model.embed(texts=prompts, progress=False).view(len(clips), len(names), -1)
    scores_ND = torch.einsum("nd,nkd->nk", forward, texts)
    truth = torch.tensor([names.index(d) for (_, _, d), _, _ in clips])
    opposite = torch.tensor([names.index(OPPOSITE[d]) for (_, _, d), _, _ in clips])
    rows = torch.arange(len(clips))
    true_s, opp_s = scores_ND[rows, truth], scores_ND[rows, opposite]
    own = texts[rows, truth]
    fwd_s, bwd_s = (forward * own).sum(-1), (backward * own).sum(-1)
    tie = (fwd_s - bwd_s).abs() <= 1e-6
    pick = scores_ND.argmax(1)
    horizontal = torch.tensor([DIRECTIONS[n][0] != 0 for n in names])
    return {
        "sense": float(((true_s > opp_s).float() + 0.5 * (true_s == opp_s).float()).mean()),
        "reversal": float(((fwd_s > bwd_s) & ~tie).float().mean() + 0.5 * tie.float().mean()),
        "reversal_ties": float(tie.float().mean()),
        "direction": float((pick == truth).float().mean()),
        "axis": float((horizontal[pick] == horizontal[truth]).float().mean()),
    }


def train(run: Path, config: str, variant: str, seed: int, steps: int, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "tessera.train.pretrain", "--config", config, f"output_dir={run}",
           *VARIANTS[variant], f"seed={seed}", f"train.steps={steps}", f"train.ckpt_every={steps}", *extra]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def run_metrics(run: Path) -> dict[str, float]:
    r = json.loads((run / "eval" / "retrieval.json").read_text())["metrics"]
    z = json.loads(next((run / "eval").glob("zeroshot_*.json")).read_text())["metrics"]
    return {"text_to_video_R@1": r["text_to_video_R@1"], "zeroshot_direction": z["acc1"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/demo-motion.yaml", help="the recipe every variant trains")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--data", default="runs/demo/data", help="the demo's data folder (video shards made if missing)")
    p.add_argument("--out", default="runs/bench_video")
    p.add_argument("--reuse", action="store_true", help="probe runs already trained under --out")
    p.add_argument("overrides", nargs="*", help="more config overrides for every run (key=value)")
    args = p.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    if not all((data / shard).exists() for shard in SETS.values()):
        build(data)
    seeds = [int(s) for s in args.seeds.split(",")]
    clips = {name: val_clips(data / shard) for name, shard in SETS.items()}
    results: dict = {"config": args.config, "steps": args.steps, "seeds": seeds, "overrides": args.overrides,
                     "clips": {name: len(c) for name, c in clips.items()}}  # fmt: skip
    runs = {}
    for variant in variants:
        for seed in seeds:
            run = out / f"{variant}-seed{seed}"
            if not (args.reuse and (run / "model").is_dir()):
                train(run, args.config, variant, seed, args.steps, args.overrides)
            probes = {f"{name}/{k}": v for name, c in clips.items() for k, v in probe_run(run / "model", c).items()}
            runs[f"{variant}-seed{seed}"] = {"variant": variant, "seed": seed, **run_metrics(run), **probes}
    results["runs"] = runs
    measures = ["sense", "reversal", "reversal_ties", "direction", "axis"]
    keys = [f"{name}/{m}" for name in SETS for m in measures] + ["text_to_video_R@1", "zeroshot_direction"]
    chance = {f"{name}/{m}": CHANCE.get(m) for name in SETS for m in measures}
    chance.update({"text_to_video_R@1": 1 / len(clips["motion"]), "zeroshot_direction": 0.25})
    summary = {}
    for variant in variants:
        mine = [r for r in runs.values() if r["variant"] == variant]
        summary[variant] = {k: statistics.mean(r[k] for r in mine) for k in keys}
    results["mean_over_seeds"], results["chance"] = summary, chance
    title = (
        f"video tower, {args.config}, {args.steps} steps, seeds {seeds}; probes on each held-out set "
        f"({', '.join(f'{n}: {len(c)} clips' for n, c in clips.items())}); R@1 and zero-shot: the run's own data.val"
    )
    header = "| measure | " + " | ".join(variants) + " | chance |"
    lines = [title + " (mean over seeds; each seed in results.json)", "", header, "|---" * (len(variants) + 2) + "|"]
    for k in keys:
        cells = [f"{100 * summary[v][k]:.1f}%" for v in variants]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {'' if chance[k] is None else f'{100 * chance[k]:.1f}%'} |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text(table + "\n")
    plot(runs, variants, out / "sense.png", args.steps)


def plot(runs: dict, variants: list[str], path: Path, steps: int) -> None:
    """One panel per held-out set: each variant's probes (bars: the mean over seeds; dots: each seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = ["sense", "reversal", "direction", "axis"]
    fig, axes = plt.subplots(1, len(SETS), figsize=(6 * len(SETS), 3.5), sharey=True)
    width = 0.8 / len(variants)
    for ax, name in zip(axes, SETS):
        for j, variant in enumerate(variants):
            mine = [r for r in runs.values() if r["variant"] == variant]
            means = [100 * np.mean([r[f"{name}/{m}"] for r in mine]) for m in measures]
            ax.bar(np.arange(len(measures)) + j * width, means, width, label=variant)
            for i, m in enumerate(measures):  # each seed as a dot
                ys = [100 * r[f"{name}/{m}"] for r in mine]
                ax.scatter([i + j * width] * len(mine), ys, color="k", s=8, zorder=3)
        for i, m in enumerate(measures):
            label = "chance" if i == 0 else None
            ax.plot([i - 0.5 * width, i + (len(variants) - 0.5) * width], [100 * CHANCE[m]] * 2, "k--", lw=0.8,
                    label=label)  # fmt: skip
        ax.set_xticks(np.arange(len(measures)) + width * (len(variants) - 1) / 2, measures)
        ax.set_title(f"held-out {name} clips, {steps} steps")
    axes[0].set_ylabel("% of eval clips")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
