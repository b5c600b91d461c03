"""The embedded demo's sounds and graphs: the shapes of `tessera.data.demo`, heard and drawn as graphs.

Every modality describes the same things, a {size} {colour} {shape}, so one text tower can bind them all:

- sounds (1 s clips, made in code): the colour is the pitch (one note per colour), the size the octave (small
  sounds high), the shape the rhythm and timbre (a circle is one smooth tone, a triangle three beeps, a star
  five bright quick ones, a diamond two rising chirps, ...). Clips are written as flac, wav or ogg at 16 or
  22.05 kHz, with random timing, loudness and noise, so decoding and resampling are exercised too.
- graphs (networkx): the shape is the family (a circle is a cycle, a star a star graph, a square a grid,
  a triangle a triangular lattice, a diamond K(2,n), a cross a four-armed tree), the size the node count, the
  colour a one-hot node feature. Node features: [colour one-hot (8), 1, degree / 8], with noise.

Shards written (beside `tessera.data.demo`'s image-text ones):
- `sounds-*.tar`: audio + txt; `graphs-*.tar`: graph (npz or json) + txt;
- `pictures-sounds-*.tar`: image + audio + txt, a source carrying three modalities at once;
- `val-joint-000000.tar`: one sample of each of the 96 (shape, colour, size) with image, audio, graph, a
  caption and the shape's `cls`, for audio/graph-text retrieval, zero-shot audio and graph classification,
  and emergent retrieval between modalities the loss never pairs (audio-image, graph-image, audio-graph).
A few broken samples (silent, truncated and empty audio; an edge pointing outside its graph; an `.npz` with a
pickled object array) show bad-sample accounting.

    python -m tessera.data.demo_joint --out runs/demo/data
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import random
from pathlib import Path

import networkx as nx
import numpy as np
import soundfile

from .demo import COLORS, POSITIONS, SHAPES, SIZES, _encode, caption, render
from .make_shards import write_shards

RATES = (16000, 22050)
FORMATS = ("flac", "wav", "ogg")
NOTES = dict(zip(COLORS, (262.0, 294.0, 330.0, 349.0, 392.0, 440.0, 494.0, 523.0)))  # C4 .. C5
SOUND_TEMPLATES = (
    "the sound of a {size} {color} {shape}",
    "a {size} {color} {shape}, heard",
    "listen: a {color} {shape}, {size}",
    "a {color} {shape} that sounds {size}",
)
GRAPH_TEMPLATES = (
    "a {size} {color} {shape} graph",
    "a graph shaped like a {size} {color} {shape}",
    "{color} nodes in a {size} {shape}",
    "a {shape} graph, {size}, coloured {color}",
)
JOINT_COMBOS = list(itertools.product(SHAPES, COLORS, SIZES))  # 96


# -- sounds -----------------------------------------------------------------------------------------------------


def _tone(f: float, t: np.ndarray, harmonics: tuple[float, ...]) -> np.ndarray:
    return sum(a * np.sin(2 * math.pi * f * (k + 1) * t) for k, a in enumerate(harmonics))


def _beeps(
    n: int,
    length: float,
    rate: int,
    f: float,
    harmonics: tuple[float, ...],
    rng: random.Random,
    duty: float = 0.5,
    chirp: float = 0.0,
    tremolo: float = 0.0,
) -> np.ndarray:
    out = np.zeros(int(length * rate), dtype=np.float64)
    span = rng.uniform(0.75, 0.9) * length
    start = rng.uniform(0.02, length - span - 0.02)
    period = span / n
    for i in range(n):
        a, dur = start + i * period, period * duty
        t = np.arange(int(dur * rate)) / rate
        freq = f * (1 + chirp * t / max(dur, 1e-3))
        phase = 2 * math.pi * np.cumsum(freq) / rate
        wave = sum(h * np.sin((k + 1) * phase) for k, h in enumerate(harmonics))
        env = np.sin(math.pi * t / dur) ** 0.5
        if tremolo:
            env = env * (1 - 0.5 * tremolo * (1 + np.sin(2 * math.pi * 18 * t)))
        i0 = int(a * rate)
        out[i0 : i0 + len(wave)] += wave * env
    return out


def synth(shape: str, color: str, size: str, rng: random.Random, rate: int, seconds: float = 1.0) -> np.ndarray:
    """A mono float32 clip: pitch from the colour, octave from the size, rhythm and timbre from the shape."""
    f = NOTES[color] * (2.0 if size == "small" else 1.0) * rng.uniform(0.985, 1.015)
    if shape == "circle":
        wave = _beeps(1, seconds, rate, f, (1.0,), rng, duty=1.0)
    elif shape == "square":
        wave = _beeps(4, seconds, rate, f, (1.0, 0.0, 0.33, 0.0, 0.2), rng)
    elif shape == "triangle":
        wave = _beeps(3, seconds, rate, f, (1.0, 0.5), rng)
    elif shape == "diamond":
        wave = _beeps(2, seconds, rate, f, (1.0, 0.3), rng, duty=0.7, chirp=0.5)
    elif shape == "cross":
        wave = _beeps(2, seconds, rate, f, (1.0,), rng, duty=0.8, tremolo=1.0)
    else:  # star
        wave = _beeps(5, seconds, rate, f, (1.0, 0.6, 0.4, 0.3, 0.2), rng, duty=0.3)
    wave = wave / max(1e-6, np.abs(wave).max()) * rng.uniform(0.2, 0.6)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(0.005, 0.03), wave.shape)
    return (wave + noise).astype(np.float32)


def encode_audio(wave: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt.upper(), **({"subtype": "VORBIS"} if fmt == "ogg" else {}))
    return buf.getvalue()


def _sound(combo, rng: random.Random) -> bytes:
    rate, fmt = rng.choice(RATES), rng.choice(FORMATS)
    return encode_audio(synth(*combo, rng, rate), rate, fmt)


# -- graphs -----------------------------------------------------------------------------------------------------


def graph_of(shape: str, color: str, size: str, rng: random.Random) -> dict[str, np.ndarray]:
    """{x, edge_index} of a graph of the shape's family; large graphs have about twice the nodes."""
    big = size == "large"
    if shape == "circle":
        g = nx.cycle_graph(rng.randint(12, 16) if big else rng.randint(5, 8))
    elif shape == "star":
        g = nx.star_graph(rng.randint(10, 14) if big else rng.randint(4, 6))
    elif shape == "square":
        g = nx.grid_2d_graph(*((rng.randint(3, 4), 4) if big else (2, rng.randint(2, 3))))
    elif shape == "triangle":
        g = nx.triangular_lattice_graph(*((2, rng.randint(4, 5)) if big else (1, rng.randint(2, 3))))
    elif shape == "diamond":
        g = nx.complete_bipartite_graph(2, rng.randint(8, 12) if big else rng.randint(2, 4))
    else:  # cross: a centre with four arms
        arm = rng.randint(3, 4) if big else 1
        g = nx.Graph()
        for a in range(4):
            path = [0] + [1 + a * arm + i for i in range(arm)]
            nx.add_path(g, path)
    g = nx.convert_node_labels_to_integers(g, ordering="sorted" if shape != "triangle" else "default")
    n = g.number_of_nodes()
    order = list(range(n))
    rng.shuffle(order)  # node order carries no information
    relabel = dict(zip(range(n), order))
    edges = np.array([(relabel[u], relabel[v]) for u, v in g.edges()], dtype=np.int64).reshape(-1, 2)
    edge_index = np.concatenate([edges, edges[:, ::-1]]).T.copy()
    degree = np.bincount(edge_index[0], minlength=n).astype(np.float32)
    x = np.zeros((n, len(COLORS) + 2), dtype=np.float32)
    x[:, list(COLORS).index(color)] = 1.0
    x[:, len(COLORS)] = 1.0
    x[:, len(COLORS) + 1] = degree / 8.0
    x += np.random.default_rng(rng.getrandbits(32)).normal(0, 0.05, x.shape).astype(np.float32)
    return {"x": x, "edge_index": edge_index}


def graph_member(graph: dict[str, np.ndarray], fmt: str) -> dict[str, bytes]:
    if fmt == "json":
        return {"graph.json": json.dumps({k: v.tolist() for k, v in graph.items()}).encode()}
    buf = io.BytesIO()
    np.savez_compressed(buf, **graph)
    return {"graph.npz": buf.getvalue()}


# -- shards -----------------------------------------------------------------------------------------------------


def _caption(templates, combo, rng: random.Random) -> bytes:
    shape, color, size = combo
    return rng.choice(templates).format(shape=shape, color=color, size=size).encode()


def _broken_sounds(rng: random.Random):
    good = _sound(("circle", "red", "small"), rng)
    yield "badsnd0001", {"wav": encode_audio(np.zeros(16000, np.float32), 16000, "wav"), "txt": b"a silent clip"}
    yield "badsnd0002", {"flac": good[: len(good) // 4], "txt": b"a truncated clip"}
    yield "badsnd0003", {"wav": encode_audio(np.zeros(0, np.float32), 16000, "wav"), "txt": b"an empty clip"}


def _broken_graphs(rng: random.Random):
    g = graph_of("star", "red", "small", rng)
    outside = {"x": g["x"], "edge_index": np.concatenate([g["edge_index"], [[0], [len(g["x"]) + 5]]], axis=1)}
    yield "badgrf0001", {**graph_member(outside, "npz"), "txt": b"an edge to a node that does not exist"}
    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"payload": "never unpickled"}], dtype=object), edge_index=g["edge_index"])
    yield "badgrf0002", {"graph.npz": buf.getvalue(), "txt": b"an archive with a pickled object array"}


def build(
    out: str | Path, per_source: int = 4000, triple: int = 1000, samples_per_shard: int = 1000, seed: int = 0
) -> dict:
    """Write the sound, graph, picture+sound and joint validation shards into `out`; return a summary."""
    out = Path(out)
    rng = random.Random(seed + 100)
    combos = JOINT_COMBOS
    sounds = []
    for i in range(per_source):
        combo = rng.choice(combos)
        sounds.append(
            (
                f"s{i:07d}",
                {**{k: v for k, v in _sound_member(combo, rng).items()}, "txt": _caption(SOUND_TEMPLATES, combo, rng)},
            )
        )
    mid = min(samples_per_shard, len(sounds)) // 2
    broken = list(_broken_sounds(rng))
    sounds[mid : mid + len(broken)] = broken
    sizes = write_shards(sounds, out, "sounds", samples_per_shard)

    graphs = []
    for i in range(per_source):
        combo = rng.choice(combos)
        graphs.append(
            (
                f"g{i:07d}",
                {
                    **graph_member(graph_of(*combo, rng), "npz" if i % 4 else "json"),
                    "txt": _caption(GRAPH_TEMPLATES, combo, rng),
                },
            )
        )
    broken = list(_broken_graphs(rng))
    graphs[mid : mid + len(broken)] = broken
    sizes.update(write_shards(graphs, out, "graphs", samples_per_shard))

    both = []
    for i in range(triple):
        shape, color, size = rng.choice(combos)
        position = rng.choice(list(POSITIONS))
        both.append(
            (
                f"p{i:07d}",
                {
                    "jpg": _encode(render(shape, color, size, position, rng), "jpg", rng),
                    **_sound_member((shape, color, size), rng),
                    "txt": caption(shape, color, size, position, rng).encode(),
                },
            )
        )
    sizes.update(write_shards(both, out, "pictures-sounds", samples_per_shard))

    val_rng = random.Random(seed + 101)
    val = []
    for i, (shape, color, size) in enumerate(combos):
        position = val_rng.choice(list(POSITIONS))
        val.append(
            (
                f"vj{i:05d}",
                {
                    "jpg": _encode(render(shape, color, size, position, val_rng), "jpg", val_rng),
                    **_sound_member((shape, color, size), val_rng),
                    **graph_member(graph_of(shape, color, size, val_rng), "npz"),
                    "txt": f"a {size} {color} {shape}".encode(),
                    "cls": str(SHAPES.index(shape)).encode(),
                },
            )
        )
    sizes.update(write_shards(val, out, "val-joint", len(val)))
    return {"dir": str(out), "shards": sizes, "combinations": len(combos)}


def _sound_member(combo, rng: random.Random) -> dict[str, bytes]:
    rate, fmt = rng.choice(RATES), rng.choice(FORMATS)
    return {fmt: encode_audio(synth(*combo, rng, rate), rate, fmt)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tessera.data.demo_joint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/demo/data")
    parser.add_argument("--per-source", type=int, default=4000, help="sound-text and graph-text samples each")
    parser.add_argument("--triple", type=int, default=1000, help="picture+sound+text samples")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = build(args.out, args.per_source, args.triple, args.samples_per_shard, args.seed)
    total = sum(summary["shards"].values())
    print(f"demo sounds and graphs: {total} samples in {len(summary['shards'])} shards under {summary['dir']}")


if __name__ == "__main__":
    main()
