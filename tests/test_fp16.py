"""train.precision=fp16 is mixed precision, as open_clip's `amp`: the towers compute in fp16 under autocast over fp32
weights (temperatures and biases included), with a dynamic loss scale whose overflows skip steps without stopping
the run or advancing the schedule, and which a resumed run continues from. On CPU, as torch runs fp16 there."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tessera.train.components.precision import LossScale

from .conftest import TINY_MODEL

RUN = [
    "data.num_workers=0",
    "data.val=[]",
    "train.batch_size=16",
    "train.log_every=1",
    "train.warmup_steps=1",
    "model.towers.image.augmentation={scale: [1.0, 1.0], ratio: [1.0, 1.0]}",
]


def _train(demo_shards, out, *extra, scale: float | None = None) -> list[dict]:
    """Train in this process; `scale`: the loss scale to start from (else LossScale's default). Returns the
    metrics' train lines."""
    from tessera.train.loop import train
    from tessera.train.recipes.load import load_config
    from tessera.train.recipes.tasks import make_task

    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            f"model={json.dumps({**TINY_MODEL, 'embed_dim': 32})}",
            f"data.train={demo_shards}/train-txt-{{000000..000003}}.tar",
            *RUN,
            *extra,
        ],
    )
    task = make_task(cfg)
    if scale is not None:
        build = task.build_model

        def build_model():
            model = build()
            task.step.loss_scale.close()
            task.step.loss_scale = LossScale(model, init=scale)
            return model

        task.build_model = build_model
    train(task)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


def test_the_loss_scale_is_exact_and_follows_grad_scaler_s_rule():
    """Gradients arrive divided by the scale, bit for bit (a power of two); an overflow halves it, `interval` applied
    steps in a row double it, and its state round-trips."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    x = torch.randn(16, 8)
    model(x).square().mean().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    scale = LossScale(model, init=2.0**10, interval=3)
    scale.scaled(model(x).square().mean()).backward()
    assert all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), want))
    seen = []
    for found in (1, 0, 0, 0, 0, 1):
        scale.update(torch.tensor(found))
        seen.append(float(scale.scale))
    assert seen == [2.0**9, 2.0**9, 2.0**9, 2.0**10, 2.0**10, 2.0**9]
    again = LossScale(torch.nn.Linear(2, 2))
    again.load_state_dict(scale.state_dict())
    assert again.state_dict() == scale.state_dict() == {"scale": 2.0**9, "good_steps": 0}
    assert float(again.inverse) == 2.0**-9
    scale.close()
    model.zero_grad()
    model(x).square().mean().backward()  # the hooks are gone
    assert all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), want))


@pytest.mark.slow
def test_fp16_trains_fp32_weights_and_temperatures_whose_steps_are_below_an_fp16_spacing(
    demo_shards, tmp_path, in_process_training
):
    """3 steps at lr 1e-4 move the log-scale (2.66) by about 3e-4, less than half the spacing of fp16 numbers there
    (2^-9), and the forward reads the result as it is: the checkpoint's module (what forward reads) holds every
    weight in fp32, the temperature at a value fp16 cannot hold; the towers compute in fp16, the scales in fp32."""
    from tessera.models import load_model
    from tessera.train.components.resume import resolve

    out = tmp_path / "run"
    # from a scale no step overflows at (on any CPU kind): all 3 steps move the weights
    _train(
        demo_shards, out, "train.steps=3", "train.lr=1e-4", "train.precision=fp16", "train.ckpt_every=3", scale=2.0**10
    )
    module = torch.load(
        resolve(out / "checkpoints", "latest") / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["module"]
    assert {v.dtype for v in module.values() if v.is_floating_point()} == {torch.float32}
    model = load_model(out / "model")
    init = model.cfg.init_logit_scale
    trained = module["logit_scales.image__text"].item()
    assert 0 < abs(trained - init) < 2**-10
    assert torch.tensor(trained).half().item() != trained
    model.autocast_dtype = torch.float16
    with torch.no_grad():
        out_ = model({"text": torch.randint(1, 400, (2, 16))})
    assert out_["features"]["text"].dtype == torch.float16 and out_["logit_scale"]["image__text"].dtype == torch.float32


@pytest.mark.slow
def test_fp16_follows_fp32_with_the_true_gradient_norm_at_zero_1(demo_shards, tmp_path, in_process_training):
    """At ZeRO-1 (DeepSpeed's own norm and clipping), an fp16 run at a loss scale of 2^10 has the fp32 run's gradient
    norms and losses to fp16's precision: DeepSpeed reduces and clips the true gradients, not the scaled ones."""
    common = ["train.steps=4", "deepspeed.zero_stage=1", "train.ckpt_every=-1"]
    fp32 = _train(demo_shards, tmp_path / "fp32", *common, "train.precision=fp32")
    fp16 = _train(demo_shards, tmp_path / "fp16", *common, "train.precision=fp16", scale=2.0**10)
    assert [x["loss_scale"] for x in fp16] == [2.0**10] * 4 and fp16[-1]["overflow_steps"] == 0
    for a, b in zip(fp32, fp16, strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert b["lr"] == a["lr"]


@pytest.mark.slow
@pytest.mark.parametrize("chunks", [[], ["train.chunk_size=8"]], ids=["one-graph", "two-pass"])
def test_overflows_halve_the_scale_skip_their_steps_and_a_resume_continues_from_the_scale(
    demo_shards, tmp_path, in_process_training, chunks
):
    """From a scale of 2^24 the first steps overflow fp16: each is skipped (no update, the schedule held) and halves
    the scale, and more of them than train.max_nonfinite_steps (5) in a row do not stop the run, nor count as
    non-finite steps (the two-pass step's cached feature gradients overflow too: a gradient, not a loss, that is
    not finite). A run resumed from the step-4 checkpoint continues from the scale it had reached: its losses and
    weights equal the uninterrupted run's."""
    from safetensors.torch import load_file

    common = ["train.steps=12", "train.precision=fp16", "train.ckpt_every=4", "train.keep_ckpts=5", *chunks]
    lines = _train(demo_shards, tmp_path / "run", *common, scale=2.0**24)
    skipped = [x for x in lines if x["overflow_steps"] == x["step"]]
    assert len(skipped) > 5 and all(x["nonfinite_steps"] == 0 for x in lines)
    assert [x["loss_scale"] for x in skipped] == [2.0 ** (23 - i) for i in range(len(skipped))]
    n = len(skipped)
    assert all(x["lr"] == lines[0]["lr"] for x in lines[: n + 1])  # the schedule waits for the first applied step
    assert all(x["loss"] == x["loss"] for x in lines[n:])  # finite from there on
    assert lines[-1]["loss_scale"] == skipped[-1]["loss_scale"] and lines[-1]["overflow_steps"] == n

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step00000004", resumed / "checkpoints" / "step00000004")
    (resumed / "checkpoints" / "latest").write_text("step00000004")
    again = _train(demo_shards, resumed, *common, "resume=latest", scale=2.0**24)
    kept = ("step", "loss", "loss/image-text", "temperature/image-text", "lr", "loss_scale", "overflow_steps")

    def same(x):  # a skipped step logs a NaN loss (no applied step to average), which is not equal to itself
        return {k: (None if x[k] != x[k] else x[k]) for k in kept if k in x}

    assert [same(x) for x in again] == [same(x) for x in lines[4:]]
    final, want = (load_file(str(d / "model" / "tessera_model.safetensors")) for d in (resumed, tmp_path / "run"))
    assert all(torch.equal(final[k], want[k]) for k in want)


def test_a_checkpoint_of_deepspeed_s_own_fp16_mode_is_refused_with_a_clear_error(tmp_path):
    """Before fp16 was autocast over fp32 weights, DeepSpeed's fp16 mode wrote half weights and its own optimizer
    state; an engine without that mode cannot take them over (a KeyError at ZeRO-0, a loss scaled twice at ZeRO 1-3),
    so the resume stops first, with what to do. DeepSpeed's model states record the config it ran with."""
    from tessera.config import ConfigError
    from tessera.train.components.checkpoint import load
    from tessera.train.distributed.groups import DistInfo

    tag = tmp_path / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text("1")
    torch.save({"step": 4, "rng": None, "loader": {}}, tag / "tessera_rank0.pt")
    torch.save({"module": {}, "ds_config": {"fp16": {"enabled": True}}}, tag / "mp_rank_00_model_states.pt")

    class Engine:  # what load asks of the engine before DeepSpeed's own load
        def fp16_enabled(self):
            return False

        def load_checkpoint(self, *args, **kwargs):
            raise AssertionError("DeepSpeed's load was reached")

    with pytest.raises(ConfigError, match="saved under DeepSpeed's own fp16 mode"):
        load(Engine(), tag, DistInfo(0, 1, 0, torch.device("cpu")))
    torch.save({"module": {}, "ds_config": {"fp16": {"enabled": False}}}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(AssertionError, match="DeepSpeed's load was reached"):  # an fp32-mode checkpoint goes on
        load(Engine(), tag, DistInfo(0, 1, 0, torch.device("cpu")))
