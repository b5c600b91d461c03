"""The embedded demo's videos: the shapes of `tessera.data.demo`, moving. The direction of motion is part of every
caption ("a red circle moving left"). A single frame cannot tell it, and an average of frames shows the axis of
motion (its positions spread across or down the canvas) but not its sense: left from right and up from down take
the frames' order.

Clips are 16 frames at 8 fps, 32 x 32 pixels, written in each container and codec the decoder reads (mp4/H.264,
webm/VP8, avi/MJPEG, mkv/MPEG-4). An eighth of the training clips and every eval clip carry a sound track (the
shape's sound from `demo_joint`), extracted into a `flac` member as `make_shards` does, so the eval set also
scores the emergent video-audio pair. A few broken clips (truncated, empty, not a video) show bad-sample counting.

Motion-only clips (`motion-*.tar`, `val-motion-000000.tar`) tell their direction by the frames' order alone: the
shape crosses the whole canvas, from beyond one edge to beyond the other, at a random speed and from a random start
time, so where it sits in any frame says nothing of where it is going, and the frames' average shows only the axis
(a streak across or down the canvas), never the sense.

Shards written: `videos-*.tar` (mp4/webm/avi/mkv + txt), `val-video-000000.tar` (one clip per shape, colour and
direction, with its sound as `flac` and its direction as `cls`), the motion-only `motion-*.tar` and
`val-motion-000000.tar` (the same layout, no sound), and `classes-video.json` (the directions, for zero-shot).

    python -m tessera.data.demo_video --out runs/demo/data
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from .demo import COLORS, SHAPES, _polygon
from .demo_joint import synth
from .make_shards import write_shards
from .video import AUDIO_SUFFIX, audio_track

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# container -> (PyAV format, codec, pixel format)
CODECS = {
    "mp4": ("mp4", "libx264", "yuv420p"),
    "webm": ("webm", "libvpx", "yuv420p"),
    "avi": ("avi", "mjpeg", "yuvj420p"),
    "mkv": ("matroska", "mpeg4", "yuv420p"),
}
TEMPLATES = ("a {color} {shape} moving {direction}", "a {shape}, {color}, that moves {direction}",
             "{color} {shape} going {direction}", "a video of a {color} {shape} moving {direction}")  # fmt: skip
FRAMES, FPS, CANVAS = 16, 8, 32
SOUND_RATE = 16000
COMBOS = list(itertools.product(SHAPES, COLORS, DIRECTIONS))  # 6 x 8 x 4 = 192


def encode_video(
    frames: list[np.ndarray],
    fps: int,
    container: str,
    audio: tuple[np.ndarray, int] | None = None,
    codec: tuple[str, str, str] | None = None,
) -> bytes:
    """(H, W, 3) uint8 frames (and a mono float waveform with its rate) -> the bytes of a video file of
    `container` (a key of CODECS), in memory; `codec` (PyAV format, codec, pixel format) replaces CODECS'."""
    fmt, codec, pix_fmt = codec or CODECS[container]
    out = io.BytesIO()
    with av.open(out, mode="w", format=fmt) as f:
        stream = f.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = pix_fmt
        sound = None
        if audio is not None:
            opus = container == "webm"  # webm holds Opus or Vorbis; the others take AAC
            sound = f.add_stream("libopus" if opus else "aac", rate=48000 if opus else audio[1])
            sound.layout = "mono"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                f.mux(packet)
        for packet in stream.encode():
            f.mux(packet)
        if sound is not None:
            wave, rate = audio
            frame = av.AudioFrame.from_ndarray(wave.astype(np.float32)[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
            resampler = av.AudioResampler(format=sound.codec_context.format, layout="mono", rate=sound.rate)
            for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
                for packet in sound.encode(chunk):
                    f.mux(packet)
            for packet in sound.encode():
                f.mux(packet)
    return out.getvalue()


def _draw(shape: str, color: str, direction: str, r: float, along: list[float], rng: random.Random) -> list[np.ndarray]:
    """A frame per position `along` the axis of `direction` (measured from the edge it comes from) of the shape of
    radius `r`, on a noisy background; the rest of its look (where on the other axis, colours, angle) drawn here."""
    dx, dy = DIRECTIONS[direction]
    across = rng.uniform(r + 1, CANVAS - r - 1)  # where on the other axis it travels
    background = tuple(rng.randint(60, 200) for _ in range(3))
    fill = tuple(int(min(255, max(0, c + rng.randint(-20, 20)))) for c in COLORS[color])
    noise = np.random.default_rng(rng.getrandbits(32))
    angle = rng.uniform(-0.25, 0.25)
    out = []
    for a in along:
        a = CANVAS - a if dx < 0 or dy < 0 else a
        cx, cy = (a, across) if dx else (across, a)
        img = Image.new("RGB", (CANVAS, CANVAS), background)
        draw = ImageDraw.Draw(img)
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx + r * x, cy + r * y) for x, y in _polygon(shape, 0, 0, 1, angle)], fill=fill)
        pixels = np.asarray(img, dtype=np.int16) + noise.normal(0, 5, (CANVAS, CANVAS, 3)).astype(np.int16)
        out.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return out


def moving_clip(shape: str, color: str, direction: str, rng: random.Random) -> list[np.ndarray]:
    """FRAMES frames of the shape crossing the canvas in `direction`, on a noisy background."""
    r = CANVAS * rng.uniform(0.12, 0.16)
    span = CANVAS - 2 * r - 2
    return _draw(shape, color, direction, r, [r + 1 + span * t / (FRAMES - 1) for t in range(FRAMES)], rng)


def crossing_clip(shape: str, color: str, direction: str, rng: random.Random) -> list[np.ndarray]:
    """FRAMES frames of the shape crossing the whole canvas in `direction`, from wholly beyond one edge to wholly
    beyond the other and, after a random time off the canvas, again: at a random speed (a crossing takes 0.6 to 1.2
    clip lengths) and from a random start. Its position along the axis is then spread evenly over the canvas at
    every frame, alike for both senses, so no frame and no average of frames tells which way it goes."""
    r = CANVAS * rng.uniform(0.12, 0.16)
    distance = CANVAS + 2 * r  # from centre r beyond the first edge to r beyond the other
    speed = distance / (FRAMES * rng.uniform(0.6, 1.2))  # pixels per frame
    period = distance + rng.uniform(0.0, 0.5) * CANVAS  # a crossing, then out of sight
    start = rng.uniform(0.0, period)
    return _draw(shape, color, direction, r, [(start + speed * t) % period - r for t in range(FRAMES)], rng)


def sound_track(shape: str, color: str, rng: random.Random) -> tuple[np.ndarray, int]:
    """The shape's sound as `demo_joint` plays it (pitch from the colour, rhythm from the shape), as long as a clip."""
    return synth(shape, color, "large", rng, SOUND_RATE, seconds=FRAMES / FPS), SOUND_RATE


def _sample(combo, rng: random.Random, container: str, with_sound: bool, clip=moving_clip) -> dict:
    shape, color, direction = combo
    audio = sound_track(shape, color, rng) if with_sound else None
    data = encode_video(clip(shape, color, direction, rng), FPS, container, audio)
    text = rng.choice(TEMPLATES).format(shape=shape, color=color, direction=direction)
    sample = {container: data, "txt": text.encode()}
    if with_sound:  # the track as make_shards extracts it
        sample[AUDIO_SUFFIX] = audio_track(data, container)
    return sample


def _broken(rng: random.Random) -> list[dict]:
    """Clips the decoder must count and skip: truncated, zero bytes, not a video at all."""
    good = encode_video(moving_clip("circle", "red", "left", rng), FPS, "mp4")
    return [
        {"mp4": good[: len(good) // 3], "txt": b"a red circle moving left"},
        {"webm": b"", "txt": b"an empty clip"},
        {"avi": b"RIFF....not really a video", "txt": b"not a video"},
    ]


def build(
    out: str | Path, train_clips: int = 768, samples_per_shard: int = 256, seed: int = 0, motion_clips: int = 1536
) -> dict:
    """Write the demo's video shards into `out` (and `motion_clips` motion-only training clips, with their eval shard,
    unless 0); returns what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    containers = list(CODECS)
    train = [
        _sample(COMBOS[i % len(COMBOS)], rng, containers[i % len(containers)], with_sound=i % 8 == 0)
        for i in range(train_clips)
    ]
    broken = _broken(rng)
    for i, sample in enumerate(broken):  # spread among the good ones
        train.insert(1 + i * len(train) // len(broken), sample)
    names = list(DIRECTIONS)
    val = []
    for i, combo in enumerate(COMBOS):
        sample = _sample(combo, rng, containers[i % len(containers)], with_sound=True)
        sample["cls"] = str(names.index(combo[2])).encode()
        val.append((f"val{i:06d}", sample))
    shards = write_shards([(f"clip{i:06d}", s) for i, s in enumerate(train)], out, "videos", samples_per_shard)
    shards.update(write_shards(val, out, "val-video", len(val)))
    motion = [
        (f"cross{i:06d}", _sample(COMBOS[i % len(COMBOS)], rng, containers[i % len(containers)], False, crossing_clip))
        for i in range(motion_clips)
    ]
    val_motion = []
    for i, combo in enumerate(COMBOS if motion_clips else []):
        sample = _sample(combo, rng, containers[i % len(containers)], False, crossing_clip)
        sample["cls"] = str(names.index(combo[2])).encode()
        val_motion.append((f"val{i:06d}", sample))
    if motion:
        shards.update(write_shards(motion, out, "motion", samples_per_shard))
        shards.update(write_shards(val_motion, out, "val-motion", len(val_motion)))
    # a direction's prompt is every colour and shape moving that way: no caption names a thing without them
    templates = [f"a {color} {shape} moving {{}}" for shape, color in itertools.product(SHAPES, COLORS)]
    classes = {"classnames": names, "templates": templates}
    (out / "classes-video.json").write_text(json.dumps(classes, indent=1) + "\n")
    return {
        "train": len(train) - len(broken),
        "broken": len(broken),
        "val": len(val),
        "motion": len(motion),
        "val_motion": len(val_motion),
        "shards": shards,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write the embedded demo's video shards (moving shapes).")
    p.add_argument("--out", default="runs/demo/data")
    p.add_argument("--train-clips", type=int, default=768)
    p.add_argument("--motion-clips", type=int, default=1536, help="motion-only training clips (motion-*.tar)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    written = build(args.out, args.train_clips, seed=args.seed, motion_clips=args.motion_clips)
    print(
        f"wrote {written['train']} training clips (+{written['broken']} broken) and {written['val']} eval clips; "
        f"{written['motion']} motion-only training clips and {written['val_motion']} motion-only eval clips"
    )


if __name__ == "__main__":
    main()
