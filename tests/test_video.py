"""Video, the fifth modality: decoding each container and codec from shard bytes, bad clips counted, frames sampled
the same way at every evaluation, the temporal tower, export, and video-text retrieval and zero-shot."""

from __future__ import annotations

import io
import itertools
import json
import random

import numpy as np
import pytest
import soundfile
import torch

from tessera.config import from_dict
from tessera.data import DataConfig, TrainLoader
from tessera.data.audio import AudioDecoder
from tessera.data.decode import BadSample
from tessera.data.demo_video import CODECS, FPS, FRAMES, build, encode_video, moving_clip, sound_track
from tessera.data.make_shards import write_shards
from tessera.data.video import VideoDecoder
from tessera.eval.retrieval import main as retrieval_main
from tessera.eval.zeroshot import main as zeroshot_main
from tessera.models import ModelConfig, build_model, load_model, save_model
from tessera.models.video import VideoTransform, frame_indices

from .conftest import TINY_MODEL, call_main

VIDEO_TOWER = {
    "encoder": "open_clip_video",
    "model": "ViT-B-32",
    "overrides": TINY_MODEL["towers"]["image"]["overrides"],
    "frames": 4,
}
VIDEO_MODEL = {"embed_dim": 32, "towers": {"video": VIDEO_TOWER, "text": TINY_MODEL["towers"]["text"]}}


def _model(temporal: str = "mean", seed: int = 0):
    torch.manual_seed(seed)
    cfg = {**VIDEO_MODEL, "towers": {**VIDEO_MODEL["towers"], "video": {**VIDEO_TOWER, "temporal": temporal}}}
    return build_model(from_dict(ModelConfig, cfg, "model")).eval()


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("videos")
    build(out, train_clips=48, samples_per_shard=16, seed=0)
    return out


@pytest.mark.parametrize("container", list(CODECS))
def test_each_container_decodes_to_its_frames_and_its_sound_track_becomes_an_audio_member(container, tmp_path):
    frames = moving_clip("star", "red", "right", random.Random(0))
    data = encode_video(frames, FPS, container, audio=sound_track("star", "red", random.Random(0)))
    (tmp_path / f"clip.{container}").write_bytes(data)
    decoder = VideoDecoder()
    members = decoder.members("video", f"clip.{container}", tmp_path)  # what make_shards writes
    video = decoder.decode(members)
    assert (video.width, video.height, video.fps) == (32, 32, FPS) and FRAMES <= video.num_frames <= FRAMES + 1
    pictures = video.frames([0, 7, 15])
    for picture, i in zip(pictures, (0, 7, 15)):  # lossy codecs: close to the source frames, not equal
        assert np.abs(np.asarray(picture, dtype=float) - frames[i]).mean() < 12
    # the shape moves right: its colour's mass is further right in the last frame than in the first
    red = [np.asarray(p, dtype=float)[..., 0] - np.asarray(p, dtype=float)[..., 2] for p in (pictures[0], pictures[2])]
    assert np.average(np.arange(32), weights=red[1].clip(0).sum(0) + 1e-6) > np.average(
        np.arange(32), weights=red[0].clip(0).sum(0) + 1e-6
    )
    wave, rate = AudioDecoder().decode({"flac": members["flac"]})
    assert abs(len(wave) / rate - FRAMES / FPS) < 0.15 and float(wave.abs().max()) > 0.1


def test_a_clip_past_the_stream_end_repeats_its_last_frame_and_a_silent_video_has_no_audio_member(tmp_path):
    frames = moving_clip("circle", "blue", "up", random.Random(1))
    (tmp_path / "clip.mkv").write_bytes(encode_video(frames, FPS, "mkv"))
    members = VideoDecoder().members("video", "clip.mkv", tmp_path)
    assert set(members) == {"mkv"}
    video = VideoDecoder().decode(members)
    last, past = video.frames([FRAMES - 1, FRAMES + 5])
    assert np.array_equal(np.asarray(last), np.asarray(past))


def test_bad_clips_are_counted_by_reason_and_the_rest_train(tmp_path):
    rng = random.Random(0)
    good = encode_video(moving_clip("circle", "red", "left", rng), FPS, "mp4")
    samples = [(f"g{i}", {"mp4": good, "txt": b"a red circle moving left"}) for i in range(6)]
    samples += [
        ("empty", {"webm": b"", "txt": b"x"}),
        ("junk", {"avi": b"RIFF....not a video", "txt": b"x"}),
        ("truncated", {"mp4": good[: len(good) // 3], "txt": b"x"}),
    ]
    write_shards(samples, tmp_path, "v", 100)
    model = _model()
    cfg = from_dict(DataConfig, {"train": str(tmp_path / "v-000000.tar"), "num_workers": 0}, "data")
    loader = TrainLoader(cfg, model.transforms(True), model.collators(), model.modalities, 3, seed=0)
    batches = list(itertools.islice(loader, 2))
    assert batches[0]["video"].shape == (3, 4, 3, 32, 32)
    assert dict(loader.stats.skipped) == {"empty_video": 1, "undecodable_video": 2}
    with pytest.raises(BadSample, match="undecodable_video"):
        VideoDecoder().decode({"mkv": b"\x1a\x45\xdf\xa3" + b"\0" * 64})


def test_eval_samples_the_same_frames_every_time_and_training_draws_one_crop_per_clip():
    assert frame_indices(16, 4, False) == [2, 6, 9, 13] and frame_indices(5, 8, False) == [0, 1, 1, 2, 2, 3, 3, 4]
    for span, k in ((16, 4), (17, 4), (16, 8), (5, 8), (101, 7)):  # a clip and its reverse: mirror frames
        f = frame_indices(span, k, False)
        assert [span - 1 - i for i in reversed(f)] == f
    random.seed(0)
    draws = {tuple(frame_indices(16, 4, True)) for _ in range(20)}
    assert len(draws) > 1 and all(4 * i <= j < 4 * (i + 1) for d in draws for i, j in enumerate(d))
    video = VideoDecoder().decode(
        {"mp4": encode_video(moving_clip("star", "red", "right", random.Random(0)), 8, "mp4")}
    )
    model = _model()
    ev = model.towers["video"].transform(False)
    assert torch.equal(ev(video), ev(video))
    # a training crop that differs per frame would shift the static background; one draw serves the whole clip
    train = VideoTransform(lambda img: torch.tensor([random.random(), torch.rand(()).item()]), 4, 60.0, True)
    rows = train(video)
    assert torch.equal(rows, rows[:1].expand_as(rows))


def test_the_temporal_transformer_starts_as_the_frame_average_and_then_tells_a_clip_from_its_reverse():
    clip = torch.randn(2, 4, 3, 32, 32)
    mean, seq = _model("mean"), _model("transformer")
    seq.towers["video"].frames.load_state_dict(mean.towers["video"].frames.state_dict())
    with torch.no_grad():
        assert torch.allclose(seq.towers["video"](clip), mean.towers["video"](clip), atol=1e-6)
        reverse = clip.flip(1)
        assert torch.allclose(mean.towers["video"](reverse), mean.towers["video"](clip), atol=1e-5)  # order-blind
        for p in seq.towers["video"].temporal.parameters():
            p.add_(0.05 * torch.randn_like(p))
        assert not torch.allclose(seq.towers["video"](reverse), seq.towers["video"](clip), atol=1e-4)


def test_a_video_model_exports_and_loads_to_the_same_embeddings(tmp_path, caplog):
    model = _model("transformer")
    with torch.no_grad():
        for p in model.towers["video"].temporal.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with caplog.at_level("INFO"):
        out = save_model(model, tmp_path / "model")
    assert "open_clip" in caplog.text and not (out / "open_clip").exists()  # no image tower: said, not dropped
    back = load_model(out)
    clip = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.encode("video", clip), model.encode("video", clip))
    # the Python API takes video files (and bytes), through the tower's eval frames
    import tessera

    data = encode_video(moving_clip("cross", "blue", "up", random.Random(3)), FPS, "mp4")
    (tmp_path / "clip.mp4").write_bytes(data)
    z = tessera.load(out).embed(videos=[str(tmp_path / "clip.mp4"), data])
    frames = model.towers["video"].transform(False)(VideoDecoder().decode({"mp4": data}))
    with torch.no_grad():
        want = model.encode("video", frames[None])[0]
    assert torch.allclose(z[0], want, atol=1e-6) and torch.allclose(z[1], want, atol=1e-6)


def test_video_text_retrieval_and_zero_shot_direction_on_the_demo_clips(tmp_path, video_shards, capsys):
    save_model(_model("transformer"), tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--data", str(video_shards / "val-video-000000.tar")]
    rc, out, err = call_main(
        retrieval_main, [*args, "--query", "text", "--target", "video", "--out", str(tmp_path / "r.json")], capsys
    )
    assert rc == 0, err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["n"]["text-video"] == 192 and 0 <= doc["metrics"]["text_to_video_R@1"] <= 1
    assert set(doc["chance"]) == set(doc["metrics"])
    rc, out, err = call_main(
        zeroshot_main,
        [*args, "--modality", "video", "--classes", str(video_shards / "classes-video.json"), "--out",
         str(tmp_path / "z.json")],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    doc = json.loads((tmp_path / "z.json").read_text())
    assert 0 <= doc["metrics"]["acc1"] <= 1 and doc["n"] == 192


def test_make_shards_takes_video_paths_with_their_sound(tmp_path, capsys):
    from tessera.data.make_shards import main as make_shards_main

    clip = encode_video(
        moving_clip("square", "green", "down", random.Random(2)),
        FPS,
        "webm",
        sound_track("square", "green", random.Random(2)),
    )
    (tmp_path / "a.webm").write_bytes(clip)
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "a.webm", "text": "a green square moving down"}) + "\n")
    rc, _, err = call_main(
        make_shards_main, ["--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "s")], capsys
    )
    assert rc == 0, err
    import tarfile

    with tarfile.open(next((tmp_path / "s").glob("*.tar"))) as tar:
        names = sorted(m.name.split(".", 1)[1] for m in tar.getmembers())
        flac = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".flac"))).read()
    assert names == ["flac", "txt", "webm"]
    assert soundfile.info(io.BytesIO(flac)).samplerate == 48000  # Opus in webm: 48 kHz


def test_lora_reaches_the_frame_tower_and_the_temporal_transformer_and_an_image_checkpoint_starts_it(tmp_path):
    from tessera.models.lora import LoraConfig, apply_lora, lora_targets
    from tessera.models.open_clip_io import export_open_clip

    model = _model("transformer")
    targets = lora_targets(model, LoraConfig(towers=["video"]))
    assert any(".frames.tower." in t for t in targets) and any(".temporal." in t for t in targets)
    adapted = apply_lora(model, LoraConfig(towers=["video"]))
    adapted.encode("video", torch.randn(2, 4, 3, 32, 32)).sum().backward()
    trained = [n for n, p in adapted.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
    # pretrained: the open_clip form of an image-text export starts the frame tower
    image_model = build_model(from_dict(ModelConfig, TINY_MODEL, "model"))
    save_model(image_model, tmp_path / "image", formats=())
    oc_dir, _ = export_open_clip(tmp_path / "image")
    video = {**VIDEO_TOWER, "pretrained": str(oc_dir / "open_clip_model.safetensors")}
    cfg = {**VIDEO_MODEL, "towers": {**VIDEO_MODEL["towers"], "video": video}}
    started = build_model(from_dict(ModelConfig, cfg, "model"))
    a = image_model.towers["image"].tower.state_dict()
    b = started.towers["video"].frames.tower.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
