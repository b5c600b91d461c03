"""Safe per-modality decoding: what is accepted, and the reason each bad sample is counted under."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from tessera.data.decode import BadSample
from tessera.modalities import decoder

from .conftest import jpeg_bytes


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA" if fmt == "PNG" else "RGB", (20, 10), (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("suffix,fmt", [("jpg", "JPEG"), ("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_images_of_every_format_decode_to_rgb(suffix, fmt):
    img = decoder("image").decode({suffix: _encoded(fmt)})
    assert img.mode == "RGB" and img.size == (20, 10)
    r, g, b = img.getpixel((5, 5))
    assert g > 150 and r < 60


def test_broken_images_are_bad_samples():
    good = jpeg_bytes()
    with pytest.raises(BadSample) as exc:
        decoder("image").decode({"jpg": good[: len(good) // 2]})
    assert exc.value.reason == "undecodable_image"
    with pytest.raises(BadSample) as exc:
        decoder("image").decode({"png": b"not an image at all"})
    assert exc.value.reason == "undecodable_image"


def test_decompression_bombs_are_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadSample) as exc:
        decoder("image").decode({"jpg": jpeg_bytes(size=(40, 30))})
    assert exc.value.reason == "image_too_large"


@pytest.mark.parametrize(
    "members,expected",
    [
        ({"txt": b"  a red circle \n"}, ["a red circle"]),
        # CLIP_benchmark's retrieval shards: every caption of the image, one per line
        (
            {"txt": b"a red circle\nA circle, red\r\n\n  the red one \n"},
            ["a red circle", "A circle, red", "the red one"],
        ),
        ({"json": json.dumps({"caption": "one"}).encode()}, ["one"]),
        ({"json": json.dumps({"captions": ["a", " ", "b"]}).encode()}, ["a", "b"]),
        ({"json": json.dumps({"text": "clap style"}).encode()}, ["clap style"]),
        ({"json": json.dumps({"text": ["x", "y"], "tags": [1]}).encode()}, ["x", "y"]),
        ({"txt": b"from txt", "json": json.dumps({"caption": "from json"}).encode()}, ["from txt"]),
    ],
)
def test_text_layouts(members, expected):
    assert decoder("text").decode(members) == expected


@pytest.mark.parametrize(
    "members,reason",
    [
        ({"txt": b"   "}, "empty_text"),
        ({"json": b"{not json"}, "bad_json"),
        ({"json": b"[1, 2]"}, "bad_json"),
        ({"json": json.dumps({"url": "x"}).encode()}, "empty_text"),
        ({"json": json.dumps({"captions": [1, None]}).encode()}, "empty_text"),
        ({"txt": b"\xff\xfe\x00bad"}, "bad_text_encoding"),
    ],
)
def test_bad_text_reasons(members, reason):
    with pytest.raises(BadSample) as exc:
        decoder("text").decode(members)
    assert exc.value.reason == reason


def test_caption_choice_is_random_in_training_and_first_in_eval():
    import random

    text = decoder("text")
    caps = ["a", "b", "c"]
    picks = {text.pick(caps, random.Random(i)) for i in range(50)}
    assert picks == set(caps)
    assert text.first(caps) == "a"


def test_labels():
    assert decoder("label").decode({"cls": b" 7\n"}) == 7
    with pytest.raises(BadSample, match="bad_label"):
        decoder("label").decode({"cls": b"seven"})


def test_a_manifest_caption_of_several_lines_stays_one_caption(tmp_path):
    """A `.txt` line is a caption, so make-shards writes a multi-line `text` where it is read back whole."""
    text = decoder("text")
    written = text.members("text", "a poem\nin two lines", tmp_path)
    members = {k: json.dumps(v).encode() if isinstance(v, dict) else v for k, v in written.items()}
    assert text.decode(members) == ["a poem\nin two lines"]
    assert text.decode(text.members("text", "one line", tmp_path)) == ["one line"]


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.radial_gradient("L").resize((width, height)).convert("RGB").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_a_large_jpeg_is_decoded_at_the_dct_scale_its_training_crop_needs():
    """A training picture is needed at (34, 34) for a 32-pixel input whose crops keep 90% of the area: a JPEG at
    least twice that on both sides is decoded at 1/2, 1/4 or 1/8 scale, never below it; a smaller JPEG, a PNG and
    evaluation decode at full size. The drafted picture goes through the same crop to the same input size."""
    from tessera.config import from_dict
    from tessera.models import ModelConfig, build_model

    from .conftest import TINY_MODEL

    tower = build_model(from_dict(ModelConfig, TINY_MODEL, "model")).towers["image"]
    train, evaluate = tower.compact_transform(True), tower.compact_transform(False)
    assert train.decode_size == (34, 34) and getattr(evaluate, "decode_size", None) is None
    images = decoder("image")
    sizes = {(w, h): images.decode_for({"jpg": _jpeg(w, h)}, train).size for w, h in [(512, 384), (300, 80), (60, 60)]}
    assert sizes == {(512, 384): (64, 48), (300, 80): (150, 40), (60, 60): (60, 60)}
    png = io.BytesIO()
    Image.new("RGB", (512, 384)).save(png, format="PNG")
    assert images.decode_for({"png": png.getvalue()}, train).size == (512, 384)
    assert images.decode_for({"jpg": _jpeg(512, 384)}, evaluate).size == (512, 384)
    assert train(images.decode_for({"jpg": _jpeg(512, 384)}, train)).shape == (3, 32, 32)
