"""Distillation in training: the two-pass step covers it exactly; `tessera embed-shards` stores a teacher's embeddings
in shards; runs distil from an online teacher of another width, from stored embeddings (the same losses, no teacher
forward) and from the weights' own average; bad teachers and shards get clear outcomes."""

from __future__ import annotations

import copy
import io
import json
import tarfile

import numpy as np
import pytest
import torch

from tessera.config import ConfigError, from_dict
from tessera.data.derived import teacher_key
from tessera.data.make_shards import write_shards
from tessera.eval.embed_shards import main as embed_main
from tessera.models import ModelConfig, build_model, load_model, save_model
from tessera.train.components.distill import DistillObjective, ModelTeacher, attach_maps, check_pairs
from tessera.train.components.objectives import ContrastiveObjective
from tessera.train.components.steps import TwoPassStep
from tessera.train.recipes.config import DistillConfig, LossConfig
from tessera.train.recipes.load import load_config, merge_overrides

from .conftest import TINY_MODEL, call_main
from .test_train import tiny_run_args
from .test_two_pass import CHUNK, DROPOUT_IMAGE, TEXT, PlainEngine, _batch, _chunks, _model


def _teacher_model(embed_dim: int = 16, seed: int = 3):
    torch.manual_seed(seed)
    return build_model(from_dict(ModelConfig, {**TINY_MODEL, "embed_dim": embed_dim}, "model")).eval()


@pytest.mark.parametrize("kind", ["logits", "both"])
def test_two_pass_step_with_distillation_equals_the_one_graph_step(kind):
    """Teacher features made in the first pass and kept; the learned map into the teacher's width (kind=both, 24 ->
    16) trains through the student's forward like any feature: every gradient equals the one-graph step's."""
    reference = _model({"image": DROPOUT_IMAGE, "text": TEXT})
    teacher = ModelTeacher(_teacher_model(), ["image", "text"])
    cfg = DistillConfig(teacher="t", kind=kind, weight=2.0, feature_weight=0.5)
    torch.manual_seed(11)
    attach_maps(reference, teacher, cfg)
    chunked = copy.deepcopy(reference)
    pairs = check_pairs(teacher, reference.pairs, cfg, "infonce")
    objective = DistillObjective(ContrastiveObjective(reference.pairs, LossConfig(tile_size=5)), teacher, cfg, pairs)
    batch = _batch(reference)
    batch[teacher_key("image")], batch[teacher_key("text")] = batch["image"], batch["text"]

    torch.manual_seed(7)
    outs = [reference(c) for c in _chunks(reference, batch)]
    out = {"features": {m: torch.cat([o["features"][m] for o in outs]) for m in outs[0]["features"]}}
    out["logit_scale"], out["teacher"] = outs[0]["logit_scale"], objective.teacher_features(batch)
    want, _ = objective.loss(out, batch)
    want["loss"].backward()
    assert ("distill/image" in want) == (kind == "both") and "distill/image-text" in want
    torch.manual_seed(7)
    got, _ = TwoPassStep(objective, chunked, CHUNK, grad_accum=1)(PlainEngine(chunked), batch)
    for key in want:
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-6), key
    params = dict(chunked.named_parameters())
    assert any(name.startswith("distill_maps.") for name in params) == (kind == "both")
    for name, p in reference.named_parameters():
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(params[name].grad, p.grad, rtol=1e-5, atol=max(1e-7, 1e-6 * scale), msg=name)


def test_teacher_checks_say_what_is_wrong():
    teacher = ModelTeacher(_teacher_model(), ["image"])  # a teacher of one of the student's modalities
    with pytest.raises(ConfigError, match="covers none of the student's pairs"):
        check_pairs(teacher, [("image", "text")], DistillConfig(teacher="t"), "infonce")
    assert check_pairs(teacher, [("image", "text")], DistillConfig(teacher="t", kind="features"), "infonce") == []
    both = ModelTeacher(_teacher_model(), ["image", "text"])
    with pytest.raises(ConfigError, match="not a SigLIP model"):
        check_pairs(both, [("image", "text")], DistillConfig(teacher="t"), "siglip")
    with pytest.raises(ConfigError, match="distill.teacher is required"):
        DistillConfig()
    with pytest.raises(ConfigError, match="needs teacher=ema"):
        DistillConfig(teacher="t", local_crops=(0.1, 0.5))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "model"
    save_model(_teacher_model(embed_dim=48), out)
    return out


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_embed_shards_copies_every_member_and_adds_the_teachers_embeddings(demo_shards, teacher_dir, tmp_path, capsys):
    shard = demo_shards / "train-txt-000000.tar"
    args = ["--model", str(teacher_dir), "--data", str(shard)]
    rc, out, err = call_main(embed_main, [*args, "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    manifest = json.loads((tmp_path / "teacher.json").read_text())
    teacher = load_model(teacher_dir)
    assert f"distill.teacher_hash={manifest['teacher']['hash']}" in out
    assert manifest["teacher"]["widths"] == {"image": 48, "text": 48}
    before, after = _members(shard), _members(tmp_path / shard.name)
    # every member as it was; not the pickles, nor the sample whose key repeats (the demo's broken ones)
    assert all(after[name] == data for name, data in before.items() if not name.startswith("bad"))
    assert not any(name.endswith(".pth") for name in after) and manifest["data"]["skipped"]
    added = sorted(set(after) - set(before))
    keys = {name.split(".")[0] for name in before}
    assert added and {name.split(".", 1)[1] for name in added} == {"teacher-model.image.npy", "teacher-model.text.npy"}
    # the stored embedding is the teacher's, of its evaluation transform of the sample
    name = next(n for n in added if n.endswith(".text.npy"))
    key = name.split(".")[0]
    stored = np.load(io.BytesIO(after[name]), allow_pickle=False)
    assert stored.dtype == np.float16 and stored.shape == (48,)
    caption = before[f"{key}.txt"].decode()
    tokens = teacher.collators()["text"]([teacher.transforms(False)["text"](caption)])
    with torch.no_grad():
        want = teacher.encode("text", tokens)[0].numpy()
    np.testing.assert_allclose(stored.astype(np.float32), want, atol=2e-3)
    assert len(keys) == json.loads((tmp_path / "sizes.json").read_text())[shard.name]
    rc, _, err = call_main(embed_main, [*args, "--out", str(demo_shards)], capsys)
    assert rc == 2 and "holds the shards being read" in err


# --- runs ----------------------------------------------------------------------------------------------------------

RUN = ["train.steps=2", "train.log_every=1", "train.precision=fp32", "data.num_workers=0", "data.val=[]"]
ORDERED = ["data.shuffle_buffer=1"]  # the same batches from the originals and from their embedded copies


@pytest.fixture(scope="module")
def clean_shards(demo_shards, tmp_path_factory):
    """The demo's image-text shards without their broken samples, and their copies with a 48-wide teacher's
    embeddings (the broken ones would be dropped from the copies only, shifting every later sample's augmentation)."""
    out = tmp_path_factory.mktemp("clean")
    samples = [
        (key, members)
        for shard in sorted(demo_shards.glob("train-txt-*.tar"))
        for key, members in _samples(shard)
        if not key.startswith("bad")
    ]
    write_shards(samples, out / "plain", "train", 60)
    teacher = out / "teacher"
    save_model(_teacher_model(embed_dim=48), teacher)
    assert embed_main(["--model", str(teacher), "--data", str(out / "plain"), "--out", str(out / "taught")]) == 0
    return out


def _samples(shard):
    grouped: dict[str, dict[str, bytes]] = {}
    for name, data in _members(shard).items():
        key, suffix = name.split(".", 1)
        grouped.setdefault(key, {})[suffix] = data
    return grouped.items()


def _train_records(run) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


def _args(shards, out, *extra):
    return merge_overrides(merge_overrides(tiny_run_args(shards, out), [f"data.train={shards}", *RUN]), extra)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_teacher_of_another_width_trains_the_student_and_stays_out_of_the_export(
    clean_shards, tmp_path, in_process_training, precision
):
    """Under bf16 and fp16 the maps into the teacher's width take the towers' half-precision features, in the
    towers' autocast."""
    from tessera.train.pretrain import main

    args = _args(clean_shards / "plain", tmp_path / "run", f"distill.teacher={clean_shards / 'teacher'}")
    # fp16 may skip its first steps while its loss scale comes down (no mean to log for those): 2 more steps
    steps = 4 if precision == "fp16" else 2
    args = merge_overrides(args, [f"train.precision={precision}", f"train.steps={steps}"])
    assert main([*args, "distill.kind=both", "train.ckpt_every=1"]) == 0
    records = _train_records(tmp_path / "run")
    applied = [
        r
        for r, o in zip(records, [0] + [r.get("overflow_steps", 0) for r in records])
        if r.get("overflow_steps", 0) == o
    ]
    assert applied
    for key in ("distill/image-text", "distill/image", "distill/text"):
        assert all(np.isfinite(r[key]) for r in applied), key
    ckpt = tmp_path / "run" / "checkpoints" / f"step{steps:08d}"
    assert any("distill_maps" in f.name or f.suffix == ".pt" for f in ckpt.iterdir())
    exported = load_model(tmp_path / "run" / "model")  # strict: the maps into the teacher's width are not in it
    assert not any(name.startswith("distill_maps") for name in exported.state_dict())


def test_stored_embeddings_give_the_online_teachers_losses_without_its_forward(
    clean_shards, tmp_path, in_process_training, capsys
):
    from tessera.train.pretrain import main

    online, stored = tmp_path / "online", tmp_path / "stored"
    assert main(_args(clean_shards / "plain", online, *ORDERED, f"distill.teacher={clean_shards / 'teacher'}")) == 0
    capsys.readouterr()
    manifest = json.loads((clean_shards / "taught" / "teacher.json").read_text())
    hashed = f"distill.teacher_hash={manifest['teacher']['hash']}"
    assert main(_args(clean_shards / "taught", stored, *ORDERED, "distill.teacher=stored", hashed)) == 0
    log = capsys.readouterr().err
    assert "distill.teacher=stored: teacher" in log and "distill.teacher: " not in log  # no teacher model loaded
    # the same batches; the stored embeddings are the online ones rounded to fp16, and so is the first step's
    # distillation loss, then the weights it trains
    for i, (a, b) in enumerate(zip(_train_records(online), _train_records(stored), strict=True)):
        assert b["loss/image-text"] == pytest.approx(a["loss/image-text"], rel=1e-6 if i == 0 else 1e-3)
        assert b["distill/image-text"] == pytest.approx(a["distill/image-text"], rel=2e-3)


def test_bad_stored_embeddings_get_clear_outcomes(clean_shards, tmp_path, in_process_training, capsys):
    from tessera.train.pretrain import main

    taught = clean_shards / "taught"
    # a manifest of another teacher: an error before the first step
    assert main(_args(taught, tmp_path / "a", "distill.teacher=stored", "distill.teacher_hash=abc123")) == 2
    assert "names teacher 'teacher' with hash" in capsys.readouterr().err
    # a sample without its stored embedding: a counted skip
    broken = tmp_path / "broken"
    broken.mkdir()
    shards = sorted(taught.glob("train-*.tar"))
    samples = list(_samples(shards[0]))
    samples[3][1].pop("teacher-teacher.image.npy")
    write_shards(samples, broken, "train", 60)
    for name in ("teacher.json",):
        (broken / name).write_bytes((taught / name).read_bytes())
    assert (
        main(_args(broken / "train-000000.tar", tmp_path / "b", *ORDERED, "distill.teacher=stored", "train.steps=1"))
        == 0
    )
    data = _train_records(tmp_path / "b")[-1]["data"]
    assert data["skipped"].get("missing_teacher_image") == 1, data
    # a member of another width than the manifest's: an error naming it
    manifest = json.loads((taught / "teacher.json").read_text())
    manifest["teacher"]["widths"]["image"] = 47
    (broken / "teacher.json").write_text(json.dumps(manifest))
    rc = main(_args(broken / "train-000000.tar", tmp_path / "c", "distill.teacher=stored", "train.steps=1"))
    err = capsys.readouterr().err
    assert rc != 0 and "teacher-teacher.image.npy holds a float16 array of shape (48,)" in err


def test_self_distillation_from_the_weights_average(demo_shards, tmp_path, in_process_training):
    """distill.teacher=ema: the average is the teacher (its model holds the average, updated in place); SILC's local
    crops of the images pulled toward the teacher's whole picture."""
    from tessera.train.pretrain import main

    args = _args(demo_shards / "train-txt-000000.tar", tmp_path / "run", "train.ema.decay=0.5", "distill.teacher=ema")
    assert main([*args, "distill.local_crops=[0.1, 0.5]", "export.weights=both"]) == 0
    records = _train_records(tmp_path / "run")
    assert all(np.isfinite(r["distill/image-text"]) and np.isfinite(r["distill/image-local"]) for r in records)
    load_model(tmp_path / "run" / "model-ema")
    with pytest.raises(ConfigError, match="needs deepspeed.zero_stage 0-2|ZeRO-3's partitions"):
        load_config(None, ["train.ema.decay=0.9", "distill.teacher=ema", "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match="set train.ema"):
        load_config(None, ["distill.teacher=ema"])
