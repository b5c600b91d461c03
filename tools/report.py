"""A look at a run without tensorboard: its training curves and evaluations, from OUTPUT_DIR/metrics.jsonl, in one
PNG.

    tessera report runs/demo                 (writes runs/demo/report.png)
    tessera report runs/demo --out curves.png

The panels: the loss of each pair (and the total), the learning rate, each pair's temperature, samples per second,
the share of the step time spent waiting for data, the bad samples skipped so far by reason, the gradient norm, and
each evaluation's R@1 per retrieval direction (and zero-shot accuracy per modality) over steps; an evaluation of the
weights' moving average (eval_ema) dashed beside the trained weights'. A line cut short by a crash is left out and
counted. Needs neither torch nor tensorboard.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from tessera.config import UserError
from tessera.durable import atomic_write_bytes

PANELS = (
    ("loss", "loss per pair"),
    ("lr", "learning rate"),
    ("temperature", "temperature per pair"),
    ("samples_per_s", "samples/s (all ranks)"),
    ("data_wait", "share of step time waiting for data"),
    ("skipped", "bad samples skipped (so far)"),
    ("grad_norm", "gradient norm"),
    ("R@1", "eval R@1 per direction"),
    ("acc1", "eval zero-shot acc@1 per modality"),
)


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """The lines of RUN_DIR/metrics.jsonl, and how many were left out (cut short, or not a record)."""
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run directory")
    if not path.is_file():
        raise UserError(f"{run_dir} holds no metrics.jsonl: is it a run's output_dir? (rank 0 writes it)")
    lines, bad = [], 0
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            line = json.loads(text)
            if isinstance(line, dict) and isinstance(line.get("step"), int) and isinstance(line.get("kind"), str):
                lines.append(line)
                continue
        except json.JSONDecodeError:
            pass
        bad += 1
    return lines, bad


def series(lines: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Panel -> curve name -> (step, value) points."""
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))

    def add(panel: str, name: str, step: int, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[panel][name].append((step, float(value)))

    for line in lines:
        step, kind = line["step"], line["kind"]
        if kind == "train":
            for key, value in line.items():
                if key == "loss" or key.startswith("loss/"):
                    add("loss", key.removeprefix("loss/") if "/" in key else "total", step, value)
                elif key.startswith("temperature/"):
                    add("temperature", key.removeprefix("temperature/"), step, value)
                elif key in ("lr", "samples_per_s", "data_wait", "grad_norm"):
                    add(key, key, step, value)
            skipped = (line.get("data") or {}).get("skipped") or {}
            add("skipped", "total", step, sum(v for v in skipped.values() if isinstance(v, (int, float))))
            for reason, count in skipped.items():
                add("skipped", reason, step, count)
        elif kind.startswith("eval"):
            weights = "" if kind == "eval" else f" ({kind.removeprefix('eval_')})"
            for key, value in (line.get("metrics") or {}).items():
                # open_clip's names (`image_retrieval_recall@1`) repeat ours (`text_to_image_R@1`): ours only
                if key.endswith("_R@1"):
                    add("R@1", key.removesuffix("_R@1") + weights, step, value)
            for modality, result in (line.get("zeroshot") or {}).items():
                add("acc1", modality + weights, step, (result.get("metrics") or {}).get("acc1"))
    return out


def plot(curves: dict[str, dict[str, list[tuple[int, float]]]], title: str, out: Path) -> list[str]:
    """Draw the panels that have points into `out` (PNG, written atomically); the panels drawn."""
    shown = [(key, label) for key, label in PANELS if curves.get(key)]
    if not shown:
        raise UserError(f"{title}: metrics.jsonl holds no training or evaluation line to plot yet")
    cols = 3
    rows = (len(shown) + cols - 1) // cols
    fig = Figure(figsize=(5.2 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (key, label) in zip(axes, shown):
        for name, points in sorted(curves[key].items()):
            xs, ys = zip(*points)
            style = "--" if name.endswith(")") else "-"  # an evaluation of other weights (eval_ema)
            ax.plot(xs, ys, style, marker="o" if len(xs) < 12 else None, markersize=3, label=name)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(curves[key]) > 1 or key in ("R@1", "acc1"):
            ax.legend(fontsize=7)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(out, buf.getvalue())
    return [key for key, _ in shown]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tessera report",
        description="Plot a run's training curves and evaluations from its metrics.jsonl into one PNG.",
    )
    parser.add_argument("run_dir", type=Path, help="the run's output_dir (holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="the PNG to write (default: RUN_DIR/report.png)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or args.run_dir / "report.png"
    try:
        lines, bad = read_metrics(args.run_dir)
        if out.parent and not out.parent.is_dir():
            raise UserError(f"--out {out}: the folder {out.parent} does not exist")
        shown = plot(series(lines), str(args.run_dir), out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    steps = [x["step"] for x in lines if x["kind"] == "train"]
    print(f"report: {out} ({len(lines)} lines, up to step {max(steps, default=0)}; panels: {', '.join(shown)})")
    if bad:
        print(f"left out: {bad} line(s) of metrics.jsonl that are not records (cut short by a crash?)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
