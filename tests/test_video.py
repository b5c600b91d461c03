"""Video, the fifth modality: decoding each container and codec from shard bytes, bad clips counted, frames sampled
the same way at every evaluation, the temporal tower, export, and video-text retrieval and zero-shot."""

from __future__ import annotations

import io
import itertools
import json
import math
import random

import numpy as np
import pytest
import soundfile
import torch

from tessera.config import from_dict
from tessera.data import DataConfig, TrainLoader
from tessera.data.audio import AudioDecoder
from tessera.data.decode import BadSample
from tessera.data.demo_video import (
    CODECS,
    FPS,
    FRAMES,
    build,
    crossing_clip,
    encode_video,
    moving_clip,
    sound_track,
)
from tessera.data.make_shards import write_shards
from tessera.data.video import VideoDecoder
from tessera.eval.retrieval import main as retrieval_main
from tessera.eval.reversal import main as reversal_main
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


def _model(temporal: str = "mean", seed: int = 0, **tower):
    torch.manual_seed(seed)
    video = {**VIDEO_TOWER, "temporal": temporal, **tower}
    cfg = {**VIDEO_MODEL, "towers": {**VIDEO_MODEL["towers"], "video": video}}
    return build_model(from_dict(ModelConfig, cfg, "model")).eval()


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("videos")
    build(out, train_clips=48, samples_per_shard=16, seed=0, motion_clips=0)
    return out


def _centroids(frames: list[np.ndarray], background: np.ndarray) -> list[float | None]:
    """The shape's mean column in each frame (None where it is off the canvas): pixels far from the background."""
    out = []
    for f in frames:
        mask = np.abs(f.astype(np.int16) - background).sum(-1) > 60
        out.append(float(np.nonzero(mask)[1].mean()) if mask.sum() > 4 else None)
    return out


def test_motion_only_clips_tell_their_sense_by_the_frames_order_alone():
    """Where a crossing shape sits in a frame is spread alike for clips moving left and right (the demo's first
    clips put it on the side it comes from, early on); only consecutive frames tell which way it goes."""
    rng = random.Random(0)
    stats = {}
    for clip in (moving_clip, crossing_clip):
        at = {d: [] for d in ("left", "right")}  # the centroid in frame 4 of each clip
        for i in range(160):
            direction = ("left", "right")[i % 2]
            frames = clip("square", "red", direction, rng)
            background = np.median(np.stack([f[0, 0].astype(np.int16) for f in frames]), 0)
            cols = _centroids(frames, background)
            if cols[4] is not None:
                at[direction].append(cols[4])
            # consecutive frames that both show it (not across its return to the first edge) tell the sense
            steps = [b - a for a, b in zip(cols, cols[1:]) if a is not None and b is not None and abs(b - a) < 12]
            assert all((s > 0) == (direction == "right") for s in steps if abs(s) > 0.5), (clip, direction)
        stats[clip.__name__] = np.mean(at["right"]) - np.mean(at["left"])
    assert abs(stats["moving_clip"]) > 8  # an early frame gives the demo's sense away
    assert abs(stats["crossing_clip"]) < 2.5  # not the crossing clips'


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


def test_motion_features_see_each_two_consecutive_frames_so_even_the_average_tells_a_clip_from_its_reverse(tmp_path):
    model = _model("mean", motion="difference")
    tower = model.towers["video"]
    clip = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        ahead, back = tower(clip), tower(clip.flip(1))
        assert not torch.allclose(ahead, back, atol=1e-4)  # the motion images of the reversed clip differ
        # uint8 frames (the compact transform's) and the float transform's normalised frames: the same features
        floats = tower.frames.normalized(clip.flatten(0, 1)).unflatten(0, (2, 4))
        torch.testing.assert_close(tower(floats), ahead, rtol=1e-5, atol=1e-5)
        # pooled: the K frames' features and the K-1 motion features, the second tower's on each consecutive pair
        frames = tower.frames(floats.flatten(0, 1)).view(2, 4, -1)
        grey = floats.mean(2)
        pairs = torch.stack([grey[:, :-1], grey[:, 1:], grey[:, 1:] - grey[:, :-1]], dim=2)
        motion = tower.motion(pairs.flatten(0, 1)).view(2, 3, -1)
        torch.testing.assert_close(ahead, torch.cat([frames, motion], 1).mean(1), rtol=1e-5, atol=1e-5)
    seq = _model("transformer", motion="difference")
    assert seq.towers["video"].temporal.positions.shape[0] == 4 + 3
    back_again = load_model(save_model(seq, tmp_path / "model"))
    with torch.no_grad():
        assert torch.equal(back_again.encode("video", clip), seq.encode("video", clip))
    with pytest.raises(Exception, match="motion: difference needs frames >= 2"):
        _model("mean", motion="difference", frames=1)


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


def test_the_reversal_test_flips_the_eval_frames_and_an_order_blind_tower_ties_on_every_clip(
    tmp_path, video_shards, capsys
):
    # the eval frames of a clip played backwards are its eval frames in reverse order (lossless frames: PNG in avi)
    frames = moving_clip("star", "red", "right", random.Random(0))
    lossless = ("avi", "png", "rgb24")
    ahead, back = (
        VideoDecoder().decode({"avi": encode_video(f, FPS, "avi", codec=lossless)}) for f in (frames, frames[::-1])
    )
    ev = _model().towers["video"].transform(False)
    assert torch.equal(ev(back), ev(ahead).flip(0))

    mean, seq = _model("mean"), _model("transformer")
    with torch.no_grad():
        for p in seq.towers["video"].temporal.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = ["--data", str(video_shards / "val-video-000000.tar")]
    for name, model in (("mean", mean), ("transformer", seq)):
        save_model(model, tmp_path / name)
        out = tmp_path / f"{name}.json"
        rc, printed, err = call_main(reversal_main, ["--model", str(tmp_path / name), *data, "--out", str(out)], capsys)
        assert rc == 0, err
        doc = json.loads(out.read_text())
        assert doc["n"] == 192 and doc["modality"] == "video" and doc["task"] == "reversal"
        if name == "mean":  # the frames' average is the same forwards and backwards
            assert doc["metrics"]["ties"] == 1.0 and doc["metrics"]["reversal"] == 0.5
        else:
            assert doc["metrics"]["ties"] < 0.2 and "of clips beat their own reversal" in printed
    rc, _, err = call_main(reversal_main, ["--model", str(tmp_path / "mean"), *data, "--modality", "text"], capsys)
    assert rc == 2 and "'text' has no time axis to reverse: try --modality video" in err


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


def test_reversal_negatives_score_each_caption_over_its_clip_and_the_clip_played_backwards():
    from tessera.config import ConfigError
    from tessera.train.components.objectives import ContrastiveObjective
    from tessera.train.recipes.config import LossConfig
    from tessera.train.recipes.load import load_config

    torch.manual_seed(0)
    batch = {"video": torch.randn(6, 4, 3, 32, 32), "text": torch.randint(1, 50, (6, 16))}
    cfg = LossConfig(tile_size=4, reversal_negatives=0.5)
    mean, seq = _model("mean").train(), _model("transformer").train()
    with torch.no_grad():
        for p in seq.towers["video"].temporal.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain, _ = ContrastiveObjective(seq.pairs, LossConfig(tile_size=4))(seq, batch)
    for model in (mean, seq):
        objective = ContrastiveObjective(model.pairs, cfg, time_axes={"video": 1})
        losses, _ = objective(model, batch)
        term = losses["loss/reversal/video-text"]
        out = model(batch)
        t, v = out["features"]["text"], out["features"]["video"]
        r = model.encode("video", batch["video"].flip(1))
        scale = out["logit_scale"]["video__text"]
        want = torch.nn.functional.softplus(scale * ((r - v) * t).sum(-1)).mean()
        torch.testing.assert_close(term, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses["loss"], losses["loss/video-text"] + 0.5 * term)
        if model is mean:  # blind to order: the clip and its reversal tie, log 2 each
            torch.testing.assert_close(term, torch.tensor(math.log(2.0)), rtol=1e-5, atol=1e-5)
        else:
            model.zero_grad()
            term.backward()
            assert all(
                p.grad is not None and p.grad.abs().sum() > 0 for p in model.towers["video"].temporal.parameters()
            )
    torch.testing.assert_close(plain["loss"], plain["loss/video-text"])  # off: no term, no second forward

    video = {"video": VIDEO_TOWER, "text": TINY_MODEL["towers"]["text"]}
    with pytest.raises(ConfigError, match="not with train.chunk_size"):
        load_config(None, [f"model={json.dumps({'embed_dim': 32, 'towers': video})}", "loss.reversal_negatives=1",
                           "train.batch_size=8", "train.chunk_size=4"])  # fmt: skip
    with pytest.raises(ConfigError, match="has none"):
        load_config(None, [f"model={json.dumps(TINY_MODEL)}", "loss.reversal_negatives=1"])
