"""open_clip interop: a Tessera model's image and text towers as an open_clip model directory, and back.

An open_clip model directory is the layout of open_clip's hub models: `open_clip_config.json` (`model_cfg` and
`preprocess_cfg`) + `open_clip_model.safetensors` (a CLIP state dict, temperature included), which
`open_clip.create_model_and_transforms("local-dir:DIR")` loads. Export writes one beside every Tessera export
whose image and text towers are open_clip towers (`models.export.save_model`); import turns any open_clip model
directory, `open_clip_train` checkpoint or state-dict file into a Tessera model.

Shape legend: W a tower's own width, O its projection width, D the shared embedding width.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import open_clip
import safetensors.torch
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import nn

from tessera.config import ConfigError, from_dict
from tessera.durable import staged_dir

from .config import ModelConfig
from .export import NotRepresentable, check_out_dir, load_truncated
from .multitower import MultiTowerModel
from .open_clip_common import named_config, quick_gelu, read_clip_state
from .open_clip_image import OpenClipImageEncoder
from .open_clip_text import OpenClipTextEncoder

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
SUBDIR = "open_clip"  # where an export keeps its open_clip form
# what open_clip itself looks for in a directory, best first
WEIGHT_NAMES = (WEIGHTS_FILE, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors")
# open_clip's temperature scalars -> Tessera's per-pair parameters
TEMPERATURE = {"logit_scale": "logit_scales", "logit_bias": "logit_biases"}
# text_cfg.hf_tokenizer_name of an exported directory that carries its tokenizer files itself
HF_TOKENIZER_HERE = "."
# an image and a text embedding must agree to this (absolute) for an export to be kept
MATCH_ATOL = 1e-5


def clip_pair(model: MultiTowerModel) -> tuple[str, str]:
    """The (image, text) modalities whose towers are open_clip towers; NotRepresentable when there are none."""
    image = [m for m, t in model.towers.items() if isinstance(t, OpenClipImageEncoder)]
    text = [m for m, t in model.towers.items() if isinstance(t, OpenClipTextEncoder)]
    if not image or not text:
        kinds = ", ".join(f"{m}: {model.cfg.towers[m].encoder}" for m in model.towers)
        raise NotRepresentable(
            f"an open_clip model needs an open_clip_image and an open_clip_text tower; this has {kinds}"
        )
    return image[0], text[0]


def head_matrix(head: nn.Module, state: dict[str, torch.Tensor], prefix: str, what: str) -> torch.Tensor | None:
    """The head as one matrix (D, O), from `state` (the export's weights), or None for an identity head. Dropout
    is the identity at inference; anything but one bias-free Linear cannot fold into a tower's projection."""
    if isinstance(head, nn.Identity):
        return None
    layers = [(name, m) for name, m in head.named_children() if not isinstance(m, nn.Dropout)]
    if not layers:
        return None
    if len(layers) == 1 and isinstance(layers[0][1], nn.Linear) and layers[0][1].bias is None:
        return state[f"{prefix}{layers[0][0]}.weight"]
    raise NotRepresentable(
        f"the {what} head ({type(layers[-1][1]).__name__} layers: {[n for n, _ in layers]}) is not one linear "
        "projection, which is all an open_clip tower ends with; train it with head.kind linear or identity"
    )


def tower_state_dtype(tower_state: dict[str, torch.Tensor]) -> torch.dtype:
    return next(v.dtype for v in tower_state.values() if v.is_floating_point())


def fold_projection(tower_state: dict[str, torch.Tensor], W_DO: torch.Tensor, what: str) -> None:
    """Fold the head W_DO into the tower's final projection, in place: the tower then outputs D directly."""
    if "proj" in tower_state:  # open_clip ViT: x_W @ proj_WO
        tower_state["proj"] = tower_state["proj"] @ W_DO.T
    elif "text_projection" in tower_state:  # open_clip text: x_W @ text_projection_WO
        tower_state["text_projection"] = tower_state["text_projection"] @ W_DO.T
    else:  # a Linear: ModifiedResNet's attention pool, a timm head, a text projection with bias
        for name in ("attnpool.c_proj", "text_projection", "head.proj"):
            if f"{name}.weight" in tower_state:
                tower_state[f"{name}.weight"] = W_DO @ tower_state[f"{name}.weight"]
                if f"{name}.bias" in tower_state:
                    tower_state[f"{name}.bias"] = W_DO @ tower_state[f"{name}.bias"]
                return
        raise NotRepresentable(f"the {what} tower has no final projection to fold its linear head into")


def to_open_clip(model: MultiTowerModel, state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, list[str]]:
    """(open_clip_config.json's content, the CLIP state dict, notes) of `model` with weights `state`; the notes
    name what the open_clip model leaves out. NotRepresentable when the image-text part has no open_clip form."""
    image, text = clip_pair(model)
    img_enc, txt_enc = model.towers[image], model.towers[text]
    if quick_gelu(img_enc.cfg) != quick_gelu(txt_enc.cfg):
        raise NotRepresentable("the image and text towers differ in quick_gelu; an open_clip model has one setting")
    cfg: ModelConfig = model.cfg
    model_cfg: dict[str, Any] = {
        "embed_dim": model.output_dim,
        "quick_gelu": quick_gelu(img_enc.cfg),
        "vision_cfg": img_enc.cfg.vision_cfg(),
        "text_cfg": txt_enc.cfg.text_cfg(),
    }
    if txt_enc.hf_tokenizer_dir():
        # its files go into the directory itself, where open_clip's local-dir: loading reads them; the name only
        # needs to be set (a hub model's config names its own repository here)
        model_cfg["text_cfg"] = {**model_cfg["text_cfg"], "hf_tokenizer_name": HF_TOKENIZER_HERE}
    custom_text = bool(named_config(txt_enc.cfg.model).get("custom_text"))
    if custom_text:
        model_cfg["custom_text"] = True
    out: dict[str, torch.Tensor] = {}
    for m, where in ((image, "visual."), (text, "text." if custom_text else "")):
        prefix = f"towers.{m}.tower."
        tower_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        W_DO = head_matrix(model.heads[m], state, f"heads.{m}.", m)
        if cfg.truncate_dim:  # the first rows of the head: the tower then outputs the served prefix itself
            D = cfg.embed_dim
            W_DO = (torch.eye(D, dtype=tower_state_dtype(tower_state)) if W_DO is None else W_DO)[: cfg.truncate_dim]
        if W_DO is not None:
            fold_projection(tower_state, W_DO, m)
        out.update({where + k: v for k, v in tower_state.items()})
    notes = [
        f"{m} ({cfg.towers[m].encoder}) stays in the Tessera export only"
        for m in model.towers
        if m not in (image, text)
    ]
    key = model.pair_name(image, text)
    if key is None:
        out["logit_scale"] = torch.tensor(cfg.init_logit_scale)
        notes.append(f"the model does not align {image} with {text}: logit_scale is the initial one")
    else:
        # as Tessera uses it: clamped at max_logit_scale (the parameter itself may lie above the clamp)
        out["logit_scale"] = state[f"logit_scales.{key}"].reshape(()).clamp(max=math.log(cfg.max_logit_scale))
        if cfg.init_logit_bias is not None:
            out["logit_bias"] = state[f"logit_biases.{key}"].reshape(())
            model_cfg["init_logit_bias"] = float(out["logit_bias"])
    preprocess = dataclasses.asdict(img_enc.preprocess_cfg)
    doc = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}  # json writes tuples as lists
    return doc, {k: v.detach().float().contiguous() if v.is_floating_point() else v for k, v in out.items()}, notes


def create_open_clip(model_dir: str | Path):
    """open_clip's own (model, eval transform, tokenizer) from an open_clip model directory, on the CPU."""
    name = f"local-dir:{Path(model_dir).resolve()}"
    logging.disable(logging.INFO)  # open_clip narrates every step at INFO on the root logger
    try:
        oc, _, preprocess = open_clip.create_model_and_transforms(name)
        tokenizer = open_clip.get_tokenizer(name)
    finally:
        logging.disable(logging.NOTSET)
    return oc.eval(), preprocess, tokenizer


@torch.no_grad()
def check_same_embeddings(ours: MultiTowerModel, oc_dir: Path) -> float:
    """The largest difference between our embeddings and open_clip's (from `oc_dir`) of two random images and
    two captions; NotRepresentable when it exceeds MATCH_ATOL."""
    image, text = clip_pair(ours)
    size = ours.towers[image].preprocess_cfg.size
    size = (size, size) if isinstance(size, int) else tuple(size)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    captions = ["a photo of a red circle", "Two small squares, on the LEFT!"]
    try:  # whatever open_clip cannot build or run from these files is a form it does not have
        oc, _, tokenizer = create_open_clip(oc_dir)
        tokens = tokenizer(captions)
        pairs = [
            (image, ours.encode(image, images), oc.encode_image(images, normalize=True)),
            (text, ours.encode(text, tokens), oc.encode_text(tokens, normalize=True)),
        ]
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as exc:
        raise NotRepresentable(f"open_clip cannot load or run the exported model: {exc}") from None
    ours_tokens = torch.stack([ours.towers[text].transform(False)(c) for c in captions])
    if not torch.equal(ours_tokens, tokens):
        raise NotRepresentable("open_clip's tokenizer for this text tower gives other token ids than ours")
    return largest_difference(pairs, "open_clip")


def largest_difference(pairs, library: str) -> float:
    """The largest |ours - theirs| over (modality, our embeddings, the library's L2-normalised embeddings) triples;
    NotRepresentable above MATCH_ATOL: the library computes something else from the converted weights."""
    worst = 0.0
    for m, z_ours, z_theirs in pairs:
        diff = float((z_ours.float() - z_theirs.float()).abs().max())
        if not diff <= MATCH_ATOL:
            raise NotRepresentable(
                f"{library} computes other {m} embeddings from the converted weights (max difference {diff:.2e}): "
                "this tower configuration has no exact form there"
            )
        worst = max(worst, diff)
    return worst


def export_open_clip(
    model_dir: str | Path, out_dir: str | Path | None = None, truncate_dim: int | None = None
) -> tuple[Path, list[str]]:
    """Write the Tessera export `model_dir` as an open_clip model directory (default `model_dir/open_clip`),
    atomically, and check that open_clip loads it to the same embeddings (the first `truncate_dim` features where
    given: open_clip's embed_dim is then that width). Returns (directory, notes)."""
    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else model_dir / SUBDIR
    check_out_dir(out_dir, lambda d: (d / CONFIG_FILE).is_file(), "an open_clip model directory", model_dir)
    ours = load_truncated(model_dir, truncate_dim)
    doc, state, notes = to_open_clip(ours, ours.state_dict())
    with staged_dir(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        safetensors.torch.save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        text = ours.towers[clip_pair(ours)[1]]
        if text.hf_tokenizer_dir():
            text.build_tokenizer().save_pretrained(tmp)
        check_same_embeddings(ours, tmp)
    return out_dir, notes


# ---------------------------------------------------------------------------------------------------------- import


def overrides_from(base: dict[str, Any], target: dict[str, Any], cfg_cls: type) -> dict[str, Any]:
    """The `overrides` that turn the named config `base` into `target`: changed and added fields, and the
    dataclass default for each field `base` sets and `target` does not."""
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(cfg_cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    out = {k: v for k, v in target.items() if base.get(k, defaults.get(k, dataclasses.MISSING)) != v}
    out.update({k: defaults[k] for k in base if k not in target and k in defaults and base[k] != defaults[k]})
    return out


def base_name(model_cfg: dict[str, Any], hint: str | None) -> str:
    """The open_clip config name a tower config is written against: `hint`, else a built-in config with exactly
    this model config, else ViT-B-32 (overrides then carry the difference)."""
    if hint and not hint.endswith(".json"):
        named_config(hint)
        return hint
    for name in open_clip.list_models():
        if named_config(name) == model_cfg:
            return name
    return "ViT-B-32"


def find_weights(src: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (src / name).is_file():
            return src / name
    raise ConfigError(f"open_clip directory '{src}' holds no weights (looked for {', '.join(WEIGHT_NAMES)})")


def read_open_clip(src: str | Path, model: str | None = None) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(model_cfg, preprocess_cfg, CLIP state dict) of an open_clip model directory (`local-dir:` layout), an
    `open_clip_train` checkpoint or a state-dict file; a file needs `model`, its open_clip config name."""
    path = Path(str(src).removeprefix("local-dir:"))
    if path.is_dir():
        config = path / CONFIG_FILE
        if not config.is_file():
            raise ConfigError(f"'{path}' is not an open_clip model directory: no {CONFIG_FILE}")
        try:
            doc = json.loads(config.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config} is not valid JSON: {exc}") from None
        model_cfg = checked_model_cfg(doc.get("model_cfg") if isinstance(doc, dict) else None, str(config))
        if model_cfg["text_cfg"].get("hf_tokenizer_name"):  # open_clip reads it from the directory itself
            if not (path / "tokenizer_config.json").is_file():
                raise ConfigError(
                    f"'{path}' names a Hugging Face tokenizer but holds no tokenizer files (tokenizer_config.json); "
                    "Tessera never downloads one"
                )
            model_cfg["text_cfg"] = {**model_cfg["text_cfg"], "hf_tokenizer_name": str(path.resolve())}
        return model_cfg, doc.get("preprocess_cfg") or {}, read_clip_state(find_weights(path))
    if not path.is_file():
        raise ConfigError(f"'{src}' is neither an open_clip model directory nor a checkpoint file")
    if not model:
        raise ConfigError(
            f"'{src}' is a weights file: name its architecture with --model (an open_clip config name such as "
            "ViT-B-32, or the path of a model config .json)"
        )
    model_cfg, preprocess = config_file_or_name(model)
    preprocess = preprocess or {"size": model_cfg["vision_cfg"].get("image_size", 224)}
    return model_cfg, preprocess, read_clip_state(path)


def config_file_or_name(model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_cfg, preprocess_cfg) of an open_clip model config: a built-in name, or a .json file as
    open_clip_train's --model takes (the bare config, or an open_clip_config.json with model_cfg and
    preprocess_cfg)."""
    if not model.endswith(".json"):
        return named_config(model), {}
    try:
        doc = json.loads(Path(model).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the model config '{model}': {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"'{model}' is not an open_clip model config")
    preprocess = doc.get("preprocess_cfg") or {}
    return checked_model_cfg(doc.get("model_cfg", doc), model), preprocess


def checked_model_cfg(model_cfg: Any, where: str) -> dict[str, Any]:
    if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        raise ConfigError(f"{where}: not an open_clip model config (it needs embed_dim, vision_cfg and text_cfg)")
    return model_cfg


def tessera_config(model_cfg: dict[str, Any], preprocess: dict[str, Any], state: dict, hint: str | None) -> dict:
    """A Tessera model config (as YAML would give it) with the architecture and preprocessing of `model_cfg`."""
    if model_cfg.get("multimodal_cfg"):
        raise NotRepresentable("this is a CoCa model (it has a text decoder); Tessera imports CLIP models")
    vision, text = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
    if text.get("hf_model_name"):
        raise NotRepresentable("the text tower is a Hugging Face model; import it as encoder hf_text instead")
    name = base_name(model_cfg, hint)
    base = named_config(name)
    qg = bool(model_cfg.get("quick_gelu", False))
    towers = {
        "image": {
            "encoder": "open_clip_image",
            "model": name,
            "overrides": overrides_from(base["vision_cfg"], vision, CLIPVisionCfg),
            "quick_gelu": qg,
            "preprocess": {k: v for k, v in preprocess.items() if k in PREPROCESS_KEYS},
        },
        "text": {
            "encoder": "open_clip_text",
            "model": name,
            "overrides": overrides_from(base["text_cfg"], text, CLIPTextCfg),
            "quick_gelu": qg,
        },
    }
    scale = float(state["logit_scale"].reshape(-1)[0]) if "logit_scale" in state else math.log(1 / 0.07)
    cfg = {"embed_dim": int(model_cfg["embed_dim"]), "towers": towers, "max_logit_scale": max(100.0, math.exp(scale))}
    if "logit_bias" in state:
        cfg["init_logit_bias"] = float(state["logit_bias"].reshape(-1)[0])
    return cfg


PREPROCESS_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")


def from_open_clip(src: str | Path, model: str | None = None) -> MultiTowerModel:
    """A Tessera model (towers `image` and `text`) holding an open_clip model's weights, temperature and SigLIP
    bias included. `src`: an open_clip model directory, an `open_clip_train` checkpoint or a state-dict file."""
    model_cfg, preprocess, state = read_open_clip(src, model)
    return build_from_open_clip(model_cfg, preprocess, state, model, str(src))


def build_from_open_clip(model_cfg: dict, preprocess: dict, state: dict, model: str | None, src: str):
    """The Tessera model of an open_clip (model_cfg, preprocess_cfg, CLIP state dict) read from `src`."""
    cfg = from_dict(ModelConfig, tessera_config(model_cfg, preprocess, state, model), "model")
    ours = MultiTowerModel(cfg)
    mapped = {}
    custom = any(k.startswith("text.") for k in state)
    for key, value in state.items():
        if key.startswith("visual."):
            mapped[f"towers.image.tower.{key[7:]}"] = value
        elif key in TEMPERATURE:
            mapped[f"{TEMPERATURE[key]}.image__text"] = value.reshape(1)
        elif custom and key.startswith("text."):
            mapped[f"towers.text.tower.{key[5:]}"] = value
        elif not custom:
            mapped[f"towers.text.tower.{key}"] = value
    try:
        result = ours.load_state_dict(mapped, strict=False)
    except RuntimeError as exc:
        raise ConfigError(f"'{src}' does not match its architecture: {exc}") from None
    missing = [k for k in result.missing_keys if k != "logit_scales.image__text"]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"'{src}' does not match the architecture {model or 'of its config'}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return ours.eval()
