"""Time to the first training step: Tessera's pretraining vs open_clip's `open_clip_train.main`, side by side.

What a user waits for between pressing enter and the first optimizer step: interpreter start, imports,
config, model build, the DeepSpeed engine, loader workers and the first batch, and the first step itself.
Each run is launched fresh; the clock starts just before the launch and stops at the first step's record:
- open_clip_train: its first `Train Epoch: 0 [...]` log line (read as it is printed, `--log-every-n-steps 1`);
- Tessera: the `time` of the first line of `metrics.jsonl` (`train.log_every=1`).
Both train the same open_clip model config on the same jpg+txt shards with the same batch, one loader worker,
fp32, on this machine's CPU (or GPU). Two more rows time the demo recipes, `configs/demo.yaml` and
`configs/demo-joint.yaml` (image, text, audio and graphs from five sources), on their own data when it exists.
The runs alternate (peer, ours, demos, peer, ...) so that drift of the machine's speed hits all rows alike.

open_clip_train needs `open_clip_torch[training]`, which pins webdataset <= 0.2.86, so it runs from a venv of
its own (`.venv-openclip`, made on first use; see scripts/bench_train.py).

    python scripts/bench_startup.py                # ViT-B-32, batch 32, 3 repeats
    python scripts/bench_startup.py --repeats 5 --model RN50

Writes runs/bench_startup/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_train import PEER_FIRST_STEP, ensure_peer_venv, make_shards, named_recipe, ours_overrides, peer_command
from benchlib import first_logged_step, launch

from tessera.train.recipes.load import merge_overrides

ROOT = Path(__file__).resolve().parents[1]


def peer_first_step(python: Path, shards: str, args, log: Path) -> float:
    cmd = peer_command(python, shards, args.model, args.batch_size, 2 * args.batch_size, 1, "fp32", args.cuda)
    first = launch(cmd, log, log.parent, first=PEER_FIRST_STEP).first_match
    if first is None:
        raise RuntimeError(f"open_clip_train did not log a first step; see {log}")
    return first


def ours_first_step(args, out_dir: Path, log: Path, config: str | None, overrides: list[str]) -> float:
    fixed = ["train.steps=2", "train.log_every=1", "train.ckpt_every=-1", "train.export=false", "data.val=[]"]
    cmd = [
        sys.executable,
        "-m",
        args.module,
        *(["--config", config] if config else []),
        f"output_dir={out_dir}",
        *merge_overrides(overrides, [*fixed, "eval.classes=null"]),
    ]
    for stale in ("metrics.jsonl", "checkpoints"):
        subprocess.run(["rm", "-rf", str(out_dir / stale)], check=True)
    return first_logged_step(out_dir / "metrics.jsonl", launch(cmd, log, ROOT).started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--module", default="tessera.train.pretrain", help="Tessera's pretraining entry point")
    parser.add_argument(
        "--demo-data",
        type=Path,
        default=ROOT / "runs" / "demo" / "data",
        help="the demo's shards (python -m tessera.data.demo and tessera.data.demo_joint --out ...); "
        "a demo row is skipped when its data is absent",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_startup")
    args = parser.parse_args()
    import open_clip
    import torch

    args.cuda = torch.cuda.is_available()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    image_size = open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]
    shards = make_shards(args.out / "shards", 4 * args.batch_size, image_size)
    peer_python = ensure_peer_venv()
    same = ours_overrides(shards, named_recipe(args.model), args.batch_size, 1, "fp32")
    rows: dict[str, list[float]] = {"open_clip_train": [], "tessera": []}
    demos = {
        name: config
        for name, config, marker in (
            ("tessera demo recipe", "configs/demo.yaml", "sizes.json"),
            ("tessera joint demo", "configs/demo-joint.yaml", "val-joint-000000.tar"),
        )
        if (args.demo_data / marker).is_file()
    }
    rows.update({name: [] for name in demos})
    for i in range(args.repeats):
        rows["open_clip_train"].append(peer_first_step(peer_python, shards, args, args.out / f"open_clip_{i}.log"))
        rows["tessera"].append(ours_first_step(args, args.out / "tessera", args.out / f"tessera_{i}.log", None, same))
        for j, (name, config) in enumerate(demos.items()):
            rows[name].append(ours_first_step(args, args.out / f"demo{j}", args.out / f"demo{j}_{i}.log", config, []))
        print(
            f"[bench] repeat {i + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in rows.items()),
            flush=True,
        )

    device = torch.cuda.get_device_name() if args.cuda else f"CPU x{os.cpu_count()}"
    peer = statistics.median(rows["open_clip_train"])
    print(
        f"\ntime to the first step, {args.model} batch {args.batch_size}, fp32, 1 loader worker, {device}, "
        f"median of {args.repeats}"
    )
    print(f"{'run':<22}{'median (s)':>12}{'min (s)':>10}{'max (s)':>10}{'vs open_clip_train':>20}")
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"{name:<22}{med:>12.1f}{min(values):>10.1f}{max(values):>10.1f}{med / peer:>19.2f}x")
    doc = {
        "model": args.model,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "device": device,
        "seconds": rows,
        "median": {k: statistics.median(v) for k, v in rows.items()},
    }
    (args.out / "results.json").write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
