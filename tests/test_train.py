"""End to end through the command line, on one process: a run directory a user can rely on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tessera.models import load_model
from tessera.train.components.resume import resolve
from tessera.train.recipes.load import merge_overrides

from .conftest import PY, TINY_MODEL, no_compiler_env, run_cli


def tiny_run_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return merge_overrides(
        [
            f"output_dir={out}",
            f"model={json.dumps(TINY_MODEL)}",
            f"data.train=[{{shards: '{shards}/train-txt-{{000000..000003}}.tar', weight: 2}},"
            f" {{shards: '{shards}/train-json-{{000000..000003}}.tar', weight: 1}}]",
            f"data.val={shards}/val-000000.tar",
            "data.num_workers=1",
            "train.batch_size=16",
            "train.log_every=2",
            "train.warmup_steps=2",
            "eval.batch_size=160",
        ],
        extra,
    )


@pytest.mark.slow
def test_pretrain_cli_leaves_a_complete_run_directory(demo_shards, tmp_path):
    """... on a machine without a C++ compiler, compiling nothing and printing no DeepSpeed warning."""
    out = tmp_path / "run"
    proc = run_cli(
        [
            PY,
            "-m",
            "tessera.train.pretrain",
            *tiny_run_args(
                demo_shards,
                out,
                "train.steps=6",
                "train.ckpt_every=3",
                "train.precision=bf16",
                f"eval.classes={demo_shards}/classes.json",
            ),
        ],
        env=no_compiler_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not any((tmp_path / "torch_extensions").iterdir())
    printed = proc.stdout + proc.stderr  # DeepSpeed's logger writes to stdout
    assert "[WARNING]" not in printed and "Setting accelerator" not in printed, printed[-3000:]
    assert "zero-shot retrieval on held-out data after 6 steps" in proc.stdout
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 6 and resolved["model"]["embed_dim"] == 32

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train_lines] == [2, 4, 6]
    for x in train_lines:
        assert {"loss", "lr", "temperature/image-text", "samples_per_s", "data", "epoch"} <= set(x)
        assert x["samples_per_s"] > 0 and 0 < x["temperature/image-text"] < 1
    assert train_lines[-1]["data"]["seen"] >= 6 * 16 and "skipped" in train_lines[-1]["data"]
    assert any((out / "tensorboard").iterdir())

    assert (out / "checkpoints" / "latest").read_text() == "step00000006"
    assert resolve(out / "checkpoints", "latest") == out / "checkpoints" / "step00000006"

    model = load_model(out / "model")  # no DeepSpeed needed
    assert model.modalities == ["image", "text"]
    result = json.loads((out / "eval" / "retrieval.json").read_text())
    assert result["task"] == "zeroshot_retrieval" and result["n"] == {"image-text": 480}
    for key, value in result["metrics"].items():
        assert (
            (0.0 <= value <= 1.0) if ("_R@" in key or "mAP" in key or "recall@" in key) else (1.0 <= value <= 480.0)
        ), key
    assert (out / "eval" / "retrieval_recall.png").exists() and (out / "eval" / "retrieval.md").exists()
    zeroshot = json.loads((out / "eval" / "zeroshot_image.json").read_text())
    assert zeroshot["n"] == 480 and zeroshot["classes"] == 6 and 0 <= zeroshot["metrics"]["acc1"] <= 1
    assert (out / "eval" / "zeroshot_image_confusion.png").exists() and "zero-shot image classification" in proc.stdout
    report = (out / "eval" / "retrieval.md").read_text()
    assert (
        "retrieval_recall.png" in report
        and "zeroshot_image_confusion.png" in report
        and "zeroshot_image.json" in report
    )
    evals = [x for x in lines if x["kind"] == "eval"]
    assert evals and "image-text_modality_gap" in evals[-1]["diagnostics"]
    assert result["chance"]["image_to_text_R@1"] == pytest.approx(1 / 480)


@pytest.mark.slow
def test_export_holds_the_trained_fp32_weights(demo_shards, tmp_path):
    """The exported model equals the checkpoint's fp32 master weights (bf16 training, ZeRO-1)."""
    out = tmp_path / "run"
    proc = run_cli(
        [
            PY,
            "-m",
            "tessera.train.pretrain",
            *tiny_run_args(demo_shards, out, "train.steps=3", "deepspeed.zero_stage=1", "data.val=[]"),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ref = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step00000003")
    model = load_model(out / "model")
    state = model.state_dict()
    assert set(ref) <= set(state)
    for k, v in ref.items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], v.float()), k
    assert not (out / "eval").exists()


@pytest.mark.slow
def test_bf16_trains_fp32_temperatures_whose_steps_are_below_a_bf16_spacing(demo_shards, tmp_path):
    """bf16 is autocast over fp32 parameters: 3 steps at lr 1e-4 move the log-scale (2.66) by at most 3e-4, less
    than half the spacing of bf16 numbers there (2^-7), so a bf16 temperature would not have moved at all. The
    checkpoint's module (what forward reads) holds the temperature, and every weight, in fp32."""
    out = tmp_path / "run"
    args = ["train.steps=3", "train.lr=1e-4", "train.precision=bf16", "data.val=[]"]
    proc = run_cli([PY, "-m", "tessera.train.pretrain", *tiny_run_args(demo_shards, out, *args)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = load_model(out / "model").cfg.init_logit_scale
    module = torch.load(
        resolve(out / "checkpoints", "latest") / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["module"]
    assert {v.dtype for v in module.values() if v.is_floating_point()} == {torch.float32}
    trained = module["logit_scales.image__text"].item()
    assert 0 < abs(trained - init) < 2**-7
    assert torch.tensor(trained).bfloat16() == torch.tensor(init).bfloat16()  # what bf16 would have kept


@pytest.mark.slow
def test_siglip_pretraining_learns_its_bias_and_exports_it(demo_shards, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        [
            PY,
            "-m",
            "tessera.train.pretrain",
            *tiny_run_args(
                demo_shards,
                out,
                "train.steps=8",
                "train.log_every=1",
                "train.lr=0.003",
                "data.val=[]",
                "loss.kind=siglip",
                "loss.tile_size=6",
                "model.init_logit_bias=-10",
                "model.init_temperature=0.1",
                "train.precision=fp32",
            ),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert lines[0]["logit_bias/image-text"] == pytest.approx(-10.0, abs=0.05)
    assert lines[-1]["logit_bias/image-text"] != lines[0]["logit_bias/image-text"]
    assert lines[-1]["loss"] < lines[0]["loss"]
    model = load_model(out / "model")
    assert model.logit_biases["image__text"].item() == pytest.approx(lines[-1]["logit_bias/image-text"], abs=1e-3)


def test_label_positives_from_cls_members(tmp_path):
    """loss.positives=label: the pretraining task reads every sample's `cls` member into its batches, and samples
    sharing an id are positives for each other in its loss."""
    import io

    import numpy as np
    from PIL import Image

    from tessera.data.make_shards import write_shards
    from tessera.losses import contrastive_loss_reference
    from tessera.train.distributed.groups import DistInfo
    from tessera.train.recipes.load import load_config
    from tessera.train.recipes.tasks import make_task

    colours = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}
    rng = np.random.default_rng(0)

    def samples():  # each picture its own: same-class pictures differ, so labels change the loss
        for i in range(96):
            c = i % 4
            pixels = np.clip(np.array(list(colours.values())[c]) + rng.normal(0, 40, (32, 32, 3)), 0, 255)
            buf = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
            yield (
                f"{i:05d}",
                {
                    "png": buf.getvalue(),
                    "txt": f"a {list(colours)[c]} square number {i}".encode(),
                    "cls": str(c).encode(),
                },
            )

    write_shards(samples(), tmp_path / "shards", samples_per_shard=48)
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"model={json.dumps(TINY_MODEL)}",
            f"data.train={tmp_path}/shards/shard-{{000000..000001}}.tar",
            "data.num_workers=0",
            "train.batch_size=16",
            "loss.positives=label",
            "loss.tile_size=4",
            "train.precision=fp32",  # exact against the reference
        ],
    )
    task = make_task(cfg)
    torch.manual_seed(0)  # the same initial weights whatever ran before
    model = task.build_model()
    batch = next(task.data(model, DistInfo(0, 1, 0, torch.device("cpu"))).loader)
    assert batch["label"].tolist() == [int(key) % 4 for key in batch["__key__"]]
    assert len(set(batch["label"].tolist())) < len(batch["label"])  # shared ids: several positives per row
    losses, _ = task.objective(model, batch)
    out = model(batch)
    args = (out["features"]["image"], out["features"]["text"], out["logit_scale"]["image__text"])
    with_labels = contrastive_loss_reference(*args, labels=batch["label"])
    assert losses["loss"].item() == pytest.approx(with_labels.item(), rel=1e-5)
    # at initialisation the towers map pictures of one colour close together, so labels move the loss by about 2e-3
    # here; fp32 noise is about 1e-6
    assert abs(with_labels.item() - contrastive_loss_reference(*args).item()) > 1e-4


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_task_loss_is_the_reference_loss_of_the_model_features(kind):
    """ContrastiveObjective passes scale, bias, labels and options through: its loss is the reference's."""
    from tessera.config import from_dict
    from tessera.losses import contrastive_loss_reference
    from tessera.models import ModelConfig, build_model
    from tessera.train.components.objectives import ContrastiveObjective
    from tessera.train.recipes.config import LossConfig

    bias = -10.0 if kind == "siglip" else None
    model = build_model(from_dict(ModelConfig, {**TINY_MODEL, "init_logit_bias": bias}, "model"))
    torch.manual_seed(0)
    batch = {
        "image": torch.randn(10, 3, 32, 32),
        "text": torch.randint(1, 400, (10, 16)),
        "label": torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 4, 0]),
    }
    options = {"dcl": True} if kind == "infonce" else {}
    task = ContrastiveObjective(model.pairs, LossConfig(kind=kind, tile_size=3, positives="label", **options))
    losses, report = task(model, batch)
    out = model(batch)
    want = contrastive_loss_reference(
        out["features"]["image"],
        out["features"]["text"],
        out["logit_scale"]["image__text"],
        out.get("logit_bias", {}).get("image__text"),
        kind=kind,
        labels=batch["label"],
        **options,
    )
    assert losses["loss/image-text"].item() == pytest.approx(want.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="no `cls` labels"):
        task(model, {k: v for k, v in batch.items() if k != "label"})


def test_incomplete_checkpoints_are_never_resumed(tmp_path, caplog):
    from tessera.config import ConfigError

    ckpt = tmp_path / "checkpoints"
    (ckpt / "step00000004").mkdir(parents=True)
    (ckpt / "step00000004" / "COMPLETE").write_text("1\n")
    (ckpt / "step00000008").mkdir()  # a save that crashed: no COMPLETE, and latest was not moved
    (ckpt / "latest").write_text("step00000004")
    assert resolve(ckpt, "latest") == ckpt / "step00000004"
    with pytest.raises(ConfigError, match="incomplete"):
        resolve(ckpt, "step00000008")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(ckpt, "step00000012")
    # a 0-byte COMPLETE (a crash before its data reached the disk) does not make a checkpoint complete; latest
    # naming it falls back to the newest complete one, with a warning
    (ckpt / "step00000008" / "COMPLETE").write_text("")
    (ckpt / "latest").write_text("step00000008")
    with caplog.at_level("WARNING"):
        assert resolve(ckpt, "latest") == ckpt / "step00000004"
    assert "newest complete" in caplog.text
    with pytest.raises(ConfigError, match="incomplete"):
        resolve(ckpt, "step00000008")
    shutil.rmtree(ckpt / "step00000004")
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve(ckpt, "latest")
    shutil.rmtree(ckpt)
    assert resolve(ckpt, "latest") is None  # resume=latest on a fresh run starts from step 0


@pytest.mark.slow
def test_tessera_console_script(demo_shards, tmp_path):
    tessera = Path(PY).parent / "tessera"
    assert tessera.is_file(), "the tessera console script is installed with the package"
    proc = run_cli([str(tessera), "pretrain", "--help"])
    assert proc.returncode == 0 and "train.steps" in proc.stdout
    proc = run_cli([str(tessera), "eval"])
    assert proc.returncode == 2 and "retrieval" in proc.stderr
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(img)
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "text": "red"}) + "\n")
    proc = run_cli([str(tessera), "make-shards", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "s")])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s" / "shard-000000.tar").is_file()


@pytest.mark.slow
def test_bad_data_stops_the_cli_with_a_clear_error(tmp_path, demo_shards):
    from tessera.data.make_shards import write_shards

    write_shards(((f"k{i}", {"jpg": b"broken", "txt": b"x"}) for i in range(50)), tmp_path / "bad", "bad")
    proc = run_cli(
        [
            PY,
            "-m",
            "tessera.train.pretrain",
            *tiny_run_args(
                demo_shards,
                tmp_path / "run",
                "train.steps=2",
                f"data.train={tmp_path}/bad/bad-000000.tar",
                "data.bad_check_after=20",
            ),
        ]
    )
    assert proc.returncode != 0
    assert "max_bad_fraction" in proc.stderr and "undecodable_image=" in proc.stderr
    assert f"by shard: {tmp_path}/bad/bad-000000.tar (" in proc.stderr
    assert f"e.g. {tmp_path}/bad/bad-000000.tar:k" in proc.stderr


@pytest.mark.slow
def test_lit_locking_zero3_accumulation_and_checkpointing(demo_shards, tmp_path):
    """ZeRO-3 + a locked image tower (LiT) + gradient accumulation + gradient checkpointing, exported."""
    out = tmp_path / "run"
    proc = run_cli(
        [
            PY,
            "-m",
            "tessera.train.pretrain",
            *tiny_run_args(
                demo_shards,
                out,
                "train.steps=3",
                "deepspeed.zero_stage=3",
                "train.lock=[image]",
                "train.grad_accum=2",
                "train.grad_checkpointing=true",
                "train.precision=fp32",
                "seed=5",
            ),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "eval" / "retrieval.json").read_text())["n"] == {"image-text": 480}  # eval under ZeRO-3
    from tessera.config import from_dict
    from tessera.models import ModelConfig, build_model
    from tessera.train.loop import _seed

    _seed(5)  # the run's initial weights
    initial = build_model(from_dict(ModelConfig, TINY_MODEL, "model")).state_dict()
    trained = load_model(out / "model").state_dict()
    for k, v in initial.items():
        if k.startswith("towers.image."):
            assert torch.equal(trained[k], v), f"locked {k} changed"
    changed = [k for k in initial if k.startswith("towers.text.") and not torch.equal(trained[k], initial[k])]
    assert len(changed) > 5
    assert not torch.equal(trained["logit_scales.image__text"], initial["logit_scales.image__text"])
