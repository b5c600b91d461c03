"""Image and text towers built from open_clip's model configs, tokenizer and transforms.

Any open_clip model config name works (`ViT-B-32`, `ViT-L-14`, `RN50`, timm-backed configs, ...);
`overrides` changes individual fields of open_clip's `CLIPVisionCfg` / `CLIPTextCfg`, which is how the
tiny CPU configs are written. Only the architecture is taken from open_clip: no weights are ever
downloaded. `pretrained` may point at a local open_clip checkpoint to initialise a tower from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2

from tessera.config import ConfigError, closest, require
from .encoder import Encoder
from .weights import load_state_dict_file

__all__ = ["OpenClipImageConfig", "OpenClipTextConfig", "OpenClipImageEncoder", "OpenClipTextEncoder"]


def _named_config(name: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"'{name}' is not an open_clip model config.{closest(name, open_clip.list_models())}"
                          " See open_clip.list_models().")
    return cfg


def _check_overrides(overrides: dict[str, Any], cfg_cls: type, what: str) -> None:
    names = [f.name for f in dataclasses.fields(cfg_cls)]
    for key in overrides:
        require(key in names, f"overrides: '{key}' is not a field of open_clip's {cfg_cls.__name__} ({what})."
                              f"{closest(key, names)}")


@dataclass
class OpenClipImageConfig:
    model: str = field(default="ViT-B-32", metadata={"help": "open_clip model config name (architecture only)"})
    overrides: dict[str, Any] = field(default_factory=dict,
                                      metadata={"help": "CLIPVisionCfg fields merged over the named config"})
    output_dim: int | None = field(default=None, metadata={"help": "tower projection width; default embed_dim"})
    quick_gelu: bool | None = field(default=None, metadata={"help": "default: the named config's"})
    pretrained: str | None = field(default=None, metadata={"help": "local open_clip checkpoint to load"})
    preprocess: dict[str, Any] = field(default_factory=dict,
                                       metadata={"help": "open_clip PreprocessCfg overrides (mean, std, ...)"})
    augmentation: dict[str, Any] = field(default_factory=dict,
                                         metadata={"help": "open_clip AugmentationCfg for training"})

    def __post_init__(self):
        _named_config(self.model)
        _check_overrides(self.overrides, CLIPVisionCfg, "image tower")
        _check_overrides(self.augmentation, AugmentationCfg, "augmentation")
        pre_keys = [f.name for f in dataclasses.fields(PreprocessCfg)]
        for key in self.preprocess:
            require(key in pre_keys, f"preprocess: '{key}' is not a PreprocessCfg field.{closest(key, pre_keys)}")

    def vision_cfg(self) -> dict[str, Any]:
        return {**_named_config(self.model)["vision_cfg"], **self.overrides}


@dataclass
class OpenClipTextConfig:
    model: str = field(default="ViT-B-32", metadata={"help": "open_clip model config name (architecture only)"})
    overrides: dict[str, Any] = field(default_factory=dict,
                                      metadata={"help": "CLIPTextCfg fields merged over the named config"})
    output_dim: int | None = field(default=None, metadata={"help": "tower projection width; default embed_dim"})
    quick_gelu: bool | None = field(default=None, metadata={"help": "default: the named config's"})
    pretrained: str | None = field(default=None, metadata={"help": "local open_clip checkpoint to load"})

    def __post_init__(self):
        _named_config(self.model)
        _check_overrides(self.overrides, CLIPTextCfg, "text tower")
        text_cfg = self.text_cfg()
        require(not text_cfg.get("hf_model_name"),
                f"'{self.model}' uses a Hugging Face text model; use encoder 'hf_text' with a local path instead")
        tok = text_cfg.get("hf_tokenizer_name")
        require(not tok or Path(tok).is_dir(),
                f"'{self.model}' uses the Hugging Face tokenizer '{tok}', which would be downloaded; set "
                "overrides.hf_tokenizer_name to a local directory, or null for open_clip's BPE tokenizer")

    def text_cfg(self) -> dict[str, Any]:
        return {**_named_config(self.model)["text_cfg"], **self.overrides}


def _quick_gelu(cfg: OpenClipImageConfig | OpenClipTextConfig) -> bool:
    if cfg.quick_gelu is not None:
        return cfg.quick_gelu
    return bool(_named_config(cfg.model).get("quick_gelu", False))


def _load_pretrained(module: torch.nn.Module, path: str, prefixes: tuple[str, ...], keep_bare: tuple[str, ...]):
    """Load the part of an open_clip checkpoint that belongs to one tower."""
    state = load_state_dict_file(path)
    if "state_dict" in state:  # open_clip_train checkpoints wrap the weights
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    picked = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                picked[key[len(prefix):]] = value
                break
        else:
            if key.startswith(keep_bare):
                picked[key] = value
    if not picked:
        raise ConfigError(f"pretrained '{path}' holds no weights for this tower (looked for {prefixes + keep_bare})")
    try:
        result = module.load_state_dict(picked, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        raise ConfigError(f"pretrained '{path}' does not match the tower's architecture: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"pretrained '{path}' does not match the tower's architecture: missing "
                          f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


class ToTensorNormalize:
    """open_clip's last two steps, (Maybe)ToTensor then Normalize, in one pass over an RGB PIL image:
    uint8 -> float32 times 1/(255 std) plus -mean/std. The same numbers to float rounding (tested to 1e-6),
    at about 60% of the time (95 vs 161 us at 224 x 224), which is 3-7% of a worker's decode + transform.
    Anything but an RGB PIL image goes through the original two steps."""

    def __init__(self, to_tensor, normalize):
        self.to_tensor, self.normalize = to_tensor, normalize
        std, mean = torch.tensor(normalize.std, dtype=torch.float32), torch.tensor(normalize.mean, dtype=torch.float32)
        self.scale_C11 = (1.0 / (255.0 * std)).view(-1, 1, 1)
        self.offset_C11 = (-mean / std).view(-1, 1, 1)

    def __call__(self, img):
        from PIL import Image

        if not isinstance(img, Image.Image) or img.mode != "RGB" or len(self.scale_C11) != 3:
            return self.normalize(self.to_tensor(img))
        w, h = img.size
        hwc = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3)
        chw = hwc.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        return chw.mul_(self.scale_C11).add_(self.offset_C11)

    def __repr__(self) -> str:
        return f"ToTensorNormalize({self.to_tensor!r}, {self.normalize!r})"


def fuse_to_tensor_normalize(compose):
    """open_clip's transform with its trailing ToTensor + Normalize fused (see `ToTensorNormalize`)."""
    from torchvision.transforms import Normalize

    steps = list(getattr(compose, "transforms", []))
    if len(steps) >= 2 and "ToTensor" in type(steps[-2]).__name__ and isinstance(steps[-1], Normalize):
        compose.transforms = [*steps[:-2], ToTensorNormalize(steps[-2], steps[-1])]
    return compose


class OpenClipImageEncoder(Encoder):
    """open_clip's vision tower (ViT, ModifiedResNet or timm) -> (B, output_dim)."""

    def __init__(self, cfg: OpenClipImageConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.output_dim or embed_dim
        vision_cfg = cfg.vision_cfg()
        self.tower = _build_vision_tower(self.output_dim, vision_cfg, quick_gelu=_quick_gelu(cfg))
        size = vision_cfg.get("image_size", 224)
        self.preprocess_cfg = PreprocessCfg(**{"size": size, **cfg.preprocess})
        if cfg.pretrained:
            _load_pretrained(self.tower, cfg.pretrained, prefixes=("visual.",), keep_bare=())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower(images)

    def transform(self, is_train: bool):
        aug = AugmentationCfg(**self.cfg.augmentation) if is_train else None
        return fuse_to_tensor_normalize(image_transform_v2(self.preprocess_cfg, is_train=is_train, aug_cfg=aug))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_grad_checkpointing(enable)


class Tokenize:
    """Caption -> LongTensor(context_length) with open_clip's tokenizer (picklable for workers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]


class OpenClipTextEncoder(Encoder):
    """open_clip's causal text transformer, with its offline BPE tokenizer -> (B, output_dim)."""

    def __init__(self, cfg: OpenClipTextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.output_dim or embed_dim
        text_cfg = cfg.text_cfg()
        self.tower = _build_text_tower(self.output_dim, text_cfg, quick_gelu=_quick_gelu(cfg))
        self.context_length = text_cfg.get("context_length", 77)
        if cfg.pretrained:
            bare = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
            _load_pretrained(self.tower, cfg.pretrained, prefixes=("text.",), keep_bare=bare)

    def build_tokenizer(self):
        text_cfg = self.cfg.text_cfg()
        if text_cfg.get("hf_tokenizer_name"):
            return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=self.context_length,
                                                   **(text_cfg.get("tokenizer_kwargs") or {}))
        return open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower(tokens)

    def transform(self, is_train: bool):
        return Tokenize(self.build_tokenizer())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_grad_checkpointing(enable)
