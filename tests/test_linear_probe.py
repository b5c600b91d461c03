"""Linear probe: the logistic regression itself, and the CLI on labelled shards."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tessera.eval.linear_probe import fit_logistic, linear_probe

from .conftest import PY, SEED, call_main, learned, run_cli


def _clusters(n, d, classes, noise, seed, centre_seed=0):
    centres = F.normalize(torch.randn(classes, d, generator=torch.Generator().manual_seed(centre_seed)), dim=-1)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return F.normalize(centres[y] + noise * torch.randn(n, d, generator=g), dim=-1), y


def test_logistic_regression_reaches_the_optimum():
    x, y = _clusters(200, 6, 3, 0.3, 0)
    W, b = fit_logistic(x, y, 3, weight_decay=1e-2)
    W.requires_grad_(True)
    b.requires_grad_(True)
    loss = F.cross_entropy(x @ W + b, y) + 0.5 * 1e-2 * W.pow(2).sum()
    loss.backward()
    assert W.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4  # a stationary point of a convex loss


@pytest.mark.learning
def test_probe_separates_clusters_and_scores_the_test_split():
    train_x, train_y = _clusters(300, 16, 5, 0.4, 1 + 2 * SEED)
    test_x, test_y = _clusters(200, 16, 5, 0.4, 2 + 2 * SEED)  # the same classes, other samples
    result = linear_probe(train_x, train_y, test_x, test_y)
    # the Bayes-optimal rule here is the nearest true centre: the probe must come close to it
    centres = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    optimal = ((test_x @ centres.T).argmax(1) == test_y).float().mean().item()
    assert optimal > 0.8
    learned(result["metrics"]["acc1"], optimal - 0.05, "test acc1 over the Bayes-optimal rule's - 0.05")
    assert result["chance"]["acc1"] == pytest.approx(0.2)
    assert result["weight_decay"] in (1e-6, 1e-4, 1e-2) and result["classes"] == 5
    noise_x = F.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(5)), dim=-1)
    chance_level = linear_probe(noise_x, train_y, test_x, test_y)["metrics"]["acc1"]
    assert chance_level < 0.5  # features that carry nothing about the label give nothing


@pytest.mark.slow
def test_linear_probe_cli(tiny_model_cfg, demo_shards, unlabelled_shard, tmp_path, capsys):
    from tessera.eval.linear_probe import main as probe_main
    from tessera.models import build_model, save_model

    torch.manual_seed(0)
    save_model(build_model(tiny_model_cfg), tmp_path / "model")
    out = tmp_path / "probe.json"
    val = str(demo_shards / "val-000000.tar")
    proc = run_cli(
        [
            PY,
            "-m",
            "tessera.eval.linear_probe",
            "--model",
            str(tmp_path / "model"),
            "--train",
            val,
            "--test",
            val,
            "--out",
            str(out),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["task"] == "linear_probe" and doc["n"] == {"train": 480, "test": 480} and doc["classes"] == 6
    assert all(0 <= v <= 1 for v in doc["metrics"].values())
    args = ["--model", str(tmp_path / "model"), "--train", str(unlabelled_shard), "--test", val]
    rc, _, err = call_main(probe_main, args, capsys)  # an error path, in this process
    assert rc == 2 and "`cls` label" in err
