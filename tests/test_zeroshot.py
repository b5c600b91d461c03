"""Zero-shot classification: classes.json checks, the metrics against brute force, open_clip's classifier
recipe, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tessera.eval.zeroshot import (
    ClassesError,
    build_classifier,
    classification_metrics,
    confusion_matrix,
    read_classes,
)
from tessera.eval.zeroshot import main as zeroshot_main

from .conftest import PY, call_main, run_cli


def test_classes_json_is_checked(tmp_path):
    path = tmp_path / "c.json"
    for doc, message in [
        ({"classnames": []}, "non-empty list 'classnames'"),
        ({"classnames": ["cat"], "templates": ["a photo of a cat"]}, "must contain '{}'"),
        ({"classnames": ["cat"], "templates": ["{} and {}"]}, "exactly once"),
        ({"classnames": ["cat", ""]}, "non-empty string"),
    ]:
        path.write_text(json.dumps(doc))
        with pytest.raises(ClassesError, match=message):
            read_classes(path)
    path.write_text("{not json")
    with pytest.raises(ClassesError, match="cannot read"):
        read_classes(path)
    path.write_text(json.dumps({"classnames": ["cat", "dog"], "templates": "imagenet"}))
    names, templates = read_classes(path)
    assert names == ["cat", "dog"] and len(templates) == 80 and all("{}" in t for t in templates)


def test_metrics_against_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 7, generator=g)
    labels = torch.randint(0, 7, (300,), generator=g)
    m = classification_metrics(logits, labels)
    order = logits.argsort(1, descending=True)
    assert m["acc1"] == pytest.approx((order[:, 0] == labels).float().mean().item())
    assert m["acc5"] == pytest.approx((order[:, :5] == labels[:, None]).any(1).float().mean().item())
    recalls = [((order[:, 0] == c) & (labels == c)).sum() / (labels == c).sum() for c in range(7)]
    assert m["mean_per_class_recall"] == pytest.approx(torch.stack(recalls).float().mean().item())
    cm = confusion_matrix(order[:, 0], labels, 7)
    assert cm.sum() == 300 and cm.trace() == (order[:, 0] == labels).sum()
    with pytest.raises(ValueError, match="outside the 7 classes"):
        classification_metrics(logits, torch.tensor([0] * 299 + [9]))


def test_classifier_is_the_mean_of_normalised_template_embeddings(tiny_model_cfg):
    from tessera.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_model_cfg)
    names, templates = ["circle", "star", "cross"], ["a {}", "a picture of a {}"]
    weights = build_classifier(model, names, templates)
    tf, collate = model.transforms(False)["text"], model.collators()["text"]
    with torch.no_grad():
        for c, name in enumerate(names):
            emb = model.encode("text", collate([tf(t.format(name)) for t in templates]))
            assert torch.allclose(weights[:, c], F.normalize(emb.mean(0), dim=0), atol=1e-6)


@pytest.mark.slow
def test_zeroshot_cli(tiny_model_cfg, demo_shards, unlabelled_shard, tmp_path, capsys):
    from tessera.models import build_model, save_model

    torch.manual_seed(0)
    save_model(build_model(tiny_model_cfg), tmp_path / "model")
    out = tmp_path / "zs.json"
    base = [
        PY,
        "-m",
        "tessera.eval.zeroshot",
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(demo_shards / "val-000000.tar"),
    ]
    proc = run_cli([*base, "--classes", str(demo_shards / "classes.json"), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["task"] == "zeroshot_classification" and doc["n"] == 480 and doc["classes"] == 6
    assert set(doc["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"} == set(doc["chance"])
    assert all(0 <= v <= 1 for v in doc["metrics"].values()) and doc["chance"]["acc1"] == pytest.approx(1 / 6)
    assert sum(map(sum, doc["confusion"])) == 480 and (tmp_path / "zs_confusion.png").stat().st_size > 0

    # the error paths, in this process
    args = base[3:]
    few = tmp_path / "few.json"
    few.write_text(json.dumps({"classnames": ["circle", "square"], "templates": ["a {}"]}))
    rc, _, err = call_main(zeroshot_main, [*args, "--classes", str(few)], capsys)
    assert rc == 2 and "outside the 2 classes" in err
    few.write_text(json.dumps({"classnames": ["circle"], "templates": ["a circle"]}))
    rc, _, err = call_main(zeroshot_main, [*args, "--classes", str(few)], capsys)
    assert rc == 2 and "must contain '{}'" in err
    classes = ["--classes", str(demo_shards / "classes.json")]
    rc, _, err = call_main(zeroshot_main, [*args, *classes, "--modality", "audio"], capsys)
    assert rc == 2 and "no 'audio' tower" in err
    rc, _, err = call_main(
        zeroshot_main, ["--model", str(tmp_path / "model"), "--data", str(unlabelled_shard), *classes], capsys
    )
    assert rc == 2 and "`cls` label" in err
    rc, _, err = call_main(zeroshot_main, args, capsys)  # no classes, and the data is no CLIP_benchmark dataset
    assert rc == 2 and "--classes is required" in err


def test_classifier_from_a_hugging_face_text_tower():
    """A Hugging Face text tower's tokens are a dict of tensors: the classifier builds from them too."""
    from tessera.config import from_dict
    from tessera.eval.zeroshot import build_classifier
    from tessera.models import ModelConfig, build_model

    from .conftest import TINY_MODEL

    hf = {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 32,
    }
    towers = {"image": TINY_MODEL["towers"]["image"], "text": {"encoder": "hf_text", "config": hf, "max_length": 16}}
    model = build_model(from_dict(ModelConfig, {"embed_dim": 16, "towers": towers}, "model"))
    weights = build_classifier(model, ["circle", "star", "cross"], ["a {}", "a picture of a {}"])
    assert weights.shape == (16, 3) and torch.allclose(weights.norm(dim=0), torch.ones(3), atol=1e-5)
