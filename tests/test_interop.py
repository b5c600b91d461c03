"""Models that travel: a Tessera export as an open_clip and a transformers model, and back; imported temperatures."""

from __future__ import annotations

import json
import logging

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tessera.config import from_dict
from tessera.eval.retrieval import main as retrieval_main
from tessera.models import ConfigError, ModelConfig, build_model, load_model, save_model
from tessera.models.hf_clip_io import from_hf
from tessera.models.open_clip_io import NotRepresentable, from_open_clip
from tessera.train.cli import main as cli

from .conftest import PY, TINY_MODEL, call_main, run_cli

CAPTIONS = ["a big red circle", "Two small squares, on the LEFT!", "tiny " * 40]


def _images(seed: int = 0) -> list[Image.Image]:
    """Noise pictures of sizes that the transforms must resize and crop."""
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in ((40, 50), (71, 33))]


def _trained_like(cfg: dict, seed: int = 0):
    """A model with random weights and a temperature no fresh model has."""
    torch.manual_seed(seed)
    model = build_model(from_dict(ModelConfig, cfg, "model")).eval()
    with torch.no_grad():
        for p in model.logit_scales.values():
            p.fill_(3.7)
    return model


def _embed(model, images, captions):
    tf, tok = model.towers["image"].transform(False), model.towers["text"].transform(False)
    with torch.no_grad():
        return (
            model.encode("image", torch.stack([tf(i) for i in images])),
            model.encode("text", torch.stack([tok(c) for c in captions])),
        )


def test_export_writes_an_open_clip_model_that_open_clip_loads_to_the_same_embeddings(tmp_path):
    model = _trained_like(TINY_MODEL)
    out = save_model(model, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "open_clip", "tessera_model.safetensors"]
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out / 'open_clip'}")
    oc.eval()
    images = _images()
    with torch.no_grad():
        z_img = oc.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        z_txt = oc.encode_text(open_clip.get_tokenizer(f"local-dir:{out / 'open_clip'}")(CAPTIONS), normalize=True)
    ours_img, ours_txt = _embed(model, images, CAPTIONS)
    assert (z_img - ours_img).abs().max() < 1e-6 and (z_txt - ours_txt).abs().max() < 1e-6
    assert torch.equal(oc.logit_scale.exp(), model.logit_scale("image", "text").detach())
    # ... and back: Tessera -> open_clip -> Tessera is bit-exact, temperature included
    back = from_open_clip(out / "open_clip")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_linear_heads_fold_into_open_clip_projections_and_hf_refuses_a_resnet(tmp_path):
    cfg = {
        **TINY_MODEL,
        "towers": {
            "image": {
                "encoder": "open_clip_image",
                "model": "RN50",
                "overrides": {"layers": [1, 1, 1, 1], "width": 16, "image_size": 64, "head_width": 32},
                "output_dim": 48,
            },
            "text": {**TINY_MODEL["towers"]["text"], "output_dim": 40},
        },
    }
    model = _trained_like(cfg)
    out = save_model(model, tmp_path / "model")
    back = from_open_clip(out / "open_clip")  # identity heads now: the projections took the linear heads
    images = _images()
    for ours, theirs in zip(_embed(model, images, CAPTIONS), _embed(back, images, CAPTIONS)):
        assert (ours - theirs).abs().max() < 1e-6
    r = run_cli([PY, "-m", "tessera.train.cli", "export", "--format", "hf", str(out)])
    assert r.returncode == 2 and "ModifiedResNet" in r.stderr and "only a ViT" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (out / "hf").exists()


def test_what_open_clip_cannot_hold_is_named_not_dropped(tmp_path, caplog, capsys):
    mlp = {
        **TINY_MODEL,
        "towers": {**TINY_MODEL["towers"], "text": {**TINY_MODEL["towers"]["text"], "head": {"kind": "mlp"}}},
    }
    with caplog.at_level(logging.INFO):
        out = save_model(_trained_like(mlp), tmp_path / "mlp")
    assert not (out / "open_clip").exists()
    assert any("no open_clip export" in r.message and "text head" in r.message for r in caplog.records)
    rc, _, err = call_main(cli, ["export", "--format", "open_clip", str(out)], capsys)
    assert rc == 2 and "is not one linear projection" in err, err
    # a third tower stays in the Tessera export, and the export says so
    joint = {
        **TINY_MODEL,
        "towers": {
            **TINY_MODEL["towers"],
            "audio": {"encoder": "ast", "width": 32, "depth": 1, "heads": 2, "patch_size": 16},
        },
    }
    caplog.clear()
    with caplog.at_level(logging.INFO):
        out = save_model(_trained_like(joint), tmp_path / "joint")
    assert (out / "open_clip" / "open_clip_model.safetensors").is_file()
    assert any("audio (ast) stays in the Tessera export only" in r.message for r in caplog.records)


def test_hf_export_gives_the_same_embeddings_through_clip_processor_and_imports_back(tmp_path, capsys):
    from transformers import CLIPModel, CLIPProcessor

    model = _trained_like(TINY_MODEL)
    out = save_model(model, tmp_path / "model")
    rc, _, err = call_main(cli, ["export", "--format", "hf", str(out)], capsys)
    assert rc == 0, err
    hf = CLIPModel.from_pretrained(str(out / "hf")).eval()
    # the PIL backend resizes as open_clip does; transformers' default torchvision backend resizes tensors with a
    # slightly different bicubic filter (differences up to 1e-4 on noise pictures that need resizing)
    processor = CLIPProcessor.from_pretrained(str(out / "hf"), backend="pil")
    images = _images()
    inputs = processor(text=CAPTIONS, images=images, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        got = hf(**inputs)
    ours_img, ours_txt = _embed(model, images, CAPTIONS)
    assert (got.image_embeds - ours_img).abs().max() < 1e-5 and (got.text_embeds - ours_txt).abs().max() < 1e-5
    assert torch.allclose(hf.logit_scale.exp(), model.logit_scale("image", "text"))
    # transformers' default processor agrees too on pictures already at the tower's size
    square = [i.resize((32, 32)) for i in images]
    default = CLIPProcessor.from_pretrained(str(out / "hf"))(images=square, return_tensors="pt")
    with torch.no_grad():
        z = torch.nn.functional.normalize(hf.get_image_features(**default).pooler_output, dim=-1)
    assert (z - _embed(model, square, CAPTIONS)[0]).abs().max() < 1e-5
    # and back: HF -> Tessera gives the same weights
    rc, _, err = call_main(cli, ["import", "hf", str(out / "hf"), "--out", str(tmp_path / "back")], capsys)
    assert rc == 0, err
    a, b = model.state_dict(), load_model(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=0, rtol=0) for k in a)


def test_a_tessera_export_is_never_mistaken_for_a_transformers_model(tmp_path):
    from transformers import CLIPModel

    out = save_model(_trained_like(TINY_MODEL), tmp_path / "model")
    with pytest.raises(OSError, match="no file named model.safetensors"):
        CLIPModel.from_pretrained(str(out))  # not a random CLIP with a report of missing keys
    # exports written before the rename still load
    (out / "tessera_model.safetensors").rename(out / "model.safetensors")
    load_model(out)


def test_import_an_open_clip_train_checkpoint_keeps_its_temperature_and_trains_and_evaluates(
    tmp_path, demo_shards, capsys, in_process_training
):
    model = _trained_like(TINY_MODEL)
    out = save_model(model, tmp_path / "model")
    state = load_file(str(out / "open_clip" / "open_clip_model.safetensors"))
    # open_clip_train's checkpoint: DDP's "module." prefix inside "state_dict"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "epoch_3.pt")
    model_cfg = json.loads((out / "open_clip" / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "tiny.json").write_text(json.dumps(model_cfg))
    rc, _, err = call_main(cli, ["import", "open_clip", str(tmp_path / "epoch_3.pt"), "--out", "x"], capsys)
    assert rc == 2 and "--model" in err
    imported = tmp_path / "imported"
    args = ["import", "open_clip", str(tmp_path / "epoch_3.pt"), "--model", str(tmp_path / "tiny.json")]
    rc, _, err = call_main(cli, [*args, "--out", str(imported)], capsys)
    assert rc == 0, err
    got = load_model(imported)
    assert torch.equal(got.logit_scale("image", "text"), model.logit_scale("image", "text").detach())  # not 1/0.07
    for ours, theirs in zip(_embed(model, _images(), CAPTIONS), _embed(got, _images(), CAPTIONS)):
        assert torch.equal(ours, theirs)
    data = ["--data", str(demo_shards / "val-000000.tar"), "--out", str(tmp_path / "ret.json")]
    rc, _, err = call_main(retrieval_main, ["--model", str(imported), *data], capsys)
    assert rc == 0, err
    # ... and fine-tunes (LoRA, two steps) with the temperature it brought
    from tessera.train.finetune import main as finetune_main

    from .test_adapters import _finetune_args

    common = ["train.steps=2", "train.precision=fp32", "data.val=[]", "data.num_workers=0"]
    assert finetune_main(_finetune_args(imported, tmp_path / "tuned", demo_shards, *common)) == 0
    tuned = load_model(tmp_path / "tuned" / "model")  # the LoRA merged into the imported base
    assert torch.equal(tuned.logit_scales["image__text"], got.logit_scales["image__text"])
    # a mismatched architecture is a clear error
    with pytest.raises(ConfigError, match="does not match"):
        from_open_clip(tmp_path / "epoch_3.pt", "RN50")


def test_pretrained_towers_take_the_checkpoint_temperature(tmp_path, caplog):
    model = _trained_like(TINY_MODEL)
    out = save_model(model, tmp_path / "model")
    weights = str(out / "open_clip" / "open_clip_model.safetensors")
    towers = {m: {**t, "pretrained": weights} for m, t in TINY_MODEL["towers"].items()}
    fresh = build_model(from_dict(ModelConfig, {**TINY_MODEL, "towers": towers}, "model"))
    assert torch.equal(fresh.logit_scales["image__text"], model.logit_scales["image__text"])
    # a checkpoint's temperature above the clamp is kept but said
    state = load_file(weights)
    state["logit_scale"] = torch.tensor(5.0)
    save_file(state, str(tmp_path / "hot.safetensors"))
    towers = {m: {**t, "pretrained": str(tmp_path / "hot.safetensors")} for m, t in TINY_MODEL["towers"].items()}
    with caplog.at_level(logging.WARNING):
        build_model(from_dict(ModelConfig, {**TINY_MODEL, "towers": towers}, "model"))
    assert any("max_logit_scale" in r.message for r in caplog.records)
    with pytest.raises(NotRepresentable, match="CLIPModel"):
        from_hf_dir = tmp_path / "not-clip"
        from_hf_dir.mkdir()
        (from_hf_dir / "config.json").write_text('{"model_type": "bert"}')
        from_hf(from_hf_dir)


def test_a_wrong_out_never_deletes_a_users_files(tmp_path, capsys):
    out = save_model(_trained_like(TINY_MODEL), tmp_path / "model")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for args in (
        ["export", "--format", "open_clip", str(out), "--out", str(tmp_path / "mine")],
        ["export", "--format", "open_clip", str(out), "--out", str(out)],  # the source itself
        ["export", "--format", "open_clip", str(out), "--out", str(tmp_path)],  # a folder holding the source
        ["import", "open_clip", str(out / "open_clip"), "--out", str(tmp_path / "mine")],
    ):
        rc, _, err = call_main(cli, args, capsys)
        assert rc == 2 and ("would be replaced" in err or "holds) the source" in err), (args, err)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and load_model(out)
    # a previous output of the same kind is replaced
    for _ in range(2):
        rc, _, err = call_main(
            cli, ["import", "open_clip", str(out / "open_clip"), "--out", str(tmp_path / "b")], capsys
        )
        assert rc == 0, err
