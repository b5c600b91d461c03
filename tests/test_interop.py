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


def _siglip_dir(path, vocab_lines):
    """A transformers SiglipModel directory as google's SigLIP checkpoints are laid out: weights, config, a
    SentencePiece tokenizer (trained here on a few sentences, so nothing is downloaded), an image processor. The
    image tower has the shape of timm's `vit_base_patch32_siglip_256`; the text tower is small."""
    import io

    import sentencepiece as spm
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipTokenizer

    spm_model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(vocab_lines), model_writer=spm_model, vocab_size=120, model_type="unigram",
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    path.mkdir()
    (path / "spiece.model").write_bytes(spm_model.getvalue())
    tokenizer = SiglipTokenizer(vocab_file=str(path / "spiece.model"), model_max_length=16)
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 16, "projection_size": 768, **special}  # fmt: skip
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "image_size": 256, "patch_size": 32}  # fmt: skip
    torch.manual_seed(0)
    hf = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():  # a trained temperature and bias, not the initial ones
        hf.logit_scale.fill_(3.1)
        hf.logit_bias.fill_(-7.5)
        hf.vision_model.head.probe.normal_()  # (initialised to zeros or not, the import must carry it)
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    SiglipImageProcessorPil(size={"height": 256, "width": 256}, resample=3).save_pretrained(path)
    return hf


@pytest.mark.slow
def test_import_a_transformers_siglip_model_with_its_tokenizer_and_export_it_to_open_clip(tmp_path, capsys):
    """SiglipModel -> Tessera (timm SigLIP ViT + open_clip text tower + the directory's tokenizer) -> open_clip and
    back, each with transformers' embeddings, token ids, temperature and bias; the export stands without the
    source folder."""
    import shutil

    from transformers import SiglipProcessor

    import tessera

    captions = ["a photo of a red circle", "Two small squares, on the LEFT!", "a blue triangle moving left"]
    hf = _siglip_dir(tmp_path / "siglip", captions * 20 + ["the quick brown fox jumps over the lazy dog"] * 20)
    processor = SiglipProcessor.from_pretrained(str(tmp_path / "siglip"), backend="pil")
    images = [i.resize((256, 256)) for i in _images()]
    inputs = processor(
        text=captions, images=images, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        got = hf(**inputs)
    rc, out, err = call_main(cli, ["import", "hf", str(tmp_path / "siglip"), "--out", str(tmp_path / "model")], capsys)
    assert rc == 0, err
    shutil.rmtree(tmp_path / "siglip")  # the export carries the tokenizer: nothing points back at the source
    model = tessera.load(tmp_path / "model")
    z = model.embed(images=images, texts=captions)
    assert (z["images"] - got.image_embeds).abs().max() < 1e-5 and (z["texts"] - got.text_embeds).abs().max() < 1e-5
    assert torch.allclose(model.module.logit_scale("image", "text"), got.logits_per_text.new_tensor(3.1).exp())
    assert model.module.logit_biases["image__text"].item() == pytest.approx(-7.5)
    # the open_clip form beside it: open_clip's own SigLIP layout (timm trunk, custom text, tokenizer files inside)
    oc_dir = f"local-dir:{tmp_path / 'model/open_clip'}"
    oc, tokenizer = open_clip.create_model(oc_dir).eval(), open_clip.get_tokenizer(oc_dir)
    assert torch.equal(tokenizer(captions), inputs["input_ids"])
    with torch.no_grad():
        z_oc = oc.encode_text(tokenizer(captions), normalize=True)
    assert (z_oc - got.text_embeds).abs().max() < 1e-5
    assert oc.logit_bias.item() == pytest.approx(-7.5)
    # and back from open_clip: the same weights
    rc, _, err = call_main(cli, ["import", "open_clip", str(tmp_path / "model/open_clip"), "--out",
                                 str(tmp_path / "back")], capsys)  # fmt: skip
    assert rc == 0, err
    a, b = model.module.state_dict(), load_model(tmp_path / "back").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_siglip_vision_tower_timm_does_not_have_is_refused_by_its_shape():
    from types import SimpleNamespace

    from tessera.models.hf_siglip_io import timm_vision_name

    base = SimpleNamespace(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16
    )
    assert timm_vision_name(SimpleNamespace(**vars(base), image_size=384)) == "vit_base_patch16_siglip_384"
    with pytest.raises(NotRepresentable, match="no timm SigLIP ViT has this vision tower's shape"):
        timm_vision_name(SimpleNamespace(**{**vars(base), "num_hidden_layers": 6}, image_size=224))
