"""Shard writing and reading: round trip, partitioning, damaged shards, pickle members, duplicate keys."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tessera.data.make_shards import ManifestError, write_shards
from tessera.data.make_shards import main as make_shards_main
from tessera.data.shards import ShardError, expand_shards, iter_raw_samples, shard_sizes, split_shards
from tessera.data.stats import SampleStats

from .conftest import PY, jpeg_bytes, run_cli


def _manifest(tmp_path: Path, n: int = 5) -> Path:
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    lines = []
    for i in range(n):
        Image.new("RGB", (16, 12), (40 * i, 10, 200)).save(img_dir / f"{i}.png")
        rec = {"image": f"img/{i}.png", "text": f"caption {i}"}
        if i % 2:
            rec.update(captions=[f"alt {i}", f"other {i}"], json={"id": i}, cls=i)
        lines.append(json.dumps(rec))
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_make_shards_round_trip(tmp_path, capsys):
    manifest = _manifest(tmp_path, 5)
    assert (
        make_shards_main(
            ["--manifest", str(manifest), "--out", str(tmp_path / "out"), "--samples-per-shard", "2", "--verify"]
        )
        == 0
    )
    # the override it suggests is quoted, so that a shell pastes it as one argument, braces unexpanded
    assert f"use: 'data.train={tmp_path}/out/shard-{{000000..000002}}.tar'" in capsys.readouterr().out
    urls = expand_shards(str(tmp_path / "out" / "shard-{000000..000002}.tar"))
    assert sum(shard_sizes(urls).values()) == 5
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 1}
    samples = list(iter_raw_samples(urls, SampleStats()))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(1, 6)]
    for i, s in enumerate(samples):
        assert s["txt"].decode() == f"caption {i}"
        img = Image.open(io.BytesIO(s["png"]))
        assert img.getpixel((0, 0)) == (40 * i, 10, 200)  # png: lossless, byte-exact
        if i % 2:
            assert json.loads(s["json"]) == {"id": i, "captions": [f"alt {i}", f"other {i}"]}
            assert s["cls"] == str(i).encode()
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_make_shards_rejects_bad_manifests_clearly(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "missing.jpg", "text": "x"}) + "\n")
    proc = run_cli(
        [PY, "-m", "tessera.data.make_shards", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o")]
    )
    assert proc.returncode == 2 and "m.jsonl:1: cannot read image file 'missing.jpg'" in proc.stderr
    (tmp_path / "img.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "m.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"key": "a", "image": "img.jpg", "text": "ok"}),
                json.dumps({"key": "a", "image": "img.jpg", "text": "dup"}),
                "{broken",
                json.dumps({"key": "b.c", "text": "dotted"}),
                json.dumps({"key": "d", "image": "img.jpg", "text": "  "}),
                json.dumps({"key": "e", "text": "fine"}),
            ]
        )
        + "\n"
    )
    with pytest.raises(ManifestError, match="m.jsonl:2: duplicate key 'a'"):
        list(write_shards(_read(tmp_path / "m.jsonl", skip_bad=False), tmp_path / "o"))
    proc = run_cli(
        [
            PY,
            "-m",
            "tessera.data.make_shards",
            "--manifest",
            str(tmp_path / "m.jsonl"),
            "--out",
            str(tmp_path / "o2"),
            "--skip-bad",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 samples into 1 shard(s); skipped 4" in proc.stdout


def _read(path, skip_bad):
    from tessera.data.make_shards import read_manifest

    return read_manifest(path, verify=False, skip_bad=skip_bad, counts={})


def test_expand_shards_errors(tmp_path):
    with pytest.raises(ShardError, match="2 of 2 shards do not exist"):
        expand_shards(str(tmp_path / "x-{0..1}.tar"))
    with pytest.raises(ShardError, match="holds no .tar shards"):
        expand_shards(str(tmp_path))
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.tar").write_bytes(b"")
    assert expand_shards(str(tmp_path)) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert expand_shards(str(tmp_path / "*.tar")) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert expand_shards(f"{tmp_path}/a.tar::{tmp_path}/b.tar") == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]


@pytest.mark.parametrize("n_shards", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("world,workers", [(1, 1), (1, 3), (2, 2), (3, 2), (4, 1)])
def test_split_covers_every_sample_exactly_once(n_shards, world, workers):
    urls = [f"s{i}" for i in range(n_shards)]
    per_shard = 7
    taken = []
    for rank in range(world):
        for worker in range(workers):
            split = split_shards(urls, rank, world, worker, workers)
            stream = [(u, j) for u in split.shards for j in range(per_shard)]
            mine = stream[split.sample_offset :: split.sample_stride]
            assert mine, "a (rank, worker) slot without data would stall its rank"
            taken.extend(mine)
    assert sorted(taken) == sorted((u, j) for u in urls for j in range(per_shard))


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_pickle_members_are_never_read_and_duplicates_are_marked(tmp_path):
    _tar(
        tmp_path / "a.tar",
        [
            ("k1.jpg", b"x"),
            ("k1.txt", b"one"),
            ("k1.pth", b"\x80\x04evil"),
            ("k2.txt", b"two"),
            ("k2.pyd", b"x"),
            ("k1.txt", b"again"),
        ],
    )
    stats = SampleStats()
    samples = list(iter_raw_samples([str(tmp_path / "a.tar")], stats))
    assert [s["__key__"] for s in samples] == ["k1", "k2", "k1"]
    assert "pth" not in samples[0] and "pyd" not in samples[1]
    assert samples[2].get("__bad__") == "duplicate_key" and "txt" not in samples[2]
    assert stats.events["rejected_pickle_member"] == 2


def test_truncated_shards_keep_earlier_samples_and_count_the_loss(tmp_path):
    _tar(tmp_path / "full.tar", [(f"k{i}.txt", b"caption %d" % i * 50) for i in range(20)])
    raw = (tmp_path / "full.tar").read_bytes()  # 1024 bytes a member: header + one data block
    (tmp_path / "mid.tar").write_bytes(raw[: 15 * 1024 + 600])  # cut inside member 15's data
    (tmp_path / "edge.tar").write_bytes(raw[: 15 * 1024])  # cut between members: reads as a valid tar
    (tmp_path / "sizes.json").write_text(json.dumps({"mid.tar": 20, "edge.tar": 20}))
    _tar(tmp_path / "next.tar", [("n0.txt", b"after")])
    urls = [str(tmp_path / n) for n in ("mid.tar", "edge.tar", "next.tar")]
    stats = SampleStats()
    keys = [s["__key__"] for s in iter_raw_samples(urls, stats, shard_sizes(urls))]
    assert keys == [f"k{i}" for i in range(15)] * 2 + ["n0"]
    assert stats.events == {"shard_read_error": 1, "samples_missing_from_shard": 10}
    stats = SampleStats()
    assert len(list(iter_raw_samples([str(tmp_path / "missing.tar")], stats, {str(tmp_path / "missing.tar"): 4}))) == 0
    assert stats.events == {"shard_read_error": 1, "samples_missing_from_shard": 4}


def test_a_shard_visited_twice_in_a_row_yields_its_samples_twice(tmp_path):
    _tar(tmp_path / "a.tar", [("k1.txt", b"one"), ("k2.txt", b"two")])
    samples = list(iter_raw_samples([str(tmp_path / "a.tar")] * 2, SampleStats()))
    assert [s["__key__"] for s in samples] == ["k1", "k2", "k1", "k2"]
    assert not any("__bad__" in s for s in samples)


def test_make_shards_writes_audio_and_graph_entries(tmp_path):
    import numpy as np
    import soundfile
    import torch

    from tessera.modalities import decoder

    (tmp_path / "clips").mkdir()
    t = np.arange(8000) / 8000
    soundfile.write(tmp_path / "clips" / "a.flac", 0.4 * np.sin(2 * np.pi * 330 * t), 8000)
    soundfile.write(tmp_path / "clips" / "b.ogg", 0.4 * np.sin(2 * np.pi * 550 * t), 8000, subtype="VORBIS")
    x = np.eye(3, dtype=np.float32)
    np.savez(tmp_path / "ring.npz", x=x, edge_index=np.array([[0, 1, 2], [1, 2, 0]]))
    (tmp_path / "g.json").write_text(json.dumps({"x": [[1.0], [2.0]], "edge_index": [[0], [1]]}))
    records = [
        {"key": "a", "audio": "clips/a.flac", "text": "a tone"},
        {"key": "b", "audio": "clips/b.ogg", "captions": ["another tone", "a higher tone"], "cls": 1},
        {"key": "c", "graph": "ring.npz", "text": "a ring of three"},
        {"key": "d", "graph": "g.json", "text": "two nodes"},
        {"key": "e", "graph": {"x": [[0.5], [0.5]], "edge_index": [[1], [0]]}, "text": "inline"},
        {"key": "f", "smiles": "c1ccccc1O", "text": "phenol"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert make_shards_main(["--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "out"), "--verify"]) == 0
    samples = {
        s["__key__"]: s
        for s in iter_raw_samples(expand_shards(str(tmp_path / "out" / "shard-000000.tar")), SampleStats())
    }
    assert {k: sorted(m for m in s if not m.startswith("__")) for k, s in samples.items()} == {
        "a": ["flac", "txt"],
        "b": ["cls", "json", "ogg"],
        "c": ["graph.npz", "txt"],
        "d": ["graph.json", "txt"],
        "e": ["graph.json", "txt"],
        "f": ["smi", "txt"],
    }
    wave, rate = decoder("audio").decode(samples["a"])
    assert rate == 8000 and wave.shape == (8000,)
    ring = decoder("graph").decode(samples["c"])
    assert torch.equal(ring.x, torch.eye(3)) and ring.edge_index.tolist() == [[0, 1, 2], [1, 2, 0]]
    assert decoder("graph").decode(samples["e"]).num_nodes == 2
    assert decoder("graph").decode(samples["f"]).num_nodes == 7  # phenol: 7 heavy atoms
    # a graph file that does not decode is refused with --verify, naming the modality
    (tmp_path / "bad.npz").write_bytes(b"not a zip archive")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"graph": "bad.npz", "text": "broken"}))
    from tessera.data.make_shards import read_manifest

    with pytest.raises(ManifestError, match="graph does not decode"):
        list(read_manifest(tmp_path / "bad.jsonl", verify=True, skip_bad=False, counts={}))
