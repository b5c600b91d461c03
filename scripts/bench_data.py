"""Data-pipeline throughput per loader worker: Tessera's decode + transform against the bare libraries,
and against open_clip's own image pipeline, on the same webdataset shards, in the same run.

One process, one thread (`torch.set_num_threads(1)`), no loader worker processes: the rate is what one
worker delivers. Every row reads the same tar shards with the same reader (`tessera.data.shards.iter_raw_samples`,
webdataset's tar iterator), so reading costs every row the same; only what follows differs:

- read only: the tar members grouped into samples, nothing decoded (the floor under every row);
- raw decode: the bare library, `PIL.Image.open(...).convert("RGB")`, `soundfile.read(dtype="float32")`,
  `np.load(allow_pickle=False)` (or `json.loads` for the demo's graph.json members);
- raw decode + transform: the bare library's value through the same transform object Tessera uses, without
  Tessera's decoder or its per-sample RNG (what the transform itself costs);
- Tessera decode: the modality's decoder's `decode(sample)` (`tessera.modalities.decoder(m)`), with its validation;
- Tessera decode+transform: what a loader worker does per sample (`ShardStream._decode`): the decoder and
  the encoder's train transform, under the per-sample seeded RNG (`sample_randomness`);
- Tessera ShardStream: the whole worker path, `ShardStream(StreamSpec(train=True))` iterated in-process:
  shuffle buffer, decode + transform of the modality and of its caption (tokenized), batching, collation;
- open_clip (images only): open_clip_train's webdataset pipeline, `wds.decode("pilrgb")` + open_clip's
  train transform + its tokenizer, `to_tuple`, `batched`: rebuilt in-process with this venv's webdataset,
  and (when `.venv-openclip` exists) `open_clip_train.data.get_wds_dataset` itself, run in that venv as a
  subprocess that takes its turn in every repeat like the other rows.

Rates count the samples each path delivers; every path keeps its last partial batch (training would drop
it after decoding it), so none is charged for samples it decoded and threw away.

Transforms: images, open_clip's `image_transform_v2` train transform at --image-size (RandomResizedCrop
with open_clip's default `AugmentationCfg`: scale (0.9, 1.0), bicubic; ToTensor; Normalize), the same on
both sides; audio, the AST encoder's `AudioTransform` (resample, random crop, log-mel, SpecAugment) with
--audio-config (default `demo`: the demo-joint tower, 16 kHz, 1 s, 64 mels, n_fft 400, hop 160); graphs,
the GIN encoder's `GraphTransform` of the demo-joint config (no positional encoding), and again with
--rw-steps random-walk PE (the `graph_pe` set, same shards); videos, the video tower's `VideoTransform` (8 of a
clip's frames sampled, each through the image train transform at the clips' 32 px), against PyAV decoding every
frame (the bare decoder; its + transform row samples from those frames).

Data (made once under --out/shards, reused): `tessera.data.demo`'s 64 px jpg+txt pictures, larger photo-like JPEGs
(256-1024 px, noisy, quality 85-95), and `tessera.data.demo_joint`'s sounds (1 s flac/wav/ogg at 16/22.05 kHz) and
graphs (npz, a quarter json), and `tessera.data.demo_video`'s clips (16 frames, mp4/webm/avi/mkv). The demo shards
keep their few deliberately broken samples.

    python scripts/bench_data.py                  # --samples 512 per set, 5 repeats, 224 px
    python scripts/bench_data.py --samples 256 --repeats 3 --image-size 160 --sets image_photo,audio
    python scripts/bench_data.py --profile       # + cProfile of Tessera's rows of sets below a target

Writes runs/bench_data/results.json, table.md and throughput.png. Rates are best of --repeats (every
repeat's rate is in results.json); quote the ratios, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".venv-openclip" / "bin" / "python"
SAMPLES_PER_SHARD = 128
VIDEO_SIZE = 32  # the video tower's frame size: the demo clips' own
# open_clip_train's sample shuffle buffer (_SAMPLE_SHUFFLE_SIZE / _INITIAL); Tessera's stream uses the same
SHUFFLE_BUFFER, SHUFFLE_INITIAL = 5000, 1000
AUDIO_CONFIGS = {
    "demo": {
        "sample_rate": 16000,
        "clip_seconds": 1.0,
        "n_mels": 64,
        "n_fft": 400,
        "win_length": 400,
        "hop_length": 160,
        "freq_mask": 6,
        "time_mask": 10,
    },
    "imagebind": {"preset": "imagebind"},
    "clap": {"preset": "clap"},
}
TARGET_RAW, TARGET_PEER = 0.8, 1.0


# -- data ----------------------------------------------------------------------------------------------------


def _complete(d: Path, prefix: str, n: int) -> bool:
    try:
        sizes = json.loads((d / "sizes.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return sum(v for k, v in sizes.items() if k.startswith(prefix + "-")) == n


def _urls(d: Path, prefix: str) -> list[str]:
    return sorted(str(p) for p in d.glob(f"{prefix}-*.tar"))


def _photos(n: int, seed: int):
    """Photo-like jpg+txt samples, 256-1024 px on a side as img2dataset writes them, any aspect ratio: a smooth
    random colour field, blobs, sensor-like noise."""
    import random

    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    from tessera.data.demo import COMBOS, caption

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    for i in range(n):
        w, h = rng.randint(256, 1024), rng.randint(256, 1024)
        field = nrng.uniform(0, 255, (h // 48 + 2, w // 48 + 2, 3)).astype(np.uint8)
        img = Image.fromarray(field).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(2, 6)):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, min(w, h) / 3)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randint(0, 255) for _ in range(3)))
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
        noisy = np.asarray(img, np.int16) + nrng.normal(0, rng.uniform(4, 12), (h, w, 3)).astype(np.int16)
        buf = io.BytesIO()
        pixels = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        pixels.save(buf, "JPEG", quality=rng.randint(85, 95))
        yield f"ph{i:07d}", {"jpg": buf.getvalue(), "txt": caption(*rng.choice(COMBOS), rng).encode()}


def make_data(out: Path, n: int, seed: int = 0) -> dict[str, list[str]]:
    """The shards of every set, written once (reused while they hold n samples each)."""
    from tessera.data import demo, demo_joint, demo_video
    from tessera.data.make_shards import write_shards

    def fresh(d: Path) -> Path:  # a set of another size is replaced whole, so no stale shard is left in it
        shutil.rmtree(d, ignore_errors=True)
        return d

    made = []
    if not _complete(out / "demo", "train-txt", n):
        demo.build(fresh(out / "demo"), train_per_source=n, samples_per_shard=SAMPLES_PER_SHARD, seed=seed)
        made.append("demo pictures")
    if not _complete(out / "photos1024", "photos", n):  # 256-1024 px (the folder "photos" held 256-512 px ones)
        write_shards(_photos(n, seed), fresh(out / "photos1024"), "photos", SAMPLES_PER_SHARD)
        made.append("photos")
    if not (_complete(out / "joint", "sounds", n) and _complete(out / "joint", "graphs", n)):
        demo_joint.build(fresh(out / "joint"), per_source=n, triple=0, samples_per_shard=SAMPLES_PER_SHARD, seed=seed)
        made.append("sounds and graphs")
    if not _complete(out / "video", "videos", n + 3):  # + the demo's three broken clips
        demo_video.build(
            fresh(out / "video"), train_clips=n, samples_per_shard=SAMPLES_PER_SHARD, seed=seed, motion_clips=0
        )
        made.append("videos")
    if made:
        print(f"[bench] wrote {', '.join(made)} under {out}", flush=True)
    return {
        "image_demo64": _urls(out / "demo", "train-txt"),
        "image_photo": _urls(out / "photos1024", "photos"),
        "audio": _urls(out / "joint", "sounds"),
        "graph": _urls(out / "joint", "graphs"),
        "video": _urls(out / "video", "videos"),
    }


# -- the bare libraries --------------------------------------------------------------------------------------


def raw_image(sample):
    from PIL import Image

    raw = next(sample[s] for s in ("jpg", "jpeg", "png", "webp") if s in sample)
    return Image.open(io.BytesIO(raw)).convert("RGB")


def raw_audio(sample):
    import soundfile

    raw = next(sample[s] for s in ("flac", "wav", "ogg", "mp3") if s in sample)
    return soundfile.read(io.BytesIO(raw), dtype="float32")


def raw_graph(sample):
    import numpy as np

    if "graph.npz" in sample:
        with np.load(io.BytesIO(sample["graph.npz"]), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    return {k: np.asarray(v) for k, v in json.loads(sample["graph.json"]).items()}


def raw_video(sample):
    """PyAV alone: every frame of the clip to an RGB array (what a loader without frame sampling decodes)."""
    import av

    suffix = next(s for s in ("mp4", "webm", "avi", "mkv", "mov") if s in sample)
    with av.open(io.BytesIO(sample[suffix])) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


class DecodedFrames:
    """The bare decode's frames, as a `Video` offers them to the video transform (raw decode + transform row)."""

    def __init__(self, arrays):
        self.arrays = arrays

    def window(self, max_seconds):
        return len(self.arrays)

    def frames(self, indices):
        from PIL import Image

        return [Image.fromarray(self.arrays[i]) for i in indices]


RAW = {"image": raw_image, "audio": raw_audio, "graph": raw_graph, "video": raw_video}


def to_input(modality: str, value):
    """A bare decode's value as the transform takes it (what Tessera's decoder returns, unchecked)."""
    import torch

    if modality == "audio":
        wave, rate = value
        return torch.from_numpy(wave if wave.ndim == 1 else wave.mean(1)), rate
    if modality == "graph":
        import numpy as np

        from tessera.data.graph import Graph

        return Graph(
            torch.from_numpy(value["x"].astype(np.float32)), torch.from_numpy(value["edge_index"].astype(np.int64))
        )
    if modality == "video":
        return DecodedFrames(value)
    return value


# -- Tessera's transforms, from the encoders -----------------------------------------------------------------


def tessera_towers(image_size: int, audio_config: str, rw_steps: int) -> dict:
    """{name: (transform, collate)} of small encoders of the benchmarked configs (only the transforms matter:
    the image one depends on the image size alone, the audio one on the audio config)."""
    from tessera.models.audio import ASTConfig, ASTEncoder
    from tessera.models.audio_features import AudioConfig
    from tessera.models.graph import GraphEncoder, GraphEncoderConfig
    from tessera.models.open_clip_image import OpenClipImageConfig, OpenClipImageEncoder
    from tessera.models.open_clip_text import OpenClipTextConfig, OpenClipTextEncoder
    from tessera.models.video import OpenClipVideoConfig, OpenClipVideoEncoder

    image = OpenClipImageEncoder(
        OpenClipImageConfig(
            model="ViT-B-32", overrides={"image_size": image_size, "width": 64, "layers": 1, "head_width": 32}
        ),
        64,
    )
    text = OpenClipTextEncoder(
        OpenClipTextConfig(model="ViT-B-32", overrides={"width": 64, "layers": 1, "heads": 2}), 64
    )
    audio_cfg = AudioConfig.from_dict(dict(AUDIO_CONFIGS[audio_config]))
    audio = ASTEncoder(ASTConfig(audio=audio_cfg, width=64, depth=1, heads=2), 64)
    graph_cfg = {"arch": "gin", "in_dim": 10, "hidden_dim": 64, "layers": 3, "pooling": "sum"}  # demo-joint
    graph = GraphEncoder(GraphEncoderConfig(**graph_cfg), 64)
    graph_pe = GraphEncoder(GraphEncoderConfig(**graph_cfg, rw_steps=rw_steps), 64)
    video_size = {"image_size": VIDEO_SIZE, "width": 64, "layers": 1, "head_width": 32}
    video = OpenClipVideoEncoder(OpenClipVideoConfig(model="ViT-B-32", overrides=video_size, frames=8), 64)
    return {
        "image": (image.transform(True), image.collate),
        "text": (text.transform(True), text.collate),
        "audio": (audio.transform(True), audio.collate),
        "graph": (graph.transform(True), graph.collate),
        "graph_pe": (graph_pe.transform(True), graph_pe.collate),
        "video": (video.transform(True), video.collate),
    }


# -- rows: each a function (limit) -> samples delivered ------------------------------------------------------


def _raw_samples(urls: list[str], limit: int | None):
    import itertools

    from tessera.data.shards import iter_raw_samples
    from tessera.data.stats import SampleStats

    return itertools.islice(iter_raw_samples(urls, SampleStats()), limit)


def rows_for(modality: str, urls: list[str], tf, tower_name: str, towers: dict, batch_size: int) -> dict:
    from tessera.data.decode import BadSample, decoders
    from tessera.data.pipeline import ShardStream, Source, StreamSpec, seeded_rng
    from tessera.data.shards import shard_sizes

    table = decoders([modality, "text"])
    decoder, raw = table[modality], RAW[modality]
    transforms = {modality: tf, "text": towers["text"][0]}
    collators = {modality: towers[tower_name][1], "text": towers["text"][1]}

    def spec(modalities: list[str]) -> StreamSpec:
        return StreamSpec(
            sources=[Source("bench", urls, 1.0, modalities, shard_sizes(urls))],
            decoders=table,
            transforms=transforms,
            collators=collators,
            batch_size=batch_size,
            train=True,
            shuffle_buffer=SHUFFLE_BUFFER,
            shuffle_initial=SHUFFLE_INITIAL,
            drop_last=False,
        )

    one = ShardStream(spec([modality]))

    def read_only(limit):
        return sum(1 for _ in _raw_samples(urls, limit))

    def raw_decode(limit, transform=None):
        n = 0
        for sample in _raw_samples(urls, limit):
            if not decoder.present(sample):
                continue
            try:
                value = raw(sample)
                if transform is not None:
                    transform(to_input(modality, value))
            except Exception:  # the demo shards' few deliberately broken samples: nothing here checks
                continue
            n += 1
        return n

    def tessera_decode(limit):
        n = 0
        for sample in _raw_samples(urls, limit):
            if not decoder.present(sample):
                continue
            try:
                decoder.decode(sample)
            except BadSample:
                continue
            n += 1
        return n

    def tessera_decode_transform(limit):
        n = 0
        for i, sample in enumerate(_raw_samples(urls, limit), start=1):
            sample["__source__"] = 0
            try:
                one._decode(sample, seeded_rng(0, 0, 0, 0, i))  # a loader worker's per-sample call
            except BadSample:
                continue
            n += 1
        return n

    def tessera_stream(limit):
        n = 0
        for batch in ShardStream(spec([modality, "text"])):
            if "_state" in batch and modality in batch:
                n += len(batch["__key__"])
                if limit is not None and n >= limit:
                    break
        return n

    return {
        "read only": read_only,
        "raw decode": raw_decode,
        "raw decode + transform": lambda limit: raw_decode(limit, tf),
        "Tessera decode": tessera_decode,
        "Tessera decode+transform": tessera_decode_transform,
        f"Tessera ShardStream ({modality}+text, batched)": tessera_stream,
    }


def openclip_pipeline(urls: list[str], image_size: int, batch_size: int):
    """open_clip_train's per-worker training pipeline (`get_wds_dataset`, not resampled), rebuilt with this
    venv's webdataset."""
    import logging

    import open_clip
    import webdataset as wds
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(size=image_size), is_train=True, aug_cfg={})
    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    def log_and_continue(exn):
        logging.debug("webdataset error %r; ignoring", exn)
        return True

    def has_pair(sample):
        return "txt" in sample and any(s in sample for s in ("png", "jpg", "jpeg", "webp"))

    def run(limit):
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(list(urls)),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=log_and_continue),
            wds.shuffle(bufsize=SHUFFLE_BUFFER, initial=SHUFFLE_INITIAL),
            wds.select(has_pair),
            wds.decode("pilrgb", handler=log_and_continue),
            wds.rename(image="jpg;png;jpeg;webp", text="txt"),
            wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
            wds.to_tuple("image", "text"),
            wds.batched(batch_size, partial=True),
        )
        n = 0
        for images, _ in pipeline:
            n += len(images)
            if limit is not None and n >= limit:
                break
        return n

    return run


# -- open_clip_train itself, in its own venv -----------------------------------------------------------------


def peer_server(image_size: int, batch_size: int) -> None:
    """In .venv-openclip: per stdin line {"urls", "limit", "total"}, run open_clip_train's `get_wds_dataset`
    pipeline (workers=0) and answer {"samples", "seconds"}."""
    import logging
    import warnings

    import open_clip
    import torch
    import webdataset as wds
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from open_clip_train.data import get_wds_dataset

    torch.set_num_threads(1)
    # keep the last partial batch (training drops it), so that every path counts every sample it decoded
    batched = wds.batched
    wds.batched = lambda batchsize, partial=True: batched(batchsize, partial=True)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    preprocess = image_transform_v2(PreprocessCfg(size=image_size), is_train=True, aug_cfg={})
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    print(json.dumps({"ready": True, "webdataset": __import__("webdataset").__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        args = argparse.Namespace(
            train_data="::".join(req["urls"]),
            val_data=None,
            dataset_resampled=False,
            seed=0,
            workers=0,
            train_num_samples=req["total"],
            train_data_upsampling_factors=None,
            batch_size=batch_size,
            world_size=1,
        )
        t0 = time.perf_counter()
        loader = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer).dataloader
        n = 0
        for images, _ in loader:
            n += len(images)
            if req["limit"] is not None and n >= req["limit"]:
                break
        print(json.dumps({"samples": n, "seconds": time.perf_counter() - t0}), flush=True)


class Peer:
    """The open_clip_train subprocess; `row(urls, total)` is a row function like the in-process ones."""

    def __init__(self, image_size: int, batch_size: int):
        self.proc = subprocess.Popen(
            [
                str(PEER_PYTHON),
                __file__,
                "--peer-server",
                "--image-size",
                str(image_size),
                "--batch-size",
                str(batch_size),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""},
        )
        hello = self._read()
        self.version = hello["webdataset"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"open_clip_train subprocess exited ({self.proc.wait()})")
        return json.loads(line)

    def row(self, urls: list[str], total: int):
        def run(limit):
            self.proc.stdin.write(json.dumps({"urls": urls, "limit": limit, "total": total}) + "\n")
            self.proc.stdin.flush()
            answer = self._read()
            run.seconds = answer["seconds"]  # timed inside the subprocess, without the round trip
            return answer["samples"]

        return run

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# -- timing --------------------------------------------------------------------------------------------------


def measure(rows: dict, repeats: int, warmup: int) -> dict[str, dict]:
    """Each row once on `warmup` samples, then `repeats` full passes, the rows taking turns (in alternating
    order), so that a busy spell of the shared machine does not fall on one row only."""
    for fn in rows.values():
        fn(warmup)
    rates: dict[str, list[float]] = {name: [] for name in rows}
    samples: dict[str, int] = {}
    for rep in range(repeats):
        for name, fn in list(rows.items()) if rep % 2 == 0 else list(rows.items())[::-1]:
            t0 = time.perf_counter()
            n = fn(None)
            seconds = getattr(fn, "seconds", None) or time.perf_counter() - t0
            rates[name].append(n / seconds)
            samples[name] = n
    return {
        name: {"samples": samples[name], "best": max(r), "median": statistics.median(r), "rates": r}
        for name, r in rates.items()
    }


def profile(fn, path: Path, top: int = 25) -> str:
    """cProfile one full pass of a row; the top functions by total time go to `path`."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn(None)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    buf.write("\n\n")
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    path.write_text(buf.getvalue())
    return str(path)


def overheads_us(n: int = 2000) -> dict[str, float]:
    """Per-sample costs of the stream's bookkeeping: its seeded RNG, the fork/restore of the global RNGs."""
    from tessera.data.pipeline import sample_randomness, seeded_rng

    t0 = time.perf_counter()
    for i in range(n):
        seeded_rng(0, 0, 0, 0, i)
    rng_us = (time.perf_counter() - t0) / n * 1e6
    rng = seeded_rng(0)
    t0 = time.perf_counter()
    for _ in range(n):
        with sample_randomness(rng):
            pass
    return {"seeded_rng": rng_us, "sample_randomness": (time.perf_counter() - t0) / n * 1e6}


# -- report --------------------------------------------------------------------------------------------------

SETS = {  # name: (modality, tower, label)
    "image_demo64": ("image", "image", "image, demo 64 px"),
    "image_photo": ("image", "image", "image, photos 256-1024 px"),
    "audio": ("audio", "audio", "audio, 1 s clips"),
    "graph": ("graph", "graph", "graph, no PE"),
    "graph_pe": ("graph", "graph_pe", "graph, random-walk PE"),
    "video": ("video", "video", "video, 16-frame 32 px clips, 8 frames sampled"),
}


def _stream_row(rows: dict) -> str:
    return next(k for k in rows if k.startswith("Tessera ShardStream"))


def summarize(results: dict) -> list[dict]:
    out = []
    for name, rows in results.items():
        raw = rows["raw decode"]["best"]
        stream = rows[_stream_row(rows)]["best"]
        peer = rows.get("open_clip_train (its venv)") or rows.get("open_clip pipeline (in-process)")
        s = {
            "set": name,
            "decode/raw": rows["Tessera decode"]["best"] / raw,
            "decode+transform/raw": rows["Tessera decode+transform"]["best"] / raw,
            "decode+transform/(raw+transform)": rows["Tessera decode+transform"]["best"]
            / rows["raw decode + transform"]["best"],
            "stream/raw": stream / raw,
        }
        if peer:
            s["stream/open_clip"] = stream / peer["best"]
            s["stream/open_clip (paired)"] = statistics.median(
                a / b for a, b in zip(rows[_stream_row(rows)]["rates"], peer["rates"])
            )
            s["open_clip/raw"] = peer["best"] / raw
        out.append(s)
    return out


def tables(results: dict, summary: list[dict], args) -> str:
    lines = ["| set | path | samples | samples/s (best) | median | vs raw decode |", "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        raw = rows["raw decode"]["best"]
        for row, r in rows.items():
            lines.append(
                f"| {SETS[name][2]} | {row} | {r['samples']} | {r['best']:.0f} | "
                f"{r['median']:.0f} | {r['best'] / raw:.2f}x |"
            )
    lines += [
        "",
        f"| set | decode / raw | decode+transform / raw (target >= {TARGET_RAW}) | "
        "decode+transform / (raw + same transform) | ShardStream / raw | open_clip / raw | "
        f"ShardStream / open_clip (target >= {TARGET_PEER}) | same, paired |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(s, key, target=None):
        if key not in s:
            return "-"
        flag = "" if target is None else (" ok" if s[key] >= target else " below")
        return f"{s[key]:.2f}{flag}"

    for s in summary:
        lines.append(
            f"| {SETS[s['set']][2]} | {cell(s, 'decode/raw')} | "
            f"{cell(s, 'decode+transform/raw', TARGET_RAW)} | "
            f"{cell(s, 'decode+transform/(raw+transform)')} | {cell(s, 'stream/raw')} | "
            f"{cell(s, 'open_clip/raw')} | {cell(s, 'stream/open_clip', TARGET_PEER)} | "
            f"{cell(s, 'stream/open_clip (paired)')} |"
        )
    lines += [
        "",
        f"One process, 1 thread; best of {args.repeats} (paired: the median over repeats of "
        "the two rates' ratio within one repeat, robust to load that changes between repeats); "
        f"image transform: open_clip's train transform at {args.image_size} px (RandomResizedCrop "
        f"scale (0.9, 1.0), bicubic); audio: AudioTransform '{args.audio_config}' (resample + crop "
        f"+ log-mel + SpecAugment); graph PE: {args.rw_steps} random-walk steps; stream batch "
        f"{args.batch_size}; open_clip: open_clip_train.data.get_wds_dataset in its venv where "
        "present.",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = 1.0 + 0.42 * sum(len(r) for r in results.values())
    fig, axes = plt.subplots(len(results), 1, figsize=(8, height), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], results.items()):
        names = list(rows)[::-1]
        vals = [rows[n]["best"] for n in names]
        colors = [
            "tab:orange" if "open_clip" in n else "tab:blue" if n.startswith("Tessera") else "tab:gray" for n in names
        ]
        ax.barh(names, vals, color=colors)
        raw = rows["raw decode"]["best"]
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v / raw:.2f}x", va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_title(f"{SETS[name][2]}: samples/s per worker (x raw decode)", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=512, help="samples per set (the shards hold exactly these)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per row (best kept)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument(
        "--audio-config",
        choices=sorted(AUDIO_CONFIGS),
        default="demo",
        help="AudioTransform parameters: demo (16 kHz, 1 s, the demo-joint AST), imagebind, clap",
    )
    p.add_argument("--rw-steps", type=int, default=16, help="random-walk PE steps of the graph_pe set")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {list(SETS)}")
    p.add_argument("--no-peer-venv", action="store_true", help="skip the open_clip_train subprocess")
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile Tessera's rows of every set below a target (written beside the results)",
    )
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_data"))
    p.add_argument("--peer-server", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer_server:
        peer_server(args.image_size, args.batch_size)
        return

    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shards = make_data(out / "shards", args.samples)
    towers = tessera_towers(args.image_size, args.audio_config, args.rw_steps)
    peer = None
    if not args.no_peer_venv and PEER_PYTHON.exists():
        try:
            peer = Peer(args.image_size, args.batch_size)
        except (OSError, RuntimeError, json.JSONDecodeError) as exc:
            print(f"[bench] open_clip_train subprocess unavailable ({exc}); in-process open_clip only")

    results: dict[str, dict] = {}
    all_rows: dict[str, dict] = {}
    for name in args.sets.split(","):
        modality, tower, label = SETS[name]
        urls = shards[name if name != "graph_pe" else "graph"]
        rows = rows_for(modality, urls, towers[tower][0], tower, towers, args.batch_size)
        if modality == "image":
            rows["open_clip pipeline (in-process)"] = openclip_pipeline(urls, args.image_size, args.batch_size)
            if peer is not None:
                rows["open_clip_train (its venv)"] = peer.row(urls, args.samples)
        t0 = time.perf_counter()
        results[name] = measure(rows, args.repeats, warmup=2 * args.batch_size)
        all_rows[name] = rows
        raw = results[name]["raw decode"]["best"]
        rates = ", ".join(f"{row} {r['best']:.0f}/s ({r['best'] / raw:.2f}x)" for row, r in results[name].items())
        print(f"[bench] {label} ({time.perf_counter() - t0:.0f} s): {rates}", flush=True)
    if peer is not None:
        peer.close()

    summary = summarize(results)
    profiles = {}
    if args.profile:
        for s in summary:
            if min(s["decode+transform/raw"] / TARGET_RAW, s.get("stream/open_clip", 1) / TARGET_PEER) < 1:
                rows = all_rows[s["set"]]
                for row in ("Tessera decode+transform", _stream_row(rows)):
                    tag = "stream" if "ShardStream" in row else "decode_transform"
                    path = out / f"profile_{s['set']}_{tag}.txt"
                    profiles[f"{s['set']}/{row}"] = profile(rows[row], path)
    table = tables(results, summary, args)
    print("\n" + table)
    seconds = time.perf_counter() - t_start
    doc = {
        "args": vars(args),
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "peer_webdataset": peer.version if peer is not None else None,
        "overheads_us": overheads_us(),
        "results": results,
        "summary": summary,
        "profiles": profiles,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    (out / "table.md").write_text(table + "\n")
    plot(results, out / "throughput.png")
    bookkeeping = ", ".join(f"{k} {v:.0f} us" for k, v in doc["overheads_us"].items())
    print(f"\nper-sample bookkeeping: {bookkeeping}")
    print(f"wrote {out}/results.json, table.md, throughput.png in {seconds:.0f} s")


if __name__ == "__main__":
    main()
