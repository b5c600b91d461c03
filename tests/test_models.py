"""Towers, heads, temperatures, the registry, HF text encoders, open_clip weights, export round trips."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
from PIL import Image

from tessera import modalities
from tessera.config import ConfigError, from_dict
from tessera.models import ModelConfig, build_model, load_model, save_model

from .conftest import TINY_MODEL

HF_TINY = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
}


def _batch(model, captions=("a red circle", "a blue square")):
    tf = model.transforms(is_train=False)
    images = torch.stack([tf["image"](Image.new("RGB", (40, 40), c)) for c in ("red", "blue")])
    return {"image": images, "text": model.collators()["text"]([tf["text"](c) for c in captions])}


def test_forward_gives_normalised_embeddings_and_a_clamped_scale(tiny_model_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg)
    out = model(_batch(model))
    for m in ("image", "text"):
        assert out["features"][m].shape == (2, 32)
        assert torch.allclose(out["features"][m].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert out["logit_scale"]["image__text"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scales["image__text"].fill_(10.0)
    assert model.logit_scale("image", "text").item() == pytest.approx(100.0)
    scale = model(_batch(model))["logit_scale"]["image__text"]
    scale.backward()
    assert model.logit_scales["image__text"].grad.item() == 0.0  # clamped: no push beyond 100


def test_registry_is_explicit_and_checks_modalities():
    names = modalities.encoder_names()
    assert {"open_clip_image": "image", "open_clip_text": "text", "hf_text": "text"}.items() <= names.items()
    bad = {"embed_dim": 8, "towers": {"image": {"encoder": "open_clip_text"}}}
    with pytest.raises(ConfigError, match="encodes 'text'; put it under towers.text"):
        from_dict(ModelConfig, bad, "model")


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50", "ViT-L-14", "convnext_base"])
def test_any_open_clip_config_name_builds_open_clips_architecture(name):
    ref_cfg = open_clip.get_model_config(name)
    cfg = from_dict(
        ModelConfig,
        {
            "embed_dim": ref_cfg["embed_dim"],
            "towers": {
                "image": {"encoder": "open_clip_image", "model": name},
                "text": {"encoder": "open_clip_text", "model": name},
            },
        },
        "model",
    )
    with torch.device("meta"):
        model = build_model(cfg)
        ref = open_clip.create_model(name, pretrained=None, device="meta")
    towers = sum(p.numel() for t in model.towers.values() for p in t.parameters())
    assert towers == sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("logit_"))
    assert model.towers["text"].context_length == ref_cfg["text_cfg"]["context_length"]
    assert model.towers["image"].preprocess_cfg.size == ref_cfg["vision_cfg"]["image_size"]


def test_towers_load_open_clip_checkpoints_and_match_open_clip(tmp_path):
    """A tower initialised from an open_clip checkpoint computes exactly what open_clip computes."""
    tiny = {
        "embed_dim": 32,
        "vision_cfg": TINY_MODEL["towers"]["image"]["overrides"],
        "text_cfg": TINY_MODEL["towers"]["text"]["overrides"],
    }
    from open_clip.model import CLIP

    torch.manual_seed(1)
    ref = CLIP(**tiny).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "oc.pt")
    cfg = from_dict(
        ModelConfig,
        {
            "embed_dim": 32,
            "towers": {
                t: {**TINY_MODEL["towers"][t], "pretrained": str(tmp_path / "oc.pt")} for t in ("image", "text")
            },
        },
        "model",
    )
    model = build_model(cfg).eval()
    batch = _batch(model)
    with torch.no_grad():
        assert torch.allclose(
            model.encode("image", batch["image"]), ref.encode_image(batch["image"], normalize=True), atol=1e-6
        )
        assert torch.allclose(
            model.encode("text", batch["text"]), ref.encode_text(batch["text"], normalize=True), atol=1e-6
        )
    # the tokenizer is open_clip's, offline
    assert torch.equal(batch["text"][0], open_clip.tokenizer.SimpleTokenizer(context_length=16)(["a red circle"])[0])


def test_pretrained_mismatch_is_a_clear_error(tmp_path):
    torch.save({"visual.proj": torch.zeros(3, 3)}, tmp_path / "w.pt")
    cfg = {
        **TINY_MODEL,
        "towers": {
            **TINY_MODEL["towers"],
            "image": {**TINY_MODEL["towers"]["image"], "pretrained": str(tmp_path / "w.pt")},
        },
    }
    with pytest.raises(ConfigError, match="does not match the tower's architecture"):
        build_model(from_dict(ModelConfig, cfg, "model"))


def test_export_round_trip_gives_identical_embeddings(tiny_model_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg).eval()
    save_model(model, tmp_path / "model", metadata={"step": 3})
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "config.yaml",
        "open_clip",
        "tessera_model.safetensors",
    ]
    loaded = load_model(tmp_path / "model")
    batch = _batch(model)
    with torch.no_grad():
        for m in ("image", "text"):
            assert torch.equal(model.encode(m, batch[m]), loaded.encode(m, batch[m]))
    # an existing export is replaced atomically, leaving no temporary directories behind
    save_model(model, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_export_permissions_follow_the_umask_and_an_existing_export_is_swapped_in_one_step(
    tiny_model_cfg, tmp_path, monkeypatch, umask
):
    import os

    from tessera import durable

    model = build_model(tiny_model_cfg).eval()
    previous = os.umask(umask)
    try:
        save_model(model, tmp_path / "model")
        out = tmp_path / "model"
        assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
        for f in out.rglob("*"):
            assert f.stat().st_mode & 0o777 == (0o777 if f.is_dir() else 0o666) & ~umask, f.name
        # over an existing export: one atomic exchange where the filesystem has it, never a moment without
        swaps = []
        exchange = durable._exchange
        monkeypatch.setattr(durable, "_exchange", lambda a, b: swaps.append(exchange(a, b)) or swaps[-1])
        save_model(model, out, metadata={"again": True})
        assert swaps in ([True], [False])  # False: this filesystem has no RENAME_EXCHANGE; two renames instead
        assert "again" in (out / "config.yaml").read_text()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    finally:
        os.umask(previous)


def test_load_model_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.yaml"):
        load_model(tmp_path)
    (tmp_path / "config.yaml").write_text("format: something-else\n")
    with pytest.raises(ConfigError, match="not a Tessera model config"):
        load_model(tmp_path)


def test_hf_text_encoder_from_in_code_config(tmp_path):
    cfg = from_dict(
        ModelConfig,
        {
            "embed_dim": 16,
            "towers": {
                "image": TINY_MODEL["towers"]["image"],
                "text": {"encoder": "hf_text", "config": HF_TINY, "max_length": 12},
            },
        },
        "model",
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.towers["text"].output_dim == 32  # the hidden size; a linear head maps it to 16
    batch = _batch(model, ("short", "a much longer caption with many words"))
    assert batch["text"]["input_ids"].shape == (2, 12)
    emb = model.encode("text", batch["text"])
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    # padding does not change a caption's embedding (mean pooling is masked)
    single = model.collators()["text"]([model.transforms(False)["text"]("short")])
    assert torch.allclose(model.encode("text", single)[0], emb[0], atol=1e-5)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert torch.equal(loaded.encode("text", batch["text"]), emb)


def test_hf_text_encoder_from_a_local_directory_with_its_tokenizer(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    hf_dir = tmp_path / "hf"
    tok.save_pretrained(hf_dir)
    torch.manual_seed(0)
    BertModel(
        BertConfig(**{k: v for k, v in HF_TINY.items() if k != "model_type"}, vocab_size=len(words))
    ).save_pretrained(hf_dir)
    cfg = from_dict(
        ModelConfig,
        {
            "embed_dim": 16,
            "towers": {
                "image": TINY_MODEL["towers"]["image"],
                "text": {"encoder": "hf_text", "path": str(hf_dir), "pooling": "cls", "max_length": 8},
            },
        },
        "model",
    )
    model = build_model(cfg).eval()
    item = model.transforms(False)["text"]("a red circle")
    assert item["input_ids"][:5].tolist() == [2, 5, 6, 8, 3]  # [CLS] a red circle [SEP]
    batch = _batch(model)
    save_model(model, tmp_path / "export")
    assert (tmp_path / "export" / "hf_text" / "tokenizer.json").is_file()
    loaded = load_model(tmp_path / "export")
    assert torch.equal(loaded.encode("text", batch["text"]), model.encode("text", batch["text"]))


def test_hf_text_never_downloads():
    with pytest.raises(ConfigError, match="not a local Hugging Face model directory"):
        from_dict(ModelConfig, {"towers": {"text": {"encoder": "hf_text", "path": "bert-base-uncased"}}}, "model")


def test_heads_and_pairs(tiny_model_cfg):
    """An mlp head maps the tower's own width to the shared one; auto is identity when they agree, linear otherwise."""
    cfg = from_dict(
        ModelConfig,
        {
            **TINY_MODEL,
            "embed_dim": 24,
            "towers": {
                "image": {**TINY_MODEL["towers"]["image"], "output_dim": 48, "head": {"kind": "mlp", "hidden_dim": 20}},
                "text": TINY_MODEL["towers"]["text"],
            },
        },
        "model",
    )
    model = build_model(cfg)
    first, last = model.heads["image"][0], model.heads["image"][-1]
    assert (first.in_features, first.out_features, last.in_features, last.out_features) == (48, 20, 20, 24)
    assert model.towers["text"].output_dim == 24 and isinstance(model.heads["text"], torch.nn.Identity)
    out = model({"image": torch.randn(2, 3, 32, 32), "text": torch.randint(1, 400, (2, 16))})
    assert out["features"]["image"].shape == out["features"]["text"].shape == (2, 24)
    assert model.pairs == [("image", "text")] and json.loads(json.dumps(model.cfg.pair_list())) == [["image", "text"]]
    with pytest.raises(ConfigError, match="no tower"):
        from_dict(ModelConfig, {**TINY_MODEL, "pairs": [["image", "audio"]]}, "model")
    assert math.isclose(cfg.init_logit_scale, math.log(1 / 0.07))
    assert math.isclose(float(out["logit_scale"]["image__text"]), 1 / 0.07, rel_tol=1e-5)


@pytest.mark.parametrize("is_train", [True, False])
@pytest.mark.parametrize("mode,size", [("RGB", (64, 48)), ("RGB", (300, 211)), ("L", (40, 40)), ("RGBA", (50, 70))])
def test_image_transform_matches_open_clips_own(is_train, mode, size):
    """The image tower's transform is open_clip's, with its ToTensor + Normalize fused: the same numbers."""
    import numpy as np
    from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
    from PIL import Image

    from tessera.models.open_clip_image import ToTensorNormalize

    model = build_model(from_dict(ModelConfig, TINY_MODEL, "model"))
    ours = model.towers["image"].transform(is_train)
    assert isinstance(ours.transforms[-1], ToTensorNormalize)
    theirs = image_transform_v2(
        PreprocessCfg(size=32), is_train=is_train, aug_cfg=AugmentationCfg() if is_train else None
    )
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)).convert(mode)
    torch.manual_seed(3)
    a = ours(img)
    torch.manual_seed(3)
    b = theirs(img)
    assert a.shape == b.shape == (3, 32, 32) and a.is_contiguous()
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
