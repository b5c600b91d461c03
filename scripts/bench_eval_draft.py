"""Whether evaluation may decode JPEGs at a DCT scale (PIL's draft), as training does: retrieval of a trained model on
held-out pictures stored larger than its input, with evaluation's full decode and with the draft, side by side; and
the decode + transform rate of each.

Training decodes a JPEG at least twice its crop's size at 1/2, 1/4 or 1/8 scale (`ImageDecoder.decode`);
evaluation decodes at full size. Here the evaluation transform is given a `decode_size` of its input (the draft then
keeps the shorter side at least that large, so the resize and centre crop that follow see as many pixels as they
keep). The pictures: the demo's held-out shard, each image upscaled --scale times (bicubic) and stored as a JPEG of
quality 90, as a web image larger than the tower's input is. The model: an export (`runs/demo/model`, which
`bash scripts/demo.sh` writes).

    python scripts/bench_eval_draft.py --model runs/demo/model --val data/demo/val-000000.tar

Writes --out/results.json and table.md.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def upscale_shard(src: str, out: Path, scale: int) -> str:
    from PIL import Image

    from tessera.data.make_shards import write_shards
    from tessera.data.shards import iter_raw_samples
    from tessera.data.stats import SampleStats

    def samples():
        for s in iter_raw_samples([src], SampleStats()):
            if "__bad__" in s or "jpg" not in s:
                continue
            try:
                img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
            except OSError:
                continue  # the demo's deliberately broken picture
            big = img.resize((img.width * scale, img.height * scale), Image.BICUBIC)
            buf = io.BytesIO()
            big.save(buf, "JPEG", quality=90)
            members = {k: v for k, v in s.items() if not k.startswith("__") and k != "jpg"}
            yield s["__key__"], {**members, "jpg": buf.getvalue()}

    write_shards(samples(), out, "val-big", 100_000)
    return str(out / "val-big-000000.tar")


def with_draft(model, on: bool):
    """`model.transforms` with the image evaluation transform's `decode_size` set (on) or absent (off)."""
    transforms = model.transforms

    def patched(is_train=False, compact=False):
        out = transforms(is_train, compact=compact)
        if not is_train and "image" in out:
            size = model.towers["image"].preprocess_cfg.size
            side = size if isinstance(size, int) else min(size)
            if on:
                out["image"].decode_size = (side, side)
            elif hasattr(out["image"], "decode_size"):
                del out["image"].decode_size
        return out

    model.transforms = patched
    return model


def decode_rate(model, shard: str, on: bool, repeats: int = 3) -> float:
    from tessera.data.image import ImageDecoder
    from tessera.data.shards import iter_raw_samples
    from tessera.data.stats import SampleStats

    tf = with_draft(model, on).transforms(False, compact=True)["image"]
    raw = [s for s in iter_raw_samples([shard], SampleStats()) if "jpg" in s]
    dec = ImageDecoder()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in raw:
            tf(dec.decode_for(s, tf))
        best = max(best, len(raw) / (time.perf_counter() - t0))
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "demo" / "model"))
    p.add_argument("--val", required=True, help="a held-out shard with jpg and captions (the demo's val-000000.tar)")
    p.add_argument("--scale", type=int, default=4, help="how many times larger the stored pictures are")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_eval_draft"))
    args = p.parse_args(argv)
    import torch

    from tessera.data import SourceConfig
    from tessera.eval.retrieval import evaluate_pairs
    from tessera.models.export import load_model

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shard = upscale_shard(args.val, out / "shards", args.scale)
    rows = {}
    for on in (False, True):
        model = with_draft(load_model(args.model).eval(), on)
        result = evaluate_pairs(model, [SourceConfig(shard)], [("image", "text")], 100)
        metrics = {k: v for k, v in result["metrics"].items() if "R@1" in k and "_to_" in k}
        rows["draft" if on else "full decode"] = {"metrics": metrics, "rate": decode_rate(model, shard, on)}
    (out / "results.json").write_text(json.dumps({"scale": args.scale, "rows": rows}, indent=2))
    keys = sorted(next(iter(rows.values()))["metrics"])
    md = [
        f"Evaluation on the demo's held-out pictures stored {args.scale}x larger (JPEG q90), model {args.model}:",
        "",
        "| evaluation decode | " + " | ".join(keys) + " | decode + transform (samples/s, 1 thread) |",
        "|---|" + "---|" * (len(keys) + 1),
    ]
    for name, row in rows.items():
        md.append(f"| {name} | " + " | ".join(f"{row['metrics'][k]:.4f}" for k in keys) + f" | {row['rate']:.0f} |")
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
