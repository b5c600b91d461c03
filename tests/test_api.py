"""The Python API a user guesses: tessera.load(...).embed / similarity / classify, and the README's example."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

import tessera
from tessera.config import ConfigError
from tessera.models import save_model
from tessera.models.export import write_format

from .conftest import PY, ROOT, TINY_MODEL, run_cli
from .test_interop import _images, _trained_like


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = save_model(_trained_like(TINY_MODEL), tmp_path_factory.mktemp("api") / "model")
    write_format(out, "hf")
    return out


def test_the_readme_example_runs_as_written(export, tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API\n+```python\n(.*?)```", readme, re.S)
    assert block, "README has no Python API example"
    code = block[1].replace('"runs/demo/model"', repr(str(export)))
    proc = run_cli([PY, "-c", code], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("tensor(") == 2, proc.stdout


def test_embed_is_the_towers_encoding_whatever_the_batching_and_the_input_form(export, tmp_path):
    model = tessera.load(export, device="cpu")
    reference = model.module
    pictures = _images() * 3  # 6 pictures
    tf = reference.towers["image"].transform(False)
    with torch.no_grad():
        want = reference.encode("image", torch.stack([tf(p) for p in pictures]))
    got = model.embed(images=pictures, batch_size=4)  # two batches
    assert got.shape == (6, 32) and torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(6))
    # a file path and a numpy array are the same picture
    pictures[0].save(tmp_path / "p.png")
    as_path = model.embed(images=[tmp_path / "p.png", str(tmp_path / "p.png")])
    as_array = model.embed(images=[__import__("numpy").asarray(pictures[0])])
    assert torch.allclose(as_path, got[:1].expand(2, -1), atol=1e-6) and torch.allclose(as_array, got[:1], atol=1e-6)
    both = model.embed(images=pictures[:2], texts=["a red circle"])
    assert set(both) == {"images", "texts"} and both["texts"].shape == (1, 32)
    sim = model.similarity(images=pictures[:2], texts=["a red circle", "a blue square", "a star"])
    assert sim.shape == (2, 3) and torch.allclose(
        sim, got[:2] @ model.embed(texts=["a red circle", "a blue square", "a star"]).T
    )
    with pytest.raises(ConfigError, match="images=, texts="):
        model.embed(sounds=[(torch.zeros(16000), 16000)])
    with pytest.raises(ConfigError, match="ends in one of"):
        (tmp_path / "p.txt").write_text("x")
        model.embed(images=[tmp_path / "p.txt"])
    with pytest.raises(ConfigError, match="cannot read"):
        model.embed(images=[str(tmp_path / "missing.jpg")])


def test_classify_is_prompt_ensembling_over_the_learned_temperature(export):
    model = tessera.load(export, device="cpu")
    pictures, classes = _images(), ["circle", "square", "star"]
    templates = ["a photo of a {c}.", "a drawing of a {c}"]  # CLIP_benchmark's form
    probs = model.classify(pictures, classes, templates)
    # independently: per class, the renormalised mean of its prompts' embeddings
    weights = torch.stack(
        [
            torch.nn.functional.normalize(model.embed(texts=[t.format(c=c) for t in templates]).mean(0), dim=0)
            for c in classes
        ]
    )
    want = (model.logit_scale("image", "text") * model.embed(images=pictures) @ weights.T).softmax(-1)
    assert probs.shape == (2, 3) and torch.allclose(probs, want, atol=1e-5)
    assert torch.allclose(probs, model.classify(pictures, classes, [t.replace("{c}", "{}") for t in templates]))


def test_load_takes_open_clip_and_transformers_directories_too(export):
    pictures, captions = _images(), ["a red circle", "two squares"]
    (export.parent / "config.yaml").write_text("output_dir: runs/x\n")  # a run directory's own config
    ours = tessera.load(export.parent, device="cpu")  # a run directory: its model/
    z = ours.embed(images=pictures, texts=captions)
    for other in (f"local-dir:{export / 'open_clip'}", export / "hf"):
        theirs = tessera.load(other, device="cpu").embed(images=pictures, texts=captions)
        for k in z:
            assert torch.allclose(z[k], theirs[k], atol=1e-5), (other, k)
    with pytest.raises(ConfigError, match="not a model directory"):
        tessera.load(export / "open_clip" / "open_clip_model.safetensors")


def test_a_picture_of_any_mode_is_embedded_as_rgb(export):
    model = tessera.load(export, device="cpu")
    rgb = Image.new("RGB", (40, 40), (120, 120, 120))
    assert torch.allclose(model.embed(images=[rgb.convert("L")]), model.embed(images=[rgb]), atol=1e-6)


def test_each_decoder_takes_what_a_user_has_at_hand():
    import numpy as np

    from tessera import modalities

    picture = modalities.decoder("image").from_value(np.full((8, 6, 3), 200, dtype=np.uint8))
    assert picture.mode == "RGB" and picture.size == (6, 8)
    stereo = np.stack([np.ones(100, np.float32), np.zeros(100, np.float32)], axis=1)  # (samples, channels)
    wave, rate = modalities.decoder("audio").from_value((stereo, 8000))
    assert wave.shape == (100,) and torch.allclose(wave, torch.full((100,), 0.5)) and rate == 8000
    with pytest.raises(Exception, match="waveform, sample_rate"):
        modalities.decoder("audio").from_value(stereo)
    pcm = (np.ones(100) * 16384).astype(np.int16)  # half of full scale, as a WAV reader without soundfile gives it
    assert torch.allclose(modalities.decoder("audio").from_value((pcm, 8000))[0], torch.full((100,), 0.5))
    graphs = modalities.decoder("graph")
    ethanol = graphs.from_value("CCO")
    assert torch.equal(ethanol.x, graphs.decode({"smi": b"CCO"}).x) and ethanol.num_nodes == 3
