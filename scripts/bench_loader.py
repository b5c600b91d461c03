"""The whole training loader, worker processes included, against open_clip_train's, on img2dataset-like shards; a
loader worker's memory over many samples; and the time a mid-epoch resume takes to its first batch.

- Throughput: Tessera's `TrainLoader` (ViT-B/32's train transforms at --image-size, images as uint8, shuffle buffer
  as open_clip_train's) and open_clip_train's `get_wds_dataset(...).dataloader` (run in `.venv-openclip`, made on
  first use as scripts/bench_train.py makes it: open_clip_train pins webdataset <= 0.2.86), each over one epoch of
  the same shards, at each of --workers loader workers per process. A row's rate is its samples over the time from
  its first batch to its last (the workers' start is reported apart, as `first_batch_s`); the best of --repeats,
  the two loaders taking turns. From the rate per worker: the workers one GPU needs to feed --gpu-rate samples/s.
- Memory: the RSS of one Tessera worker after 2,000 and after --rss-samples samples (epochs over the same shards:
  the workers persist across them).
- Resume: a loader loaded with the state another saved at 10% and at 90% of an epoch (in-process, where a wrapped
  opener counts the shard bytes read; a shuffle buffer of 256, as 5,000 is a small part of a worker's epoch at
  scale), timed from `load_state_dict` to its first batch; and the same with the shards' sample counts withheld (no
  sizes.json, no checkpoint record), which reads every sample before the position again, as every resume did
  before.

Data: --samples photo-like JPEG+caption samples, 256-1024 px on a side at any aspect ratio, quality 85-95, in shards
of 128 with their sizes.json (scripts/bench_data.py's `_photos`, written once under --out/shards).

    python scripts/bench_loader.py                              # 2048 samples, workers 1,2, 3 repeats
    python scripts/bench_loader.py --workers 1,2,4 --rss-samples 20000 --no-peer

Writes --out/results.json, table.md and loader.png. Quote the ratios: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_SHARD = 128
SHUFFLE_BUFFER, SHUFFLE_INITIAL = 5000, 1000  # open_clip_train's _SAMPLE_SHUFFLE_SIZE / _INITIAL
BATCH = 64


def _write_part(job: tuple[Path, int, int]) -> dict[str, int]:
    from bench_data import _photos

    from tessera.data.make_shards import write_shards

    out, n, seed = job
    samples = ((f"part{seed:04d}-{key}", members) for key, members in _photos(n, seed))  # keys unique over parts
    return write_shards(samples, out, "photos", PER_SHARD)


def make_shards(out: Path, n: int, jobs: int = 1) -> list[str]:
    """`n` photos in shards of PER_SHARD under `out` (kept while they hold n), written by `jobs` processes."""
    sizes = out / "sizes.json"
    if not (sizes.is_file() and sum(json.loads(sizes.read_text()).values()) == n):
        import shutil
        from multiprocessing import Pool

        shutil.rmtree(out, ignore_errors=True)
        print(f"[bench] writing {n} photos under {out}", flush=True)
        parts = [(out / f"part{j:03d}", min(PER_SHARD, n - start), j) for j, start in enumerate(range(0, n, PER_SHARD))]
        with Pool(max(1, jobs)) as pool:
            pool.map(_write_part, parts)
        counts = {}
        for part, _, j in parts:  # one shard per part: gathered under one folder with one sizes.json
            (part / "photos-000000.tar").rename(out / f"photos-{j:06d}.tar")
            counts[f"photos-{j:06d}.tar"] = json.loads((part / "sizes.json").read_text())["photos-000000.tar"]
            shutil.rmtree(part)
        sizes.write_text(json.dumps(counts))
    return sorted(str(p) for p in out.glob("photos-*.tar"))


def tessera_loader(urls: list[str], workers: int, image_size: int, **data):
    from tessera.config import from_dict
    from tessera.data import DataConfig, TrainLoader
    from tessera.models.open_clip_image import OpenClipImageConfig, OpenClipImageEncoder
    from tessera.models.open_clip_text import OpenClipTextConfig, OpenClipTextEncoder

    # ViT-B/32's towers; only their transforms and collators are used (narrow, so that they build fast)
    image = OpenClipImageEncoder(
        OpenClipImageConfig(model="ViT-B-32", overrides={"image_size": image_size, "width": 64, "layers": 1}), 64
    )
    text = OpenClipTextEncoder(OpenClipTextConfig(model="ViT-B-32", overrides={"width": 64, "layers": 1}), 64)
    cfg = from_dict(
        DataConfig,
        {
            "train": "::".join(urls),
            "num_workers": workers,
            "shuffle_buffer": SHUFFLE_BUFFER,
            "shuffle_initial": SHUFFLE_INITIAL,
            **data,
        },
        "data",
    )
    transforms = {"image": image.compact_transform(True), "text": text.transform(True)}
    collators = {"image": image.collate, "text": text.collate}
    return TrainLoader(cfg, transforms, collators, ["image", "text"], BATCH)


def timed_batches(total: int, workers: int) -> int:
    """Batches each loader is timed over: all of one epoch but a partial batch per worker, the same on both sides."""
    return total // BATCH - workers - 1


def time_tessera(urls: list[str], workers: int, image_size: int, total: int) -> dict:
    loader = tessera_loader(urls, workers, image_size)
    t0 = time.perf_counter()
    n = len(next(loader)["__key__"])
    first = time.perf_counter()
    for _ in range(timed_batches(total, workers) - 1):
        n += len(next(loader)["__key__"])
    end = time.perf_counter()
    loader.close()
    return {"samples": n, "first_batch_s": first - t0, "rate": (n - BATCH) / (end - first)}


def peer(urls: list[str], workers: int, image_size: int, total: int) -> None:
    """In .venv-openclip: one epoch of open_clip_train's loader; prints {samples, first_batch_s, rate}."""
    import logging
    import warnings

    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from open_clip_train.data import get_wds_dataset

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    preprocess = image_transform_v2(PreprocessCfg(size=image_size), is_train=True, aug_cfg={})
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    args = argparse.Namespace(
        train_data="::".join(urls),
        val_data=None,
        dataset_resampled=False,
        seed=0,
        workers=workers,
        train_num_samples=total,
        train_data_upsampling_factors=None,
        batch_size=BATCH,
        world_size=1,
    )
    t0 = time.perf_counter()
    loader = get_wds_dataset(args, preprocess, is_train=True, tokenizer=tokenizer).dataloader
    it = iter(loader)
    n = len(next(it)[0])
    first = time.perf_counter()
    for _ in range(timed_batches(total, workers) - 1):
        n += len(next(it)[0])
    end = time.perf_counter()
    print(json.dumps({"samples": n, "first_batch_s": first - t0, "rate": (n - BATCH) / (end - first)}), flush=True)


def time_peer(python: Path, urls: list[str], workers: int, image_size: int, total: int) -> dict:
    out = subprocess.run(
        [
            str(python),
            __file__,
            "--peer",
            json.dumps({"urls": urls, "workers": workers, "size": image_size, "n": total}),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    if out.returncode != 0:
        raise RuntimeError(f"open_clip_train's loader failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker_rss(urls: list[str], image_size: int, marks: list[int]) -> dict[int, int]:
    """KiB of RSS of a lone loader worker after each of `marks` samples."""
    from benchlib import children, status_kib

    before = children()
    loader = tessera_loader(urls, 1, image_size, shuffle_buffer=1000, shuffle_initial=100)
    seen, out = 0, {}
    for mark in marks:
        while seen < mark:
            seen += len(next(loader)["__key__"])
        (pid,) = children() - before
        out[mark] = status_kib("VmRSS", pid)
        print(f"[bench] worker RSS after {seen} samples: {out[mark] / 1024:.0f} MiB", flush=True)
    loader.close()
    return out


class _Counting:
    """A shard file that adds the bytes read through it to `total`."""

    total = 0

    def __init__(self, fh):
        self.fh = fh

    def read(self, *args):
        data = self.fh.read(*args)
        _Counting.total += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def resume_times(urls: list[str], image_size: int, total: int, repeats: int) -> dict[str, dict]:
    """Seconds from load_state_dict to the first batch (best of `repeats`), and the shard bytes read, for a state saved
    at 10% and at 90% of the epoch; with the shards' counts known (the resume passes the consumed samples over unread)
    and withheld (it reads them again). In-process (0 workers), where every read is counted."""
    from tessera.data import shards

    opener = shards.open_shard
    shards.open_shard = lambda url: _Counting(opener(url))
    batches = total // BATCH
    states = {}
    small = {"shuffle_buffer": 256, "shuffle_initial": 256}  # a buffer well within the epoch, as at scale
    ref = tessera_loader(urls, 0, image_size, **small)
    at = {share: max(1, round(batches * share)) for share in (0.1, 0.9)}
    for i in range(1, at[0.9] + 1):
        next(ref)
        for share, batch in at.items():
            if i == batch:
                states[share] = ref.state_dict()
    out: dict[str, dict] = {}
    for rep in range(repeats):
        for known in (True, False) if rep % 2 == 0 else (False, True):
            for share, state in states.items():
                loader = tessera_loader(urls, 0, image_size, **small)
                _Counting.total = 0
                t0 = time.perf_counter()
                loader.load_state_dict(state)
                if not known:
                    loader.counted = {}
                    for src in loader.spec.sources:
                        src.sizes = {}
                next(loader)
                seconds = time.perf_counter() - t0
                key = f"{'counts known' if known else 'counts withheld'} @ {share:.0%}"
                row = out.setdefault(key, {"seconds": seconds, "bytes": _Counting.total, "runs": []})
                row["runs"].append(seconds)
                row["seconds"] = min(row["runs"])
    shards.open_shard = opener
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=2048, help="samples in the shards (one epoch)")
    p.add_argument("--workers", default="1,2", help="loader workers per process to compare at")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rss-samples", type=int, default=20000, help="samples to read before the last RSS (0: skip)")
    p.add_argument(
        "--gpu-rate",
        type=float,
        default=3000.0,
        help="samples/s one GPU trains at, to size the workers (default: an estimate for ViT-B/32 bf16 at batch 256 "
        "on an H100; scripts/gpu_check.sh measures it)",
    )
    p.add_argument("--no-peer", action="store_true", help="skip open_clip_train (no .venv-openclip)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_loader"))
    p.add_argument("--peer", help=argparse.SUPPRESS)
    p.add_argument("--make-shards", metavar="DIR", help="only write the --samples photos' shards into DIR")
    args = p.parse_args(argv)
    if args.peer:
        req = json.loads(args.peer)
        return peer(req["urls"], req["workers"], req["size"], req["n"])
    sys.path.insert(0, str(ROOT / "scripts"))
    if args.make_shards:
        make_shards(Path(args.make_shards), args.samples, os.cpu_count() or 1)
        return None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    urls = make_shards(out / "shards", args.samples, os.cpu_count() or 1)
    python = None
    if not args.no_peer:
        from bench_train import ensure_peer_venv

        python = ensure_peer_venv()
    workers = [int(w) for w in args.workers.split(",")]
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for w in workers:
            order = ["tessera", "open_clip_train"] if rep % 2 == 0 else ["open_clip_train", "tessera"]
            for who in order:
                if who == "open_clip_train" and python is None:
                    continue
                if who == "tessera":
                    r = time_tessera(urls, w, args.image_size, args.samples)
                else:
                    r = time_peer(python, urls, w, args.image_size, args.samples)
                runs.setdefault(f"{who} x{w}", []).append(r)
                print(
                    f"[bench] {who} workers={w}: {r['rate']:.0f} samples/s, first batch {r['first_batch_s']:.1f} s",
                    flush=True,
                )
    best = {k: max(v, key=lambda r: r["rate"]) for k, v in runs.items()}
    results = {
        "samples": args.samples,
        "image_size": args.image_size,
        "batch": BATCH,
        "cpu": os.cpu_count(),
        "gpu_rate": args.gpu_rate,
        "loaders": {k: {"best": best[k], "runs": v} for k, v in runs.items()},
    }
    marks = [m for m in (2000, args.rss_samples) if m]
    if args.rss_samples:
        rss = worker_rss(urls, args.image_size, marks)
        results["worker_rss_kib"] = rss
    results["resume"] = resume_times(urls, args.image_size, args.samples, args.repeats)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = [
        f"Whole loader, one epoch of {args.samples} photos (256-1024 px) at {args.image_size} px, batch {BATCH}, on "
        f"{os.cpu_count()} cores:",
        "",
        "| loader | workers | samples/s | per worker | first batch (s) | vs open_clip_train | workers for "
        f"{args.gpu_rate:.0f}/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in workers:
        peer_rate = best.get(f"open_clip_train x{w}", {}).get("rate")
        for who in ("tessera", "open_clip_train"):
            r = best.get(f"{who} x{w}")
            if r is None:
                continue
            ratio = f"{r['rate'] / peer_rate:.2f}x" if peer_rate else "-"
            need = math.ceil(args.gpu_rate / (r["rate"] / w))
            md.append(
                f"| {who} | {w} | {r['rate']:.0f} | {r['rate'] / w:.0f} | {r['first_batch_s']:.1f} | {ratio} | {need} |"
            )
    if args.rss_samples:
        rss = results["worker_rss_kib"]
        md += [
            "",
            f"Worker RSS: {rss[2000] / 1024:.0f} MiB after 2,000 samples, {rss[args.rss_samples] / 1024:.0f} MiB "
            f"after {args.rss_samples:,} ({rss[args.rss_samples] / rss[2000]:.3f}x).",
        ]
    res = results["resume"]
    md += [
        "",
        f"Resume, load_state_dict to the first batch (in-process, shuffle buffer 256, best of {args.repeats}):",
        "",
        "| | at 10% | at 90% | 90% / 10% | MiB read at 10% | at 90% |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("counts known", "counts withheld"):
        a, b = res[f"{kind} @ 10%"], res[f"{kind} @ 90%"]
        md.append(
            f"| {kind} | {a['seconds']:.2f} s | {b['seconds']:.2f} s | {b['seconds'] / a['seconds']:.2f} | "
            f"{a['bytes'] / 2**20:.0f} | {b['bytes'] / 2**20:.0f} |"
        )
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    plot(results, workers, out / "loader.png")


def plot(results: dict, workers: list[int], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for who in ("tessera", "open_clip_train"):
        xs = [w for w in workers if f"{who} x{w}" in results["loaders"]]
        a.plot(xs, [results["loaders"][f"{who} x{w}"]["best"]["rate"] for w in xs], "o-", label=who)
    a.set_xlabel("loader workers")
    a.set_ylabel("samples/s")
    a.set_title("whole loader")
    a.legend()
    res = results["resume"]
    for kind in ("counts known", "counts withheld"):
        b.plot([10, 90], [res[f"{kind} @ 10%"]["seconds"], res[f"{kind} @ 90%"]["seconds"]], "o-", label=kind)
    b.set_xlabel("position in the epoch (%)")
    b.set_ylabel("seconds to the first batch")
    b.set_title("resume")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
