"""Hugging Face SigLIP import: a `transformers` SiglipModel directory as a Tessera model, in the form open_clip's own
SigLIP models take. The image tower is timm's SigLIP ViT (patch embedding with bias, no class token, attention
pooling over a learned probe); the text tower is open_clip's text transformer without a causal mask, pooled at
the last position, with a biased projection; the tokenizer is the directory's own (SentencePiece), which every
export then carries.

transformers names -> open_clip's (`visual.trunk.*` is timm's VisionTransformer, `text.*` open_clip's
TextTransformer): q/k/v projections fuse into timm's `qkv` and open_clip's `in_proj`, the pooling head's fused
input projection splits into timm's query and key-value projections, a position table gains timm's batch axis.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from transformers import AutoTokenizer, SiglipModel

from tessera.config import ConfigError

from .export import NotRepresentable
from .hf_clip_io import check_hf_embeddings, hf_to_clip, load_hf, preprocess_of
from .multitower import MultiTowerModel
from .open_clip_common import named_config
from .open_clip_io import build_from_open_clip

# timm's SigLIP ViTs with attention pooling, named by size, patch and image size ("gap" variants pool otherwise)
TIMM_SIGLIP = re.compile(r"vit_\w+?_patch(\d+)_siglip_(\d+)")
TANH_GELU = "gelu_pytorch_tanh"
# transformers vision names -> timm's, outside the encoder layers' attention (fused apart)
VISION = {
    "embeddings.patch_embedding": "patch_embed.proj",
    "post_layernorm": "norm",
    "head.attention.out_proj": "attn_pool.proj",
    "head.layernorm": "attn_pool.norm",
    "head.mlp.fc1": "attn_pool.mlp.fc1",
    "head.mlp.fc2": "attn_pool.mlp.fc2",
}
LAYER = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj", "mlp.fc1": "mlp.fc1",
         "mlp.fc2": "mlp.fc2"}  # fmt: skip


def timm_vision_name(v) -> str:
    """The timm SigLIP ViT with exactly the shape of transformers' vision config `v`: open_clip builds a timm
    image tower by name, so the import has one only where timm has the model."""
    for name in timm.list_models("vit_*_siglip_*"):
        m = TIMM_SIGLIP.fullmatch(name)
        if not m or (int(m[1]), int(m[2])) != (v.patch_size, v.image_size):
            continue
        with torch.device("meta"):  # the shape only: no memory, no init
            trunk = timm.create_model(name, num_classes=0, global_pool="map")
        block = trunk.blocks[0]
        shape = (trunk.embed_dim, len(trunk.blocks), block.attn.num_heads, block.mlp.fc1.out_features)
        if shape == (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size):
            return name
    raise NotRepresentable(
        f"no timm SigLIP ViT has this vision tower's shape (width {v.hidden_size}, {v.num_hidden_layers} layers, "
        f"{v.num_attention_heads} heads, MLP {v.intermediate_size}, patch {v.patch_size}, image {v.image_size}); "
        "open_clip builds SigLIP image towers from timm's models"
    )


def siglip_to_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A SiglipModel state dict in the names of open_clip's SigLIP models (timm trunk, custom text tower)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    text = {}
    for key, value in state.items():
        if key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(())
        elif key.startswith("text_model.head."):
            out[f"text.text_projection.{key.rsplit('.', 1)[1]}"] = value
        elif key.startswith("text_model."):
            text[key] = value
        elif not key.startswith("vision_model."):
            raise ConfigError(f"transformers weight '{key}' is not part of SiglipModel's image-text model")
        else:
            out.update(_vision_key(key.removeprefix("vision_model."), value, qkv))
    for name, parts in qkv.items():
        out[f"visual.trunk.{name}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    out.update({f"text.{k}": v for k, v in hf_to_clip(text).items()})
    return {k: v.contiguous() for k, v in out.items()}


def _vision_key(key: str, value: torch.Tensor, qkv: dict) -> dict[str, torch.Tensor]:
    """One transformers vision weight as timm's (q/k/v parts are collected in `qkv`, to be fused)."""
    trunk = "visual.trunk."
    if key == "embeddings.position_embedding.weight":
        return {f"{trunk}pos_embed": value[None]}  # timm's (1, N, W)
    if key == "head.probe":
        return {f"{trunk}attn_pool.latent": value}
    if m := re.fullmatch(r"head\.attention\.in_proj_(weight|bias)", key):  # (3W, ...) -> q (W, ...), kv (2W, ...)
        width = value.shape[0] // 3
        return {f"{trunk}attn_pool.q.{m[1]}": value[:width], f"{trunk}attn_pool.kv.{m[1]}": value[width:]}
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
        qkv.setdefault(f"blocks.{m[1]}.attn.qkv.{m[3]}", {})[m[2]] = value
        return {}
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
        if m[2] in LAYER:
            return {f"{trunk}blocks.{m[1]}.{LAYER[m[2]]}.{m[3]}": value}
    elif (m := re.fullmatch(r"(.+)\.(weight|bias)", key)) and m[1] in VISION:
        return {f"{trunk}{VISION[m[1]]}.{m[2]}": value}
    raise ConfigError(f"transformers weight 'vision_model.{key}' is not part of SiglipModel's image tower")


def siglip_model_cfg(hf, path: Path) -> dict[str, Any]:
    """open_clip's model config of a SiglipModel; NotRepresentable where open_clip's towers compute otherwise."""
    v, t = hf.config.vision_config, hf.config.text_config
    if not getattr(v, "vision_use_head", True):
        raise NotRepresentable("the vision tower has no attention-pooling head; open_clip's SigLIP towers have one")
    if v.hidden_act != TANH_GELU or t.hidden_act not in (TANH_GELU, "gelu"):
        raise NotRepresentable(f"activations {v.hidden_act}/{t.hidden_act}: timm's SigLIP ViT uses {TANH_GELU}")
    if not math.isclose(v.layer_norm_eps, 1e-6):
        raise NotRepresentable(f"vision layer_norm_eps {v.layer_norm_eps}: timm's SigLIP ViT uses 1e-6")
    width = getattr(t, "projection_size", None) or t.hidden_size
    if width != v.hidden_size:
        raise NotRepresentable(f"text projection {width} != vision width {v.hidden_size}: no shared embedding")
    return {
        "embed_dim": v.hidden_size,
        "custom_text": True,
        "vision_cfg": {
            "image_size": v.image_size,
            "timm_model_name": timm_vision_name(v),
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": {
            "context_length": t.max_position_embeddings,
            "vocab_size": t.vocab_size,
            "hf_tokenizer_name": str(path.resolve()),  # the export copies the tokenizer (OpenClipTextEncoder)
            "tokenizer_kwargs": {"clean": "canonicalize"},  # as open_clip's SigLIP configs, and SiglipTokenizer
            "width": t.hidden_size,
            "heads": t.num_attention_heads,
            "layers": t.num_hidden_layers,
            "mlp_ratio": t.intermediate_size / t.hidden_size,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
            "norm_kwargs": {"eps": t.layer_norm_eps},
            "act_kwargs": {"approximate": "tanh"} if t.hidden_act == TANH_GELU else None,
        },
    }


def base_siglip_name(timm_name: str) -> str:
    """The open_clip config the architecture is written against: one with the same timm trunk, else
    ViT-B-16-SigLIP (a custom-text config either way; overrides carry the difference)."""
    for name in open_clip.list_models():
        cfg = named_config(name)
        if cfg.get("custom_text") and cfg["vision_cfg"].get("timm_model_name") == timm_name:
            return name
    return "ViT-B-16-SigLIP"


def from_hf_siglip(path: Path) -> MultiTowerModel:
    """A Tessera model (towers `image` and `text`) holding a SiglipModel's weights, temperature and bias, its
    tokenizer with it; checked to give transformers' embeddings and token ids."""
    hf = load_hf(path, SiglipModel)
    model_cfg = siglip_model_cfg(hf, path)
    preprocess = preprocess_of(path, hf.config.vision_config.image_size, center_crop=False)
    name = base_siglip_name(model_cfg["vision_cfg"]["timm_model_name"])
    ours = build_from_open_clip(model_cfg, preprocess, siglip_to_clip(hf.state_dict()), name, str(path))
    samples = ["a photo of a red circle", "Two small squares, on the LEFT!"]
    tokenize = ours.towers["text"].transform(False)
    tokens = torch.stack([tokenize(s) for s in samples])
    try:
        theirs = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"transformers cannot load the tokenizer in '{path}': {exc}") from None
    context = model_cfg["text_cfg"]["context_length"]
    want = theirs(samples, padding="max_length", max_length=context, truncation=True, return_tensors="pt")
    if not torch.equal(want["input_ids"], tokens):
        raise NotRepresentable(f"open_clip's tokenizer over {path}'s files gives other ids than transformers'")
    check_hf_embeddings(ours, hf, tokens)
    return ours
