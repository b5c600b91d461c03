"""Audio encoders: the AST (timm ViT over log-mels) and Hugging Face audio models (mel and waveform)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile
import torch

from tessera import modalities
from tessera.config import ConfigError, from_dict, to_dict
from tessera.modalities import decoder
from tessera.models import ModelConfig, build_model, load_model, save_model
from tessera.models.audio import ASTConfig, ASTEncoder, HFAudioConfig
from tessera.models.audio_features import AudioConfig, AudioTransform

AUDIO = {"preset": "imagebind", "clip_seconds": 1.0, "eval_crops": 2}  # (128 mel bins, 101 frames)
AST_TINY = {"encoder": "ast", "audio": AUDIO, "width": 64, "depth": 2, "heads": 2}
TEXT_TINY = {
    "encoder": "open_clip_text",
    "model": "ViT-B-32",
    "overrides": {"context_length": 16, "width": 64, "heads": 2, "layers": 1},
}
HF_AST = {
    "model_type": "audio-spectrogram-transformer",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "frequency_stride": 16,
    "time_stride": 16,
}
HF_W2V = {
    "model_type": "wav2vec2",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [16, 16],
    "conv_kernel": [10, 3],
    "conv_stride": [5, 2],
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}


def _ast(**fields) -> ASTEncoder:
    params = {k: v for k, v in {**AST_TINY, **fields}.items() if k != "encoder"}
    return ASTEncoder(from_dict(ASTConfig, params, "ast"), 32)


def _decoded_clip(seconds=1.7, rate=22050):
    """A real clip: a chirp plus noise, written as WAV bytes and decoded the way shards are."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    wave = 0.4 * np.sin(2 * math.pi * (200 + 400 * t) * t) + 0.05 * rng.standard_normal(t.shape)
    buf = io.BytesIO()
    soundfile.write(buf, wave.astype(np.float32), rate, format="WAV")
    return decoder("audio").decode({"wav": buf.getvalue()})


def _model(audio_tower: dict):
    cfg = from_dict(ModelConfig, {"embed_dim": 16, "towers": {"audio": audio_tower, "text": TEXT_TINY}}, "model")
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _audio_batch(model, is_train=False, n=2):
    tf = model.transforms(is_train)["audio"]
    return model.collators()["audio"]([tf(_decoded_clip(1.2 + 0.5 * i)) for i in range(n)])


def test_ast_shapes_and_eval_crops_average_the_per_crop_features():
    torch.manual_seed(0)
    enc = _ast().eval()
    spec_BKMF = torch.randn(3, 2, 128, 101) * 20 - 20
    with torch.no_grad():
        assert enc(spec_BKMF[:, 0]).shape == (3, 64)
        per_crop = torch.stack([enc(spec_BKMF[:, k]) for k in range(2)], 1)
        assert torch.allclose(enc(spec_BKMF), per_crop.mean(1), atol=1e-5)
        assert not torch.allclose(per_crop[:, 0], per_crop[:, 1], atol=1e-3)
    with pytest.raises(ValueError, match=r"expected log-mels \(B, 128, 101\)"):
        enc(torch.randn(2, 128, 100))


@pytest.mark.parametrize(
    "seconds,n_mels,patch,pool", [(0.37, 40, 16, "token"), (1.0, 64, [16, 10], "avg"), (0.05, 21, [8, 4], "avg")]
)
def test_ast_takes_any_clip_length_and_patch(seconds, n_mels, patch, pool):
    audio = {"sample_rate": 16000, "clip_seconds": seconds, "n_mels": n_mels}
    enc = _ast(audio=audio, patch_size=patch, pool=pool, output_dim=24).eval()
    frames = enc.cfg.audio.frames
    ph, pw = enc.cfg.patch
    assert enc.vit.patch_embed.grid_size == (math.ceil(n_mels / ph), math.ceil(frames / pw))
    tf = enc.transform(is_train=True)
    spec = torch.stack([tf(_decoded_clip()) for _ in range(2)])
    assert spec.shape == (2, n_mels, frames)
    out = enc(spec)
    assert out.shape == (2, 24) and torch.isfinite(out).all()


def test_gradients_reach_the_patch_embedding_with_and_without_checkpointing():
    torch.manual_seed(0)
    enc = _ast(drop_path_rate=0.0).train()
    spec = torch.randn(2, 128, 101) * 20 - 20
    grads = []
    for checkpointing in (False, True):
        enc.zero_grad()
        enc.set_grad_checkpointing(checkpointing)
        enc(spec).square().sum().backward()
        grads.append(enc.vit.patch_embed.proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_size_presets_and_explicit_sizes():
    def built(**fields):
        with torch.device("meta"):
            enc = ASTEncoder(from_dict(ASTConfig, fields, "ast"), 32)
        return enc.vit.embed_dim, len(enc.vit.blocks), enc.vit.blocks[0].attn.num_heads, enc.output_dim

    assert built() == (768, 12, 12, 768)  # AST-base
    assert built(size="tiny") == (192, 12, 3, 192)
    assert built(size="small", depth=2, output_dim=100) == (384, 2, 6, 100)
    assert built(width=64, depth=2, heads=2) == (64, 2, 2, 64)
    with pytest.raises(ConfigError, match="not divisible by heads"):
        from_dict(ASTConfig, {"width": 64, "heads": 3})
    with pytest.raises(ConfigError, match="is not one of"):
        from_dict(ASTConfig, {"size": "huge"})
    with pytest.raises(ConfigError, match="patch_size"):
        from_dict(ASTConfig, {"patch_size": [16, 0]})


def test_clip_norm_ignores_recording_level():
    torch.manual_seed(0)
    enc = _ast(norm="clip").eval()
    spec = torch.randn(2, 128, 101) * 20 - 20
    with torch.no_grad():
        assert torch.allclose(enc(spec), enc(spec - 30.0), atol=1e-4)  # 30 dB quieter: the same features


def test_yaml_config_through_the_model_and_the_export_round_trip(tmp_path):
    assert (modalities.encoder_names()["ast"], modalities.encoder_names()["hf_audio"]) == ("audio", "audio")
    model = _model(AST_TINY)
    audio_cfg = model.cfg.towers["audio"].params.audio
    assert (audio_cfg.sample_rate, audio_cfg.n_mels, audio_cfg.clip_seconds, audio_cfg.eval_crops) == (
        16000,
        128,
        1.0,
        2,
    )
    assert from_dict(ModelConfig, to_dict(model.cfg), "model") == model.cfg
    batch = _audio_batch(model)
    assert batch.shape == (2, 2, 128, 101)
    with torch.no_grad():
        emb = model.encode("audio", batch)
        assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
        train_batch = _audio_batch(model, is_train=True)
        assert train_batch.shape == (2, 128, 101)
        save_model(model, tmp_path / "m")
        loaded = load_model(tmp_path / "m")
        assert loaded.cfg.towers["audio"].params == model.cfg.towers["audio"].params
        assert torch.equal(loaded.encode("audio", batch), emb)


def test_waveform_transform_gives_the_same_crops_as_the_mel_transform():
    cfg = from_dict(AudioConfig, AUDIO)
    decoded = _decoded_clip(2.3)
    mel_tf, wave_tf = AudioTransform(cfg, False), AudioTransform(cfg, False, features="waveform")
    clips_KS = wave_tf(decoded)
    assert clips_KS.shape == (2, 16000)
    assert torch.allclose(mel_tf.to_db(mel_tf.mel(clips_KS)), mel_tf(decoded))
    train = AudioTransform(cfg, True, features="waveform")(decoded)
    assert train.shape == (16000,) and train.untyped_storage().nbytes() == 16000 * 4


def test_hf_audio_spectrogram_model_from_in_code_config(tmp_path):
    model = _model({"encoder": "hf_audio", "audio": AUDIO, "config": HF_AST, "pooling": "cls"})
    hf_cfg = model.towers["audio"].model.config
    assert (hf_cfg.num_mel_bins, hf_cfg.max_length) == (128, 101)  # filled from the audio config
    assert model.towers["audio"].output_dim == 32
    batch = _audio_batch(model)
    with torch.no_grad():
        emb = model.encode("audio", batch)
        assert emb.shape == (2, 16) and torch.isfinite(emb).all()
        per_crop = torch.stack([model.towers["audio"](batch[:, k]) for k in range(2)], 1).mean(1)
        assert torch.allclose(model.towers["audio"](batch), per_crop, atol=1e-5)
        save_model(model, tmp_path / "m")
        assert (tmp_path / "m" / "hf_audio" / "config.json").is_file()
        assert torch.equal(load_model(tmp_path / "m").encode("audio", batch), emb)
    with pytest.raises(ConfigError, match="num_mel_bins=64 but the audio config gives 128"):
        _model({"encoder": "hf_audio", "audio": AUDIO, "config": {**HF_AST, "num_mel_bins": 64}})


def test_hf_audio_waveform_model_from_in_code_config(tmp_path):
    model = _model({"encoder": "hf_audio", "audio": AUDIO, "inputs": "waveform", "config": HF_W2V})
    assert model.towers["audio"].cfg.norm_mode == "clip"
    batch = _audio_batch(model)
    assert batch.shape == (2, 2, 16000)
    train = _audio_batch(model, is_train=True)
    assert train.shape == (2, 16000)
    model.train()
    model.set_grad_checkpointing(True)
    model.encode("audio", train).sum().backward()
    assert model.towers["audio"].model.feature_extractor.conv_layers[0].conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        emb = model.encode("audio", batch)
        # per-crop standardisation: the recording level does not matter
        assert torch.allclose(model.encode("audio", 0.25 * batch), emb, atol=1e-4)
        save_model(model, tmp_path / "m")
        assert torch.equal(load_model(tmp_path / "m").encode("audio", batch), emb)
    with pytest.raises(ConfigError, match="set inputs: waveform"):
        _model({"encoder": "hf_audio", "audio": AUDIO, "config": HF_W2V})


@pytest.mark.parametrize("kind", ["mel", "waveform"])
def test_hf_audio_from_a_local_directory(kind, tmp_path):
    from transformers import AutoConfig, AutoModel

    hf = dict(HF_AST if kind == "mel" else HF_W2V)
    extra = {"num_mel_bins": 128, "max_length": 101} if kind == "mel" else {}
    torch.manual_seed(0)
    source = AutoModel.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf, **extra)).eval()
    source.save_pretrained(tmp_path / "hf")
    model = _model({"encoder": "hf_audio", "audio": AUDIO, "inputs": kind, "path": str(tmp_path / "hf")})
    encoder = model.towers["audio"]
    batch = _audio_batch(model)
    with torch.no_grad():
        single = batch[:, 0].transpose(1, 2) if kind == "mel" else batch[:, 0]
        single = (
            (single + 20) / 20
            if kind == "mel"
            else (single - single.mean(1, keepdim=True)) / (single.std(1, keepdim=True) + 1e-5)
        )
        expect = source(input_values=single).last_hidden_state.mean(1)
        assert torch.allclose(encoder(batch[:, 0]), expect, atol=1e-4)  # the saved weights, loaded
        emb = model.encode("audio", batch)
        save_model(model, tmp_path / "export")
        loaded = load_model(tmp_path / "export")
        assert loaded.towers["audio"].cfg.path == str((tmp_path / "export" / "hf_audio").resolve())
        assert torch.equal(loaded.encode("audio", batch), emb)


def test_hf_audio_config_errors(tmp_path):
    from transformers import ASTConfig as HFASTConfig
    from transformers import ASTModel

    kw = {k: v for k, v in HF_AST.items() if k != "model_type"}
    ASTModel(HFASTConfig(**kw, num_mel_bins=64, max_length=101)).save_pretrained(tmp_path / "ast64")
    with pytest.raises(ConfigError, match=r"num_mel_bins=64 but the audio config gives 128 \(audio.n_mels\)"):
        _model({"encoder": "hf_audio", "audio": AUDIO, "path": str(tmp_path / "ast64")})
    with pytest.raises(ConfigError, match="max_length=101 but the audio config gives 201"):
        _model({"encoder": "hf_audio", "audio": {"preset": "imagebind", "n_mels": 64}, "path": str(tmp_path / "ast64")})
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        from_dict(HFAudioConfig, {"path": str(tmp_path / "ast64"), "config": HF_AST})
    with pytest.raises(ConfigError, match="never downloaded"):
        from_dict(HFAudioConfig, {"path": "MIT/ast-finetuned-audioset-10-10-0.4593"})
    with pytest.raises(ConfigError, match="'fixed' .* is for mel inputs"):
        from_dict(HFAudioConfig, {"config": HF_W2V, "inputs": "waveform", "norm": "fixed"})


def test_bf16_forward():
    towers = [
        AST_TINY,
        {"encoder": "hf_audio", "audio": AUDIO, "config": HF_AST},
        {"encoder": "hf_audio", "audio": AUDIO, "inputs": "waveform", "config": HF_W2V},
    ]
    for tower in towers:
        model = _model(tower)
        batch = _audio_batch(model)
        with torch.no_grad():
            ref = model.encode("audio", batch)
            out = model.to(torch.bfloat16).encode("audio", batch.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert torch.nn.functional.cosine_similarity(out.float(), ref).min() > 0.95, tower
