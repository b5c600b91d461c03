"""The embedded demo dataset: captioned pictures of coloured shapes, made offline in seconds.

Each image shows one shape (6 kinds) in one of 8 colours, small or large, in one of 5 places, on a
random background with noise and JPEG artefacts; its caption says which. Retrieval needs colour,
shape, size and position together: 480 combinations, so chance R@1 on the held-out set is 1/480.

Two training sources use the two common shard layouts: `shapes-txt` is img2dataset-like (jpg + txt),
`shapes-json` is LAION-CLAP-like (webp + json with several `captions`). A few deliberately broken
samples (a truncated JPEG, an empty caption, a duplicate key, a missing image, a pickle member) show
bad-sample accounting at work. The validation shard holds one fresh image of every combination.

    python -m tessera.data.demo --out runs/demo/data
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .make_shards import write_shards

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SIZES = ("small", "large")
POSITIONS = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
BACKGROUNDS = ((128, 128, 128), (90, 110, 130), (170, 160, 140), (60, 80, 70), (120, 90, 100), (200, 200, 215))
TEMPLATES = (
    "a {size} {color} {shape} in the {position}",
    "a photo of a {size} {color} {shape}, {position}",
    "{position}: one {size} {color} {shape}",
    "there is a {color} {shape} in the {position}, and it is {size}",
    "a picture with a {size} {shape} in {color} at the {position}",
)
COMBOS = list(itertools.product(SHAPES, COLORS, SIZES, POSITIONS))
# prompts for zero-shot shape classification: they name the shape only, never the colour, size or position
CLASS_TEMPLATES = ["a {}", "a photo of a {}", "there is a {} in the picture", "a picture with a {}"]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [
            (math.cos(angle + math.pi / 4 + k * math.pi / 2), math.sin(angle + math.pi / 4 + k * math.pi / 2))
            for k in range(4)
        ]
    elif shape == "diamond":
        pts = [(0.75 * math.cos(k * math.pi / 2), math.sin(k * math.pi / 2)) for k in range(4)]
    elif shape == "triangle":
        pts = [
            (math.cos(angle - math.pi / 2 + k * 2 * math.pi / 3), math.sin(angle - math.pi / 2 + k * 2 * math.pi / 3))
            for k in range(3)
        ]
    elif shape == "star":
        pts = [
            (
                (1.0 if k % 2 == 0 else 0.42) * math.cos(angle - math.pi / 2 + k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.42) * math.sin(angle - math.pi / 2 + k * math.pi / 5),
            )
            for k in range(10)
        ]
    else:  # cross
        w = 0.33
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    return [(cx + r * x, cy + r * y) for x, y in pts]


def render(shape: str, color: str, size: str, position: str, rng: random.Random, canvas: int = 64) -> Image.Image:
    background = rng.choice(BACKGROUNDS)
    img = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[position]
    cx = fx * canvas + rng.uniform(-0.05, 0.05) * canvas
    cy = fy * canvas + rng.uniform(-0.05, 0.05) * canvas
    r = canvas * (rng.uniform(0.09, 0.12) if size == "small" else rng.uniform(0.17, 0.21))
    fill = tuple(int(min(255, max(0, c + rng.randint(-20, 20)))) for c in COLORS[color])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.25, 0.25)), fill=fill)
    pixels = np.asarray(img, dtype=np.int16) + np.asarray(
        np.random.default_rng(rng.getrandbits(32)).normal(0, 6, (canvas, canvas, 3)), dtype=np.int16
    )
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def caption(shape: str, color: str, size: str, position: str, rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(shape=shape, color=color, size=size, position=position)


def _encode(img: Image.Image, fmt: str, rng: random.Random) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=rng.randint(70, 95))
    else:
        img.save(buf, format="WEBP", quality=rng.randint(70, 95))
    return buf.getvalue()


def _label(combo) -> bytes:
    """The `cls` member: the shape's index (the classes of classes.json), for few-shot and label experiments."""
    return str(SHAPES.index(combo[0])).encode()


def _txt_samples(n: int, rng: random.Random, start: int):
    for i in range(n):
        combo = rng.choice(COMBOS)
        yield (
            f"t{start + i:07d}",
            {
                "jpg": _encode(render(*combo, rng), "jpg", rng),
                "txt": caption(*combo, rng).encode(),
                "cls": _label(combo),
            },
        )


def _json_samples(n: int, rng: random.Random, start: int):
    for i in range(n):
        combo = rng.choice(COMBOS)
        caps = sorted({caption(*combo, rng) for _ in range(3)})
        meta = {"captions": caps, "shape": combo[0], "color": combo[1], "size": combo[2], "position": combo[3]}
        yield (
            f"j{start + i:07d}",
            {
                "webp": _encode(render(*combo, rng), "webp", rng),
                "json": json.dumps(meta).encode(),
                "cls": _label(combo),
            },
        )


def _broken_samples(rng: random.Random):
    """One of each kind of damage the loader must count and skip (or, for the pickle member, drop)."""
    good = _encode(render("circle", "red", "small", "center", rng), "jpg", rng)
    yield "bad0000001", {"jpg": good[: len(good) // 3], "txt": b"a small red circle in the center"}
    yield "bad0000002", {"jpg": good, "txt": b"   "}
    yield "bad0000003", {"txt": b"a caption without its image"}
    yield "bad0000004", {"jpg": good, "txt": b"a small red circle in the center", "pth": b"\x80\x04K\x01."}
    yield "bad0000003", {"jpg": good, "txt": b"same key as an earlier sample"}


def build(out: str | Path, train_per_source: int = 4000, samples_per_shard: int = 1000, seed: int = 0) -> dict:
    """Write `out/train-txt-*.tar`, `out/train-json-*.tar`, `out/val-*.tar` (with `cls` = shape index) and
    `out/classes.json`; return a summary."""
    out = Path(out)
    rng = random.Random(seed)
    txt = list(_txt_samples(train_per_source, rng, 0))
    broken = list(_broken_samples(rng))  # they replace samples in the middle of the first shard
    mid = min(samples_per_shard, len(txt)) // 2
    txt[mid : mid + len(broken)] = broken
    sizes = write_shards(txt, out, "train-txt", samples_per_shard)
    sizes.update(write_shards(_json_samples(train_per_source, rng, 0), out, "train-json", samples_per_shard))
    val_rng = random.Random(seed + 1)
    val = [
        (
            f"v{i:05d}",
            {
                "jpg": _encode(render(*c, val_rng), "jpg", val_rng),
                "txt": caption(*c, val_rng).encode(),
                "cls": _label(c),
            },
        )
        for i, c in enumerate(COMBOS)
    ]
    sizes.update(write_shards(val, out, "val", len(val)))
    # zero-shot shape classification of the held-out pictures (their `cls` is the shape's index)
    (out / "classes.json").write_text(json.dumps({"classnames": list(SHAPES), "templates": CLASS_TEMPLATES}, indent=1))
    return {"dir": str(out), "shards": sizes, "combinations": len(COMBOS)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tessera.data.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo/data")
    parser.add_argument("--train-per-source", type=int, default=4000)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = build(args.out, args.train_per_source, args.samples_per_shard, args.seed)
    total = sum(summary["shards"].values())
    print(f"demo data: {total} samples in {len(summary['shards'])} shards under {summary['dir']}")


if __name__ == "__main__":
    main()
