"""Every transformer tower attends through torch's fused scaled-dot-product attention (flash or memory-efficient
kernels on a GPU, the fused kernel on a CPU): one call per attention layer in a training step, so that no layer
falls back to a softmax over a materialised score matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.config import from_dict
from tessera.models import ModelConfig, build_model

from .conftest import TINY_MODEL
from .test_audio_models import AST_TINY, AUDIO, HF_AST, TEXT_TINY, _audio_batch
from .test_models import HF_TINY, _batch
from .test_video import VIDEO_MODEL, VIDEO_TOWER


def _model(towers: dict):
    torch.manual_seed(0)
    return build_model(from_dict(ModelConfig, {"embed_dim": 16, "towers": towers}, "model"))


def _image_text(text_tower: dict):
    model = _model({"image": TINY_MODEL["towers"]["image"], "text": text_tower})
    return model, _batch(model)


def _audio(audio_tower: dict):
    model = _model({"audio": audio_tower, "text": TEXT_TINY})
    return model, {"audio": _audio_batch(model)}


def _video():
    video = {**VIDEO_TOWER, "temporal": "transformer", "temporal_layers": 2}
    model = _model({"video": video, "text": VIDEO_MODEL["towers"]["text"]})
    return model, {"video": torch.randn(2, 4, 3, 32, 32)}


# tower -> (a model and a batch, its attention layers: open_clip's, timm's, transformers' and torch's own)
TOWERS = {
    "open_clip image and text": (lambda: _image_text(TINY_MODEL["towers"]["text"]), {"image": 1, "text": 1}),
    "transformers text (BERT)": (
        lambda: _image_text({"encoder": "hf_text", "config": HF_TINY, "max_length": 12}),
        {"image": 1, "text": 1},
    ),
    "AST (timm)": (lambda: _audio(AST_TINY), {"audio": 2}),
    "transformers audio (AST)": (
        lambda: _audio({"encoder": "hf_audio", "audio": AUDIO, "config": HF_AST}),
        {"audio": 1},
    ),
    "video frames and temporal transformer": (_video, {"video": 1 + 2}),
}


@pytest.mark.parametrize("name", list(TOWERS))
def test_every_attention_layer_calls_fused_scaled_dot_product_attention(name, monkeypatch):
    make, layers = TOWERS[name]
    model, batch = make()
    model.train()  # torch's MultiheadAttention takes its inference fast path only in eval mode without gradients
    real, calls = F.scaled_dot_product_attention, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    for modality, expected in layers.items():
        calls.clear()
        model.encode(modality, batch[modality]).sum().backward()
        assert len(calls) == expected, (modality, len(calls))
