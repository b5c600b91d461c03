"""The image tower: open_clip's vision tower (ViT, ModifiedResNet or timm) from any open_clip model config, with
open_clip's image transforms (see `open_clip_common` for names, overrides and checkpoints)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import nn
from torchvision.transforms import Normalize

from tessera.config import closest, require

from .encoder import Encoder, TokenSite
from .open_clip_common import (
    TRANSFORMER_TARGETS,
    check_overrides,
    load_pretrained,
    named_config,
    pretrained_temperature,
    quick_gelu,
)

__all__ = ["OpenClipImageConfig", "OpenClipImageEncoder", "ToTensorNormalize", "ToUint8", "normalize_uint8"]

# ModifiedResNet: the bottlenecks' (and stem's) convolutions. Its attention pool cannot take LoRA: open_clip passes
# q/k/v/c_proj's weights straight to F.multi_head_attention_forward, so wrapped modules would never run.
RESNET_TARGETS = ["conv1", "conv2", "conv3"]


@dataclass
class OpenClipImageConfig:
    model: str = field(default="ViT-B-32", metadata={"help": "open_clip model config name (architecture only)"})
    overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "CLIPVisionCfg fields merged over the named config"}
    )
    output_dim: int | None = field(default=None, metadata={"help": "tower projection width; default embed_dim"})
    quick_gelu: bool | None = field(default=None, metadata={"help": "default: the named config's"})
    pretrained: str | None = field(default=None, metadata={"help": "local open_clip checkpoint to load"})
    preprocess: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "open_clip PreprocessCfg overrides (mean, std, ...)"}
    )
    augmentation: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "open_clip AugmentationCfg for training"}
    )

    def __post_init__(self):
        named_config(self.model)
        check_overrides(self.overrides, CLIPVisionCfg, "image tower")
        check_overrides(self.augmentation, AugmentationCfg, "augmentation")
        pre_keys = [f.name for f in dataclasses.fields(PreprocessCfg)]
        for key in self.preprocess:
            require(key in pre_keys, f"preprocess: '{key}' is not a PreprocessCfg field.{closest(key, pre_keys)}")

    def vision_cfg(self) -> dict[str, Any]:
        return {**named_config(self.model)["vision_cfg"], **self.overrides}


def normalize_constants(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize(mean, std) of ToTensor's output as one multiply-add on uint8 values: (1 / (255 std), -mean / std),
    float32, shaped (C, 1, 1)."""
    std, mean = torch.tensor(std, dtype=torch.float32), torch.tensor(mean, dtype=torch.float32)
    return (1.0 / (255.0 * std)).view(-1, 1, 1), (-mean / std).view(-1, 1, 1)


def rgb_uint8(img) -> torch.Tensor:
    """An RGB PIL image -> its (3, H, W) uint8 tensor, a strided view of one copy of its bytes."""
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)


class ToTensorNormalize:
    """open_clip's last two steps, (Maybe)ToTensor then Normalize, in one pass over an RGB PIL image:
    uint8 -> float32 times 1/(255 std) plus -mean/std. The same numbers to float rounding (tested to 1e-6),
    at about 60% of the time (95 vs 161 us at 224 x 224), which is 3-7% of a worker's decode + transform.
    Anything but an RGB PIL image goes through the original two steps."""

    def __init__(self, to_tensor, normalize):
        self.to_tensor, self.normalize = to_tensor, normalize
        self.scale_C11, self.offset_C11 = normalize_constants(normalize.mean, normalize.std)

    def __call__(self, img):
        if not isinstance(img, Image.Image) or img.mode != "RGB" or len(self.scale_C11) != 3:
            return self.normalize(self.to_tensor(img))
        chw = rgb_uint8(img).to(torch.float32, memory_format=torch.contiguous_format)
        return chw.mul_(self.scale_C11).add_(self.offset_C11)

    def __repr__(self) -> str:
        return f"ToTensorNormalize({self.to_tensor!r}, {self.normalize!r})"


class ToUint8:
    """open_clip's (Maybe)ToTensor + Normalize left for later: an RGB PIL image -> its uint8 (3, H, W) tensor, a
    quarter of the float32 one. `normalize_uint8` finishes it on the device with the same numbers."""

    def __call__(self, img):
        return rgb_uint8(img).contiguous()


def normalize_uint8(images: torch.Tensor, scale_C11: torch.Tensor, offset_C11: torch.Tensor, dtype) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> what ToTensorNormalize (whose `scale_C11` and `offset_C11` these are, on the images'
    device) makes of them, computed in float32 then cast to `dtype`."""
    return images.to(torch.float32).mul_(scale_C11).add_(offset_C11).to(dtype)


def fuse_to_tensor_normalize(compose):
    """open_clip's transform with its trailing ToTensor + Normalize fused (see `ToTensorNormalize`)."""
    steps = list(getattr(compose, "transforms", []))
    if len(steps) >= 2 and "ToTensor" in type(steps[-2]).__name__ and isinstance(steps[-1], Normalize):
        compose.transforms = [*steps[:-2], ToTensorNormalize(steps[-2], steps[-1])]
    return compose


class OpenClipImageEncoder(Encoder):
    """open_clip's vision tower (ViT, ModifiedResNet or timm) -> (B, output_dim)."""

    config_cls = OpenClipImageConfig

    def __init__(self, cfg: OpenClipImageConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.output_dim or embed_dim
        vision_cfg = cfg.vision_cfg()
        self.tower = _build_vision_tower(self.output_dim, vision_cfg, quick_gelu=quick_gelu(cfg))
        size = vision_cfg.get("image_size", 224)
        self.preprocess_cfg = PreprocessCfg(**{"size": size, **cfg.preprocess})
        self._normalize: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # uint8 input's scale, offset
        # a convolutional trunk (ModifiedResNet, timm convnets; not a ViT's one patch embedding) runs its pictures
        # channels-last: the convolutions follow the input's layout, and forward + backward of the demo's
        # ModifiedResNet take 1.27-1.37x less time on CPU than with NCHW input (the weights keep their layout)
        self.channels_last = sum(isinstance(m, nn.Conv2d) for m in self.tower.modules()) > 1
        if cfg.pretrained:
            load_pretrained(self.tower, cfg.pretrained, prefixes=("visual.",), keep_bare=())

    def normalized(self, images: torch.Tensor) -> torch.Tensor:
        """The tower's input as floats: uint8 images (from compact_transform) normalised on their device; floats (the
        float transform's, already normalised) as they are."""
        if images.dtype != torch.uint8:
            return images
        device = images.device
        if device not in self._normalize:  # made once per device: no host-to-device copy per step
            constants = normalize_constants(self.preprocess_cfg.mean, self.preprocess_cfg.std)
            self._normalize[device] = tuple(c.to(device) for c in constants)
        return normalize_uint8(images, *self._normalize[device], next(self.tower.parameters()).dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self.normalized(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.tower(images)

    def transform(self, is_train: bool, aug: AugmentationCfg | None = None):
        """`aug`: the training augmentation in place of the tower's own."""
        if is_train and aug is None:
            aug = AugmentationCfg(**self.cfg.augmentation)
        compose = fuse_to_tensor_normalize(image_transform_v2(self.preprocess_cfg, is_train=is_train, aug_cfg=aug))
        if is_train:
            compose.decode_size = self._decode_size(aug)
        return compose

    def _decode_size(self, aug: AugmentationCfg) -> tuple[int, int]:
        """The smallest (width, height) a training picture needs to be decoded at: the random resized crop's
        smallest crop (scale[0] of the area) must still hold the input's pixels. A JPEG at least twice that on
        both sides is decoded at a DCT scale of 1/2, 1/4 or 1/8 (`ImageDecoder`), a fraction of the work, then
        goes through the same crop and resize. Evaluation decodes at full size."""
        size = self.preprocess_cfg.size
        width, height = (size, size) if isinstance(size, int) else (size[1], size[0])
        smallest = (aug.scale or (1.0, 1.0))[0]
        grow = 1.0 / math.sqrt(max(smallest, 1e-6))
        return math.ceil(width * grow), math.ceil(height * grow)

    def compact_transform(self, is_train: bool, aug: AugmentationCfg | None = None):
        """The transform up to its ToTensor + Normalize, which `forward` does on the device: uint8 images, a quarter
        of the memory of float32 ones. A transform with steps after those (timm's random erasing) stays float."""
        compose = self.transform(is_train, aug)
        steps = list(getattr(compose, "transforms", []))
        if steps and isinstance(steps[-1], ToTensorNormalize) and len(steps[-1].scale_C11) == 3:
            compose.transforms = [*steps[:-1], ToUint8()]
        return compose

    def local_crop_transform(self, scale: tuple[float, float]):
        return self.compact_transform(True, AugmentationCfg(**{**self.cfg.augmentation, "scale": tuple(scale)}))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_grad_checkpointing(enable)

    def clip_checkpoint(self) -> str | None:
        return self.cfg.pretrained

    def clip_temperature(self) -> dict[str, torch.Tensor]:
        return pretrained_temperature(self.cfg.pretrained) if self.cfg.pretrained else {}

    def lora_targets(self) -> list[str]:
        return RESNET_TARGETS if isinstance(self.tower, ModifiedResNet) else TRANSFORMER_TARGETS

    def lora_unreachable(self) -> tuple[str, ...]:
        return ("tower.attnpool.",) if isinstance(self.tower, ModifiedResNet) else ()

    def token_site(self) -> TokenSite | None:
        """open_clip's ViT: tokens enter after the positional embedding (patch dropout is the step after it) and
        leave after the transformer, so every pooling (class token, average, attention pool) sees the same tokens."""
        if not isinstance(self.tower, VisionTransformer):
            return None
        vit = self.tower
        return TokenSite(vit.class_embedding.shape[-1], vit.patch_dropout, vit.transformer)
