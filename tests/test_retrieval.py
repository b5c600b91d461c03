"""Retrieval metrics against a brute-force computation (full sort), chance levels against simulation, the
representation diagnostics against their definitions, and the evaluation CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tessera.eval.joint import joint_positions
from tessera.eval.ranking import (
    Embedded,
    chance_metrics,
    diagnostics,
    metrics_from_positions,
    positive_positions,
    retrieval_metrics,
)
from tessera.eval.retrieval import main as retrieval_main

from .conftest import PY, call_main, run_cli


def brute_force(q, q_owner, t, t_owner, k=10):
    """Per query: sorted 1-based positions of its positives (stable sort, ties to the lower index), AP@k."""
    positions, aps = [], []
    for i in range(q.shape[0]):
        sims = (q[i] @ t.T).tolist()
        order = sorted(range(len(sims)), key=lambda j: (-sims[j], j))
        pos = sorted(order.index(j) + 1 for j in range(len(sims)) if t_owner[j] == q_owner[i])
        positions.append(pos)
        hits = [(n + 1) / p for n, p in enumerate(pos) if p <= k]
        aps.append(sum(hits) / min(len(pos), k))
    return positions, aps


def _multi_caption_set(n, d=8, seed=0, max_views=4):
    """n samples; each has 1..max_views text rows (captions) near its image, grouped by sample."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    views = torch.randint(1, max_views + 1, (n,), generator=g)
    owner = torch.repeat_interleave(torch.arange(n), views)
    text = F.normalize(image[owner] + 0.9 * torch.randn(len(owner), d, generator=g), dim=-1)
    return Embedded({"image": image, "text": text}, {"image": torch.arange(n), "text": owner}, n)


@pytest.mark.parametrize("n,chunk", [(1, 4), (37, 7), (150, 50), (150, 10**8)])
def test_positions_and_metrics_match_a_full_sort_with_several_captions(n, chunk):
    emb = _multi_caption_set(n, seed=n)
    for q, t in (("text", "image"), ("image", "text")):
        got = positive_positions(emb.features[q], emb.owner[q], emb.features[t], emb.owner[t], chunk_elements=chunk)
        want, aps = brute_force(emb.features[q], emb.owner[q].tolist(), emb.features[t], emb.owner[t].tolist())
        for row, pos in zip(got.tolist(), want):
            assert row[: len(pos)] == pos and all(math.isinf(x) for x in row[len(pos) :])
        m = metrics_from_positions(got, "x", ks=(1, 5, 10))
        best = torch.tensor([p[0] for p in want], dtype=torch.float64)
        for k in (1, 5, 10):
            assert m[f"x_R@{k}"] == pytest.approx((best <= k).double().mean().item())
        assert m["x_mean_rank"] == pytest.approx(best.mean().item())
        assert m["x_mAP@10"] == pytest.approx(sum(aps) / len(aps))


def test_image_to_text_hits_when_any_caption_is_in_the_top_k():
    # image 0 has captions 0, 1; image 1 has caption 2. Caption 1 matches image 0 exactly, caption 0 does not.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    emb = Embedded({"image": image, "text": text}, {"image": torch.arange(2), "text": torch.tensor([0, 0, 1])}, 2)
    m, _, _ = retrieval_metrics(emb, "image", "text")
    # image 0 ranks caption 1 first (a hit; caption 0 second: AP 1). Image 1 ranks captions 0 and 2 tied, caption
    # 0 first: its own caption 2 is second (a miss at 1; AP 1/2)
    assert m["image_to_text_R@1"] == 0.5 and m["image_to_text_R@5"] == 1.0
    assert m["image_to_text_mAP@10"] == pytest.approx(0.75)
    # each caption is a query with its image as the one positive: captions 1 and 2 find theirs first
    assert m["text_to_image_R@1"] == pytest.approx(2 / 3)


def test_ties_are_broken_by_index_as_a_stable_sort():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    ids = torch.arange(3)
    assert positive_positions(q, ids, t, ids)[:, 0].tolist() == [1, 2, 3]


def test_chance_levels_match_a_simulated_random_ranking():
    g = torch.Generator().manual_seed(0)
    T = 30
    positives = torch.tensor([1, 3, 5])
    c = chance_metrics(positives, T, "x")
    sims = {"R@1": [], "R@5": [], "R@10": [], "mean_rank": [], "mAP@10": []}
    for m in positives.tolist():
        best, ap = [], []
        for _ in range(20000):
            pos = torch.sort(torch.randperm(T, generator=g)[:m] + 1).values.double()
            best.append(pos[0].item())
            ap.append(sum((j + 1) / p for j, p in enumerate(pos.tolist()) if p <= 10) / min(m, 10))
        best = torch.tensor(best)
        sims["R@1"].append((best <= 1).double().mean())
        sims["R@5"].append((best <= 5).double().mean())
        sims["R@10"].append((best <= 10).double().mean())
        sims["mean_rank"].append(best.mean())
        sims["mAP@10"].append(torch.tensor(ap).mean())
    for key, values in sims.items():
        assert c[f"x_{key}"] == pytest.approx(torch.stack(values).mean().item(), rel=0.03, abs=0.003), key
    one = chance_metrics(torch.ones(480, dtype=torch.int64), 480, "y")
    assert one["y_R@1"] == pytest.approx(1 / 480) and one["y_R@10"] == pytest.approx(10 / 480)
    assert one["y_mean_rank"] == pytest.approx(240.5) and one["y_median_rank"] == 240


def test_diagnostics_match_their_definitions():
    emb = _multi_caption_set(60, seed=3)
    d = diagnostics(emb, "image", "text")
    x, y = emb.first_rows("image"), emb.first_rows("text")
    assert torch.equal(y[1], emb.features["text"][emb.owner["text"].tolist().index(1)])
    n = x.shape[0]
    assert d["image-text_alignment"] == pytest.approx(((x - y) ** 2).sum(1).mean().item(), rel=1e-5)
    assert d["image-text_modality_gap"] == pytest.approx((x.mean(0) - y.mean(0)).norm().item(), rel=1e-5)
    cos = x @ y.T
    assert d["image-text_positive_cosine"] == pytest.approx(cos.diag().mean().item(), rel=1e-5)
    off = ~torch.eye(n, dtype=torch.bool)
    assert d["image-text_negative_cosine"] == pytest.approx(cos[off].mean().item(), rel=1e-4, abs=1e-6)
    dist2 = torch.cdist(x, x) ** 2
    assert d["image-text_uniformity_image"] == pytest.approx(torch.exp(-2 * dist2[off]).mean().log().item(), rel=1e-4)


@pytest.mark.slow
def test_retrieval_cli_on_an_exported_model(tiny_model_cfg, demo_shards, tmp_path, capsys):
    from tessera.models import build_model, save_model

    torch.manual_seed(0)
    save_model(build_model(tiny_model_cfg), tmp_path / "model")
    out = tmp_path / "res.json"
    # the json shards carry several captions per picture: every one is a query; by default the model's pairs
    # (here image-text) are scored in both directions
    proc = run_cli(
        [
            PY,
            "-m",
            "tessera.eval.retrieval",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(demo_shards / "train-json-000000.tar"),
            "--out",
            str(out),
            "--batch-size",
            "100",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["task"] == "zeroshot_retrieval" and {"dataset", "model", "metrics", "chance"} <= set(doc)
    n = doc["n"]["image-text"]
    assert doc["rows"]["image-text"]["image"] == n < doc["rows"]["image-text"]["text"]
    assert set(doc["metrics"]) == set(doc["chance"])
    # CLIP_benchmark's names of the same recalls: image retrieval is text-to-image
    for k in (1, 5, 10):
        assert doc["metrics"][f"image_retrieval_recall@{k}"] == doc["metrics"][f"text_to_image_R@{k}"]
        assert doc["metrics"][f"text_retrieval_recall@{k}"] == doc["metrics"][f"image_to_text_R@{k}"]
    for key, value in doc["metrics"].items():
        assert (
            (0 <= value <= 1)
            if ("_R@" in key or "mAP" in key or "recall@" in key)
            else (1 <= value <= doc["rows"]["image-text"]["text"])
        ), key
    assert {
        "image-text_alignment",
        "image-text_modality_gap",
        "image-text_uniformity_image",
        "image-text_positive_cosine",
        "image-text_negative_cosine",
    } <= set(doc["diagnostics"])
    assert (tmp_path / "res_recall.png").stat().st_size > 0
    assert "res_recall.png" in (tmp_path / "res.md").read_text() and "text_to_image" in proc.stdout

    # the error paths, in this process
    model_args = ["--model", str(tmp_path / "model"), "--data", str(demo_shards / "val-000000.tar")]
    rc, _, err = call_main(retrieval_main, [*model_args, "--query", "audio", "--target", "image"], capsys)
    assert rc == 2 and "no 'audio' tower" in err
    rc, _, err = call_main(retrieval_main, [*model_args, "--query", "text"], capsys)
    assert rc == 2 and "give both --query and --target" in err
    empty = tmp_path / "empty-000000.tar"
    import tarfile

    tarfile.open(empty, "w").close()
    rc, _, err = call_main(retrieval_main, ["--model", str(tmp_path / "model"), "--data", str(empty)], capsys)
    assert rc == 2 and "no sample in" in err


def test_pairs_the_data_does_not_carry_are_left_out_when_asked(demo_shards):
    """A joint model scored on image-text shards: with skip_missing, the audio pairs are listed as skipped and the
    image-text pair is scored; without it, the first missing pair is an error."""
    from tessera.config import from_dict
    from tessera.data import parse_sources
    from tessera.eval.common import NoSamples
    from tessera.eval.retrieval import evaluate_pairs
    from tessera.models import ModelConfig, build_model

    from .test_joint import JOINT_MODEL

    model = build_model(from_dict(ModelConfig, JOINT_MODEL, "model"))
    sources = parse_sources([{"shards": str(demo_shards / "val-000000.tar"), "modalities": ["image", "text"]}], "val")
    pairs = [("image", "text"), ("text", "audio")]
    result = evaluate_pairs(model, sources, pairs, 256, skip_missing=True)
    assert result["skipped"] == ["text-audio"] and list(result["n"]) == ["image-text"]
    with pytest.raises(NoSamples, match="no evaluation source carries text\\+audio"):
        evaluate_pairs(model, sources, pairs, 256)
    with pytest.raises(NoSamples):
        evaluate_pairs(model, sources, [("text", "audio")], 256, skip_missing=True)


def test_a_clip_benchmark_shard_gives_every_caption_line_as_a_query(tiny_model_cfg, tmp_path):
    """CLIP_benchmark writes all captions of an image into one `.txt`, a line each: each line is a query."""
    from webdataset import TarWriter

    from tessera.data import SourceConfig
    from tessera.eval.ranking import embed
    from tessera.models import build_model

    from .conftest import jpeg_bytes

    shard = tmp_path / "0.tar"
    with TarWriter(str(shard)) as sink:
        for i in range(5):
            captions = "\n".join(f"caption {j} of picture {i}" for j in range(1 + i % 3))
            sink.write({"__key__": f"s{i:04d}", "jpg": jpeg_bytes(color=(40 * i, 0, 0)), "txt": captions})
    emb = embed(build_model(tiny_model_cfg), [SourceConfig(str(shard))], ["image", "text"], 4)
    assert emb.n == 5 and emb.features["image"].shape[0] == 5
    assert emb.owner["text"].tolist() == [0, 1, 1, 2, 2, 2, 3, 4, 4]


@pytest.mark.parametrize("rule", ["sum", "mip", "volume"])
def test_a_query_of_two_modalities_ranks_targets_as_its_rule_scores_them(rule):
    """image + audio -> text: each sample's caption ranked among all captions by the rule's score, against the score
    computed one pair at a time in fp64 (sum of cosines, Symile's MIP, minus GRAM's volume)."""
    torch.manual_seed(0)
    n = 50
    shared = torch.randn(n, 6)
    feats = {m: F.normalize(shared + 0.9 * torch.randn(n, 6), dim=1) for m in ("image", "audio", "text")}
    emb = Embedded(feats, {m: torch.arange(n) for m in feats}, n)
    got = joint_positions(emb, ("image", "audio"), "text", rule, chunk_elements=7 * n)[:, 0]

    x, y, t = (feats[m].double() for m in ("image", "audio", "text"))

    def score(i: int, j: int) -> float:
        if rule == "sum":
            return float(x[i] @ t[j] + y[i] @ t[j])
        if rule == "mip":
            return float((x[i] * y[i] * t[j]).sum())
        vectors = torch.stack([t[j], x[i], y[i]])
        return -float(torch.linalg.det(vectors @ vectors.T).clamp(min=0).sqrt())

    for i in range(n):
        s = [score(i, j) for j in range(n)]
        assert got[i] == 1 + sum(v > s[i] for v in s)
    with pytest.raises(ValueError, match="choose one of"):
        joint_positions(emb, ("image", "audio"), "text", "product")


def test_a_joint_query_names_towers_the_model_has(tiny_model_cfg, demo_shards, tmp_path, capsys):
    from tessera.models import build_model, save_model

    save_model(build_model(tiny_model_cfg), tmp_path / "model", formats=())
    args = ["--model", str(tmp_path / "model"), "--data", str(demo_shards / "val-000000.tar"), "--target", "text"]
    rc, _, err = call_main(retrieval_main, [*args, "--query", "image+audio"], capsys)
    assert rc == 2 and "no 'audio' tower" in err
    rc, _, err = call_main(retrieval_main, [*args, "--query", "image+text"], capsys)
    assert rc == 2 and "not the --target" in err
    rc, out, err = call_main(retrieval_main, [*args, "--query", "image+image"], capsys)
    assert rc == 2
