"""Hugging Face interop: a Tessera model with an open_clip ViT image tower and an open_clip text tower as a
`transformers` CLIPModel directory (`save_pretrained`, with tokenizer and image-processor files), and a
CLIPModel directory as a Tessera model.

The weights go through open_clip's layout (`open_clip_io.to_open_clip`, which folds linear heads into the
towers' projections), then are renamed and split the way transformers' CLIP names them: open_clip's fused
attention input projection becomes q/k/v, its projection matrices (W, D) become Linear weights (D, W).
What CLIPModel cannot compute (a ModifiedResNet or timm image tower, attention pooling, layer scale, a SigLIP
bias, another tokenizer, ...) is refused with the reason; every export is checked against our own embeddings.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import VisionTransformer
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

from tessera.config import ConfigError
from tessera.durable import staged_dir

from .export import NotRepresentable, check_out_dir, load_truncated
from .multitower import MultiTowerModel
from .open_clip_common import quick_gelu
from .open_clip_io import build_from_open_clip, clip_pair, largest_difference, to_open_clip

log = logging.getLogger(__name__)

SUBDIR = "hf"
SOT, EOT = 49406, 49407  # open_clip's BPE: <start_of_text>, <end_of_text>
HF_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}

# open_clip residual block -> transformers CLIPEncoderLayer (attention q/k/v handled apart)
BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# open_clip CLIP key -> transformers CLIPModel key, outside the residual blocks
VISION = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
TEXT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# field -> the value CLIPModel's architecture has; any other value cannot be represented. First, what both
# towers' residual blocks share: plain LayerNorm and activation, no qk-norm or extra scalings
BLOCK_FIXED = {
    "act_kwargs": None,
    "norm_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
VISION_FIXED = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "pool_type": "tok",
    **BLOCK_FIXED,
}
TEXT_FIXED = {
    "hf_tokenizer_name": None,
    "vocab_size": 49408,
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    **BLOCK_FIXED,
}


def _refuse_fields(cfg: Any, fixed: dict[str, Any], what: str) -> None:
    for name, value in fixed.items():
        if getattr(cfg, name) != value:
            raise NotRepresentable(
                f"the {what} tower sets {name}={getattr(cfg, name)!r}; transformers' CLIPModel has only "
                f"{name}={value!r} (export it as open_clip instead)"
            )


def hf_config(model: MultiTowerModel, logit_scale: float):
    """transformers' CLIPConfig of `model`; NotRepresentable when CLIPModel cannot compute it."""

    image, text = clip_pair(model)
    tower = model.towers[image].tower
    if not isinstance(tower, VisionTransformer):
        raise NotRepresentable(
            f"the image tower is open_clip's {type(tower).__name__}; transformers' CLIPModel has only a ViT "
            "(export it as open_clip instead)"
        )
    if model.cfg.init_logit_bias is not None:
        raise NotRepresentable("the model has a SigLIP logit bias, which transformers' CLIPModel has no place for")
    vision = CLIPVisionCfg(**model.towers[image].cfg.vision_cfg())
    txt = CLIPTextCfg(**model.towers[text].cfg.text_cfg())
    _refuse_fields(vision, VISION_FIXED, image)
    _refuse_fields(txt, TEXT_FIXED, text)
    if not isinstance(vision.image_size, int) or not isinstance(vision.patch_size, int):
        raise NotRepresentable("the image tower is not square; transformers' CLIPModel takes one image_size")
    act = "quick_gelu" if quick_gelu(model.towers[image].cfg) else "gelu"
    return CLIPConfig(
        vision_config={
            "hidden_size": vision.width,
            "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_hidden_layers": vision.layers,
            "num_attention_heads": vision.width // vision.head_width,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_act": act,
            "projection_dim": model.output_dim,
        },
        text_config={
            "vocab_size": txt.vocab_size,
            "hidden_size": txt.width,
            "intermediate_size": int(txt.width * txt.mlp_ratio),
            "num_hidden_layers": txt.layers,
            "num_attention_heads": txt.heads,
            "max_position_embeddings": txt.context_length,
            "hidden_act": act,
            "projection_dim": model.output_dim,
            "bos_token_id": SOT,
            "eos_token_id": EOT,
            "pad_token_id": EOT,
        },
        projection_dim=model.output_dim,
        logit_scale_init_value=logit_scale,
    )


def clip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (ViT image tower, plain text tower) in transformers' CLIPModel names."""
    out = {}
    for key, value in state.items():
        if key in VISION:
            out[VISION[key]] = value
        elif key in TEXT:
            out[TEXT[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.T
        elif key == "text_projection":
            out["text_projection.weight"] = value.T
        elif key == "logit_scale":
            out["logit_scale"] = value.reshape(())
        elif m := re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            layer = f"{'vision_model' if m[1] else 'text_model'}.encoder.layers.{m[2]}.self_attn"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{layer}.{name}.{m[3]}"] = part
        elif (m := re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)) and m[
            3
        ] in BLOCK:
            layer = f"{'vision_model' if m[1] else 'text_model'}.encoder.layers.{m[2]}"
            out[f"{layer}.{BLOCK[m[3]]}.{m[4]}"] = value
        else:
            raise NotRepresentable(f"open_clip weight '{key}' has no place in transformers' CLIPModel")
    return {k: v.contiguous() for k, v in out.items()}


def hf_to_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `clip_to_hf`."""
    names = {v: k for k, v in {**VISION, **TEXT}.items()}
    blocks = {v: k for k, v in BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in names:
            out[names[key]] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.T
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        elif key == "logit_scale":
            out["logit_scale"] = value.reshape(())
        elif key.endswith("position_ids"):
            continue
        elif m := re.fullmatch(
            r"(vision|text)_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key
        ):
            block = f"{'visual.' if m[1] == 'vision' else ''}transformer.resblocks.{m[2]}.attn.in_proj_{m[4]}"
            qkv.setdefault((block, m[4]), {})[m[3]] = value
        elif m := re.fullmatch(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            if m[3] not in blocks:
                raise ConfigError(f"transformers weight '{key}' is not part of a CLIP encoder layer")
            out[f"{'visual.' if m[1] == 'vision' else ''}transformer.resblocks.{m[2]}.{blocks[m[3]]}.{m[4]}"] = value
        else:
            raise ConfigError(f"transformers weight '{key}' is not part of CLIPModel's image-text model")
    for (block, _), parts in qkv.items():
        out[block] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def clip_tokenizer(context_length: int):
    """transformers' CLIPTokenizer with open_clip's own BPE vocabulary and merges (shipped in its wheel), padded
    and truncated to the text tower's context length."""

    bpe = SimpleTokenizer(context_length=context_length)
    vocab = {HF_SPECIAL.get(token, token): i for token, i in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def image_processor(model: MultiTowerModel, image: str):
    """transformers' CLIPImageProcessor doing what the image tower's eval transform does."""

    pre = model.towers[image].preprocess_cfg
    size = pre.size if isinstance(pre.size, int) else pre.size[0]
    if pre.resize_mode not in ("shortest", "squash") or pre.interpolation not in ("bicubic", "bilinear"):
        raise NotRepresentable(
            f"the image transform (resize_mode {pre.resize_mode}, {pre.interpolation}) has no CLIPImageProcessor form"
        )
    resample = 3 if pre.interpolation == "bicubic" else 2  # PIL's BICUBIC, BILINEAR
    squash = pre.resize_mode == "squash"
    return CLIPImageProcessorPil(
        size={"height": size, "width": size} if squash else {"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=not squash,
        resample=resample,
        image_mean=list(pre.mean),
        image_std=list(pre.std),
    )


@torch.no_grad()
def check_hf_embeddings(ours: MultiTowerModel, hf, tokens: torch.Tensor) -> float:
    """The largest difference between our embeddings and CLIPModel's of two random images and the `tokens`;
    NotRepresentable above MATCH_ATOL."""
    image, text = clip_pair(ours)
    size = hf.config.vision_config.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    z_image = hf.get_image_features(pixel_values=images).pooler_output
    z_text = hf.get_text_features(input_ids=tokens).pooler_output
    pairs = [
        (image, ours.encode(image, images), torch.nn.functional.normalize(z_image, dim=-1)),
        (text, ours.encode(text, tokens), torch.nn.functional.normalize(z_text, dim=-1)),
    ]
    return largest_difference(pairs, "transformers")


def export_hf(
    model_dir: str | Path, out_dir: str | Path | None = None, truncate_dim: int | None = None
) -> tuple[Path, list[str]]:
    """Write the Tessera export `model_dir` as a transformers CLIPModel directory (default `model_dir/hf`) with
    CLIPProcessor files, atomically, checked against our embeddings (the first `truncate_dim` features where given:
    projection_dim is then that width). Returns (directory, notes)."""

    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else model_dir / SUBDIR
    check_out_dir(out_dir, _is_hf_clip_dir, "a transformers CLIP directory", model_dir)
    ours = load_truncated(model_dir, truncate_dim)
    _, clip_state, notes = to_open_clip(ours, ours.state_dict())
    config = hf_config(ours, float(clip_state["logit_scale"]))
    image, text = clip_pair(ours)
    processor = CLIPProcessor(
        image_processor=image_processor(ours, image),
        tokenizer=clip_tokenizer(config.text_config.max_position_embeddings),
    )
    hf = CLIPModel(config).eval()
    result = hf.load_state_dict(clip_to_hf(clip_state), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise NotRepresentable(
            f"CLIPModel's weights do not match: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    samples = ["a photo of a red circle", "two small squares on the left"]
    tokens = ours.towers[text].transform(False)
    check_hf_embeddings(ours, hf, torch.stack([tokens(s) for s in samples]))
    with staged_dir(out_dir) as tmp:
        hf.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir, notes


def _is_hf_clip_dir(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "clip"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def from_hf(src: str | Path) -> MultiTowerModel:
    """A Tessera model (towers `image` and `text`) holding a transformers CLIPModel's (or SiglipModel's) weights
    and temperature (and SigLIP bias)."""

    path = Path(src)
    kind = hf_model_type(path)
    if kind == "siglip":  # its own module: timm's SigLIP ViT and a SentencePiece tokenizer
        return importlib.import_module(f"{__package__}.hf_siglip_io").from_hf_siglip(path)
    if kind != "clip":
        raise NotRepresentable(
            f"'{src}' holds a transformers '{kind}' model; Tessera imports CLIPModel ('clip') and SiglipModel "
            "('siglip')"
        )
    hf = load_hf(path, CLIPModel)
    v, t = hf.config.vision_config, hf.config.text_config
    if v.hidden_act != t.hidden_act or v.hidden_act not in ("quick_gelu", "gelu"):
        raise NotRepresentable(f"activations {v.hidden_act}/{t.hidden_act}: open_clip towers take quick_gelu or gelu")
    model_cfg = {
        "embed_dim": hf.config.projection_dim,
        "quick_gelu": v.hidden_act == "quick_gelu",
        "vision_cfg": {
            "image_size": v.image_size,
            "layers": v.num_hidden_layers,
            "width": v.hidden_size,
            "head_width": v.hidden_size // v.num_attention_heads,
            "mlp_ratio": v.intermediate_size / v.hidden_size,
            "patch_size": v.patch_size,
        },
        "text_cfg": {
            "context_length": t.max_position_embeddings,
            "vocab_size": t.vocab_size,
            "width": t.hidden_size,
            "heads": t.num_attention_heads,
            "layers": t.num_hidden_layers,
            "mlp_ratio": t.intermediate_size / t.hidden_size,
        },
    }
    preprocess = preprocess_of(path, v.image_size)
    ours = build_from_open_clip(model_cfg, preprocess, hf_to_clip(hf.state_dict()), None, str(src))
    _check_tokenizer(path, ours)
    samples = ["a photo of a red circle", "two small squares on the left"]
    tokenize = ours.towers["text"].transform(False)
    check_hf_embeddings(ours, hf, torch.stack([tokenize(s) for s in samples]))  # the import computes what it read
    return ours


def hf_model_type(path: Path) -> str | None:
    """The `model_type` of a transformers model directory; ConfigError when it is none."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"'{path}' is not a transformers model directory: no config.json")
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(f"{config_file} is not a transformers config: {exc}") from None


def load_hf(path: Path, cls):
    """`cls.from_pretrained(path)`, offline, refusing a directory that lacks weights (transformers would fill them
    with random values and only warn)."""
    try:
        hf, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"transformers cannot load '{path}': {exc}") from None
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    if missing:
        raise ConfigError(f"'{path}' lacks weights {sorted(missing)[:5]} ({len(missing)} in all)")
    return hf.eval()


def preprocess_of(path: Path, image_size: int, center_crop: bool = True) -> dict[str, Any]:
    """open_clip's PreprocessCfg fields from the directory's image processor config, where there is one;
    `center_crop`: whether the processor crops when its config does not say (CLIP's does, SigLIP's does not)."""

    pre: dict[str, Any] = {"size": image_size}
    doc = None
    if (path / "processor_config.json").is_file():  # transformers 5: the processor's parts in one file
        doc = json.loads((path / "processor_config.json").read_text()).get("image_processor")
    elif (path / "preprocessor_config.json").is_file():
        doc = json.loads((path / "preprocessor_config.json").read_text())
    if isinstance(doc, dict):
        if "image_mean" in doc:
            pre["mean"], pre["std"] = list(doc["image_mean"]), list(doc["image_std"])
        pre["interpolation"] = {2: "bilinear", 3: "bicubic"}.get(doc.get("resample", 3), "bicubic")
        if not doc.get("do_center_crop", center_crop):
            pre["resize_mode"] = "squash"
    return pre


def _check_tokenizer(path: Path, ours: MultiTowerModel) -> None:
    """The directory's tokenizer must give open_clip's token ids, or the imported text tower reads other words."""

    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        log.warning("%s has no tokenizer files: the import assumes CLIP's BPE, which open_clip ships", path)
        return
    hf_tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    ours_tok = ours.towers["text"].transform(False)
    sample = "a photo of 2 dogs, playing in the snow!"
    want = ours_tok(sample)
    want = want[: int((want != 0).sum())].tolist()
    if hf_tok(sample)["input_ids"] != want:
        raise NotRepresentable(f"{path}'s tokenizer is not CLIP's BPE; Tessera's text tower could not read its ids")
