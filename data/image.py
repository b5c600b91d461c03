"""Image members of shards (`jpg`, `jpeg`, `png`, `webp`), decoded with PIL to RGB; oversized images are refused."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image

from .decode import BadSample, Decoder


class ImageDecoder(Decoder):
    modality = "image"
    suffixes = ("jpg", "jpeg", "png", "webp")

    def from_value(self, value: Any) -> Image.Image:
        """A PIL image of any mode, or an (H, W, 3) uint8 array -> an RGB PIL image."""
        if not isinstance(value, Image.Image):
            value = Image.fromarray(np.asarray(value))
        return value.convert("RGB")

    def decode(self, sample: dict[str, Any], size: tuple[int, int] | None = None) -> Image.Image:
        """`size` (width, height): the picture is needed at no more than this; a JPEG at least twice as large on
        both sides is decoded at the largest DCT scale (1/2, 1/4, 1/8) that keeps it at least this large."""
        raw = next(sample[s] for s in self.suffixes if s in sample)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(raw))
                if size is not None and img.format == "JPEG":
                    img.draft("RGB", size)
                img.load()
            return img.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise BadSample("image_too_large", str(exc)) from None
        except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for unidentified or truncated data
            raise BadSample("undecodable_image", str(exc)) from None

    def decode_for(self, sample: dict[str, Any], transform) -> Image.Image:
        return self.decode(sample, getattr(transform, "decode_size", None))
