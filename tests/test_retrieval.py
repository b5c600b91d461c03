"""Retrieval metrics against a brute-force computation, and the evaluation CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from eval.retrieval import chance_metrics, positive_ranks, retrieval_metrics

from .conftest import PY, run_cli


def brute_force_ranks(q, t):
    ranks = []
    for i in range(q.shape[0]):
        sims = (q[i] @ t.T).tolist()
        order = sorted(range(len(sims)), key=lambda j: (-sims[j], j))  # stable: ties to the lower index
        ranks.append(order.index(i) + 1)
    return torch.tensor(ranks)


@pytest.mark.parametrize("n,chunk", [(1, 4), (50, 7), (203, 64), (203, 4096)])
def test_ranks_match_a_full_sort(n, chunk):
    g = torch.Generator().manual_seed(n)
    q = F.normalize(torch.randn(n, 8, generator=g), dim=-1)
    t = F.normalize(q + 0.8 * torch.randn(n, 8, generator=g), dim=-1)
    assert torch.equal(positive_ranks(q, t, chunk=chunk), brute_force_ranks(q, t))


def test_ties_are_broken_by_index_as_topk_does():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert positive_ranks(q, t).tolist() == [1, 2, 3]


def test_metrics_and_chance():
    q = torch.eye(4)
    t = torch.eye(4)[[0, 1, 3, 2]]
    m = retrieval_metrics(q, t, "text", "image", ks=(1, 2))
    assert m["text_to_image_R@1"] == 0.5 and m["text_to_image_R@2"] == 0.5
    assert m["image_to_text_R@1"] == 0.5  # ranks 1, 1, 4, 4
    assert m["text_to_image_mean_rank"] == 2.5 and m["text_to_image_median_rank"] == 2.0
    c = chance_metrics(480, "text", "image")
    assert c["text_to_image_R@1"] == pytest.approx(1 / 480) and c["image_to_text_R@10"] == pytest.approx(10 / 480)


@pytest.mark.slow
def test_retrieval_cli_on_an_exported_model(tiny_model_cfg, demo_shards, tmp_path):
    from models import build_model, save_model

    torch.manual_seed(0)
    save_model(build_model(tiny_model_cfg), tmp_path / "model")
    out = tmp_path / "res.json"
    proc = run_cli([PY, "-m", "eval.retrieval", "--model", str(tmp_path / "model"), "--data",
                    str(demo_shards / "val-000000.tar"), "--out", str(out), "--batch-size", "100"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["task"] == "retrieval" and doc["n"] == {"text-image": 480}
    assert set(doc["metrics"]) == set(doc["chance"])
    assert all(0 <= v <= 1 for k, v in doc["metrics"].items() if "_R@" in k)
    assert "text_to_image" in proc.stdout
    proc = run_cli([PY, "-m", "eval.retrieval", "--model", str(tmp_path / "model"), "--data",
                    str(demo_shards / "val-000000.tar"), "--query", "audio"])
    assert proc.returncode == 2 and "no 'audio' tower" in proc.stderr
