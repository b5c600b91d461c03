"""The two-pass step (train.chunk_size): its optimizer step equals the one-graph step over the same chunks, for every
parameter's gradient, with dropout, patch dropout, stochastic depth and batch norm, for every loss option, joint
batches and locked towers; and it runs through DeepSpeed as one optimizer step."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch

from tessera.config import from_dict
from tessera.data import Chunks
from tessera.models import ModelConfig, build_model
from tessera.train.components.objectives import ContrastiveObjective
from tessera.train.components.precision import LossScale
from tessera.train.components.steps import TwoPassStep
from tessera.train.recipes.config import LossConfig

from .conftest import PY, ROOT, TINY_MODEL, run_cli

B, CHUNK = 12, 4
# dropout everywhere a tower has it: patch dropout and head dropout (image), stochastic depth (audio)
DROPOUT_IMAGE = {
    **TINY_MODEL["towers"]["image"],
    "overrides": {**TINY_MODEL["towers"]["image"]["overrides"], "patch_dropout": 0.4},
    "head": {"kind": "mlp", "dropout": 0.3},
}
BATCHNORM_IMAGE = {
    "encoder": "open_clip_image",
    "model": "RN50",
    "overrides": {"layers": [1, 1, 1, 1], "width": 8, "image_size": 32, "head_width": 16},
}
AUDIO = {
    "encoder": "ast",
    "audio": {"sample_rate": 8000, "clip_seconds": 0.5, "n_mels": 32},
    "width": 32,
    "depth": 2,
    "heads": 2,
    "drop_path_rate": 0.5,
}
TEXT = TINY_MODEL["towers"]["text"]


class PlainEngine:
    """What a step uses of DeepSpeed's engine, over a plain module: forward, backward (gradients accumulate), step."""

    def __init__(self, model):
        self.model, self.steps = model, 0
        self.device = torch.device("cpu")

    def __call__(self, batch):
        return self.model(batch)

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        self.steps += 1


def _model(towers: dict, **cfg):
    torch.manual_seed(0)
    return build_model(from_dict(ModelConfig, {"embed_dim": 24, "towers": towers, **cfg}, "model")).train()


def _batch(model, n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    batch = {"__key__": [f"k{i}" for i in range(n)], "label": torch.randint(0, 3, (n,), generator=g)}
    for m, tower in model.towers.items():
        if m == "text":
            batch[m] = torch.randint(1, 400, (n, 16), generator=g)
        elif m == "image":
            batch[m] = torch.randn(n, 3, 32, 32, generator=g)
        else:
            batch[m] = torch.randn(n, *tower.input_size, generator=g) * 10 - 20
    return batch


def _chunks(model, batch):
    return [
        {
            k: (model.towers[k].split(v, s, s + CHUNK) if k in model.towers else v[s : s + CHUNK])
            for k, v in batch.items()
        }
        for s in range(0, len(batch["__key__"]), CHUNK)
    ]


def _one_graph(model, batch, objective):
    """The reference: every chunk through the model in one autograd graph, one loss over all features, one
    backward."""
    outs = [model(c) for c in _chunks(model, batch)]
    out = {
        "features": {m: torch.cat([o["features"][m] for o in outs]) for m in outs[0]["features"]},
        "logit_scale": outs[0]["logit_scale"],
    }
    if "logit_bias" in outs[0]:
        out["logit_bias"] = outs[0]["logit_bias"]
    losses, _ = objective.loss(out, batch)
    losses["loss"].backward()
    return losses


def _compare(model, batch, loss_cfg: LossConfig, lock=(), as_chunks=False):
    """The two-pass step against the one-graph reference; `as_chunks`: the step gets the batch as the chunked
    loader hands it out (its `Chunks`) rather than collated whole."""
    reference, chunked = model, copy.deepcopy(model)
    for m in lock:
        reference.towers[m].requires_grad_(False)
        chunked.towers[m].requires_grad_(False)
    return _check(reference, chunked, batch, loss_cfg, as_chunks)


def _check(reference, chunked, batch, loss_cfg: LossConfig, as_chunks=False, loss_scale: float | None = None):
    """The two-pass step of `chunked` against the one-graph step of `reference` (a copy of it), from zero gradients;
    `loss_scale`: the two-pass step backpropagates under one (fp16's), the reference without."""
    model = reference
    for p in (*reference.parameters(), *chunked.parameters()):
        p.grad = None
    objective = ContrastiveObjective(model.pairs, loss_cfg)
    torch.manual_seed(7)
    want = _one_graph(reference, batch, objective)
    rng_after_reference = torch.get_rng_state()
    torch.manual_seed(7)
    engine = PlainEngine(chunked)
    given = Chunks(_chunks(model, batch)) if as_chunks else batch
    scaled = LossScale(chunked, init=loss_scale) if loss_scale else None
    got, report = TwoPassStep(objective, chunked, CHUNK, grad_accum=1, loss_scale=scaled)(engine, given)
    assert engine.steps == B // CHUNK and torch.equal(torch.get_rng_state(), rng_after_reference)
    assert got["loss"].item() == pytest.approx(want["loss"].item(), rel=1e-6)
    params = dict(chunked.named_parameters())
    for name, p in reference.named_parameters():
        if not p.requires_grad:
            assert params[name].grad is None, name
            continue
        assert p.grad is not None and params[name].grad is not None, name
        # fp32 rounding of sums whose order differs (chunks, and the CPU's kernels: AVX2 and AVX512 differ) is
        # relative to the tensor's scale, not to each element: a small entry of a large gradient may be off by 1e-6
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(params[name].grad, p.grad, rtol=1e-5, atol=max(1e-7, 1e-6 * scale), msg=name)
    buffers = dict(chunked.named_buffers())
    for name, buf in reference.named_buffers():  # batch-norm statistics: updated once per chunk, as the reference
        torch.testing.assert_close(buffers[name], buf, rtol=1e-6, atol=1e-7, msg=name)
    return report


@pytest.mark.parametrize(
    "loss",
    [
        LossConfig(tile_size=5),
        LossConfig(tile_size=5, dcl=True),
        LossConfig(tile_size=5, positives="label"),
        LossConfig(tile_size=5, label_smoothing=0.1),
    ],
    ids=["infonce", "dcl", "label-positives", "label-smoothing"],
)
def test_equals_the_one_graph_step_with_dropout(loss):
    model = _model({"image": DROPOUT_IMAGE, "text": TEXT})
    _compare(model, _batch(model), loss, as_chunks=loss.positives == "label")


def test_under_a_loss_scale_the_weights_get_the_unscaled_gradients():
    """fp16's loss scale (2^12; in fp32 here, so the comparison stays tight): the loss's backward carries it into the
    cached feature gradients, the second pass into the weights, whose hooks take it back out once."""
    model = _model({"image": DROPOUT_IMAGE, "text": TEXT})
    _check(model, copy.deepcopy(model), _batch(model), LossConfig(tile_size=5), loss_scale=2.0**12)


@pytest.mark.slow
def test_compiled_towers_with_dropout_equal_the_one_graph_step():
    """train.compile with the two-pass step and dropout in the towers (patch dropout) and heads: each of two steps
    equals the one-graph step of the same compiled towers (against eager towers the fp32 sums differ in order, past
    this test's tolerance). The second step would replay the first step's random states if a hook traced into a
    compiled tower were kept from the first."""
    from tessera.train.components.compiled import compile_towers

    # compile_towers sets these process-wide: put them back by assignment (torch's config modules hide an option
    # that is deleted, which is how pytest's monkeypatch undoes some of its patches)
    inductor, dynamo = importlib.import_module("torch._inductor.config"), torch._dynamo.config
    saved = inductor.fallback_random, dynamo.recompile_limit
    model = _model({"image": DROPOUT_IMAGE, "text": TEXT})
    chunked = copy.deepcopy(model)
    try:
        for m in (model, chunked):
            compile_towers(m, 8, replayed=True)
        for seed in (1, 2):
            _check(model, chunked, _batch(model, seed=seed), LossConfig(tile_size=5))
    finally:
        inductor.fallback_random, dynamo.recompile_limit = saved
        torch._dynamo.reset()


def test_images_held_as_uint8_give_the_float_transform_s_embeddings():
    """The compact transform keeps images as uint8 (a quarter of float32); the tower normalises them on the device
    to the numbers the float transform makes: the same embeddings in fp32, and in bf16 the same bf16 inputs."""
    from PIL import Image

    model = _model({"image": DROPOUT_IMAGE, "text": TEXT}).eval()
    tower = model.towers["image"]
    g = torch.Generator().manual_seed(0)
    pictures = [
        Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(3)
    ]
    compact, full = tower.compact_transform(False), tower.transform(False)
    held = torch.stack([compact(p) for p in pictures])
    floats = torch.stack([full(p) for p in pictures])
    assert held.dtype == torch.uint8 and held.shape == floats.shape == (3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(held), tower(floats), rtol=0, atol=0)
        tower.to(torch.bfloat16)
        torch.testing.assert_close(tower(held), tower(floats.to(torch.bfloat16)), rtol=0, atol=0)
    assert model.transforms(True, compact=True)["image"].transforms[-1].__class__.__name__ == "ToUint8"


@pytest.mark.parametrize("chunks", [[], ["train.chunk_size=4"]])
def test_training_loaders_carry_images_as_uint8_on_every_step(demo_shards, tmp_path, chunks):
    """The one-graph step's batches as the two-pass step's: images cross the loader as uint8."""
    from tessera.data import train_loader
    from tessera.train.recipes.load import load_config
    from tessera.train.recipes.tasks import make_task

    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            f"model={json.dumps(TINY_MODEL)}",
            f"data.train={demo_shards}/train-txt-000000.tar",
            "data.num_workers=0",
            *chunks,
        ],
    )
    task = make_task(cfg)
    model = task.build_model()
    transforms, collators, keys = task.pipelines(model)
    batch = next(train_loader(cfg.data, transforms, collators, keys, 4))
    images = batch[0]["image"] if isinstance(batch, list) else batch["image"]
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)


def test_siglip_with_its_bias():
    model = _model({"image": DROPOUT_IMAGE, "text": TEXT}, init_temperature=0.1, init_logit_bias=-10.0)
    report = _compare(model, _batch(model), LossConfig(kind="siglip", tile_size=5))
    assert "logit_bias/image-text" in report


def test_batch_norm_statistics_are_updated_once_per_chunk():
    model = _model({"image": BATCHNORM_IMAGE, "text": TEXT})
    before = {n: b.clone() for n, b in model.named_buffers() if "running_mean" in n}
    _compare(model, _batch(model), LossConfig(tile_size=5))
    assert any(not torch.equal(b, before[n]) for n, b in model.named_buffers() if n in before)


def test_joint_batch_with_stochastic_depth_and_a_locked_tower():
    model = _model({"image": BATCHNORM_IMAGE, "text": TEXT, "audio": AUDIO}, pairing="all_pairs")
    _compare(model, _batch(model), LossConfig(tile_size=5))
    # a locked tower (LiT) is run once, in the first pass
    model = _model({"image": DROPOUT_IMAGE, "text": TEXT})
    calls = []
    chunked = copy.deepcopy(model)
    chunked.towers["image"].requires_grad_(False)
    chunked.towers["image"].register_forward_hook(lambda *_: calls.append(1))
    TwoPassStep(ContrastiveObjective(model.pairs, LossConfig()), chunked, CHUNK, 1)(PlainEngine(chunked), _batch(model))
    assert len(calls) == B // CHUNK
    _compare(model, _batch(model), LossConfig(tile_size=5), lock=["image"])
    # a locked batch-norm tower updates its statistics once per chunk too
    model = _model({"image": BATCHNORM_IMAGE, "text": TEXT})
    before = {n: b.clone() for n, b in model.towers["image"].named_buffers() if "running_mean" in n}
    _compare(model, _batch(model), LossConfig(tile_size=5), lock=["image"])
    assert any(not torch.equal(b, before[n]) for n, b in model.towers["image"].named_buffers() if n in before)


def test_gradient_checkpointing():
    model = _model({"image": DROPOUT_IMAGE, "text": TEXT})
    model.set_grad_checkpointing(True)
    _compare(model, _batch(model), LossConfig(tile_size=5))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_run_with_chunks_equals_the_unchunked_run(demo_shards, tmp_path, in_process_training, stage):
    """Through the loop, the chunked loader (uint8 images) and a DeepSpeed engine (ZeRO-1/2/3, fp32, 2 micro-batches
    of accumulation), a deterministic model trained in chunks of 4 ends where the same run without chunks ends: the
    chunks form one optimizer step."""
    from tessera.models import load_model
    from tessera.train.loop import train
    from tessera.train.recipes.load import load_config
    from tessera.train.recipes.tasks import make_task

    def run(name, *extra):
        cfg = load_config(
            None,
            [
                f"output_dir={tmp_path / name}",
                f"model={json.dumps({**TINY_MODEL, 'embed_dim': 32})}",
                f"data.train={demo_shards}/train-txt-{{000000..000003}}.tar",
                "data.num_workers=0",
                "data.val=[]",
                "train.steps=3",
                "train.batch_size=16",
                "train.grad_accum=2",
                "train.precision=fp32",
                "train.log_every=1",
                "train.ckpt_every=-1",
                "train.warmup_steps=1",
                f"deepspeed.zero_stage={stage}",
                "model.towers.image.augmentation={scale: [1.0, 1.0], ratio: [1.0, 1.0]}",
                *extra,
            ],
        )
        summary = train(make_task(cfg))
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return summary, lines, load_model(tmp_path / name / "model")

    _, plain_lines, plain = run("plain")
    _, chunk_lines, chunked = run("chunked", "train.chunk_size=4")
    assert [x["loss"] for x in chunk_lines] == pytest.approx([x["loss"] for x in plain_lines], rel=1e-5)
    assert [x["samples_per_s"] > 0 for x in chunk_lines] == [True] * 3
    for (name, a), (_, b) in zip(plain.state_dict().items(), chunked.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_through_the_ring_chunked_equal_unchunked_and_resume_exactly(demo_shards, tmp_path):
    """2 gloo ranks, ZeRO-2, the tiled ring loss over 2 x 16 rows in chunks of 4: the same losses, gradient norms and
    weights as without chunks; a run resumed from its step-2 checkpoint continues exactly."""
    import shutil

    from safetensors.torch import load_file

    from .test_distributed import _train_losses, torchrun
    from .test_train import tiny_run_args

    common = [
        "deepspeed.zero_stage=2",
        "train.precision=fp32",
        "train.steps=4",
        "train.log_every=1",
        "train.ckpt_every=2",
        "data.val=[]",
        "data.num_workers=1",
        "loss.tile_size=5",
    ]
    runs = {}
    for name, extra in (("plain", []), ("chunked", ["train.chunk_size=4"])):
        proc = torchrun(*tiny_run_args(demo_shards, tmp_path / name, *common, *extra))
        assert proc.returncode == 0, proc.stderr[-4000:]
        # ZeRO-2 reduce-scatters at each chunk's backward pass: said, with the way out (ZeRO-1)
        said = "after each of the step's 4 chunk backward passes, 4x the communication" in proc.stderr
        assert said == (name == "chunked") and (not said or "deepspeed.zero_stage=1" in proc.stderr)
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [x for x in lines if x["kind"] == "train"]
    for a, b in zip(runs["plain"], runs["chunked"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=1e-4
        )
    plain, chunked = (
        load_file(str(tmp_path / n / "model" / "tessera_model.safetensors")) for n in ("plain", "chunked")
    )
    for k in plain:
        torch.testing.assert_close(chunked[k], plain[k], rtol=0, atol=1e-5, msg=k)

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "chunked" / "checkpoints" / "step00000002", resumed / "checkpoints" / "step00000002")
    (resumed / "checkpoints" / "latest").write_text("step00000002")
    proc = torchrun(*tiny_run_args(demo_shards, resumed, *common, "train.chunk_size=4", "resume=latest"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _train_losses(resumed) == _train_losses(tmp_path / "chunked")[2:]
    final = load_file(str(resumed / "model" / "tessera_model.safetensors"))
    assert all(torch.equal(final[k], chunked[k]) for k in chunked)


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [0, 1])
def test_two_ranks_reduce_gradients_once_per_step_at_zero_0_and_1(demo_shards, tmp_path, stage):
    """2 gloo ranks in bf16, 3 steps of 2 micro-batches of 16 samples per rank, in chunks of 4: every chunk's
    backward runs through DeepSpeed (3 x 2 x 4 = 24 per rank), but gradients cross ranks only at the step's
    boundary: 3 reductions, 3 optimizer steps. The reductions carry fp32 gradients (DeepSpeed's own bf16 mode
    sends bf16 ones at stage 0)."""
    from .test_distributed import torchrun
    from .test_train import tiny_run_args

    counts = tmp_path / "counts"
    args = tiny_run_args(
        demo_shards,
        tmp_path / "run",
        f"deepspeed.zero_stage={stage}",
        "train.precision=bf16",
        "train.steps=3",
        "train.grad_accum=2",
        "train.chunk_size=4",
        "train.ckpt_every=-1",
        "train.export=false",
        "data.val=[]",
    )
    proc = torchrun(str(counts), *args, target=(str(ROOT / "tests" / "count_reductions.py"),))
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        got = json.loads((counts / f"rank{rank}.json").read_text())
        assert got == {"backward": 24, "reductions": 3, "optimizer_steps": 3, "reduced": ["torch.float32"]}, (rank, got)


def test_chunk_size_config_errors(tmp_path):
    from tessera.config import ConfigError
    from tessera.models import save_model
    from tessera.train.recipes.load import load_config
    from tessera.train.recipes.runs import FinetuneConfig

    with pytest.raises(ConfigError, match=r"batch_size \(16\) must be a multiple of train.chunk_size \(5\)"):
        load_config(None, ["train.batch_size=16", "train.chunk_size=5"])
    save_model(_model({"image": DROPOUT_IMAGE, "text": TEXT}), tmp_path / "base")
    classes = tmp_path / "classes.json"
    classes.write_text('{"classnames": ["a", "b"]}')
    with pytest.raises(ConfigError, match="task=fewshot trains its few shots in one graph"):
        load_config(
            None,
            [
                f"base={tmp_path / 'base'}",
                "task=fewshot",
                f"fewshot.classes={classes}",
                "train.batch_size=8",
                "train.chunk_size=4",
            ],
            FinetuneConfig,
        )
    cfg = load_config(None, ["train.batch_size=65536", "train.chunk_size=256", "deepspeed.zero_stage=3"])
    assert (cfg.train.batch_size, cfg.train.chunk_size) == (65536, 256)


@pytest.mark.parametrize("adapter", ["lora", "prompt"])
def test_adapters_train_the_same_in_chunks(adapter):
    """LoRA on both towers, and VPT tokens in the ViT: the two-pass gradients of what trains are the one-graph ones."""
    from tessera.models.lora import LoraConfig, apply_lora
    from tessera.models.prompts import PromptConfig, apply_prompts

    model = _model({"image": DROPOUT_IMAGE, "text": TEXT})
    batch = _batch(model)
    if adapter == "lora":
        tuned = apply_lora(model, LoraConfig(rank=4, train_heads=True)).train()
        with torch.no_grad():  # LoRA's B starts at zero; give it values, as training would
            for name, p in tuned.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    else:
        tuned = apply_prompts(model, PromptConfig(context=0, visual_tokens=3)).train()
    _compare(tuned, batch, LossConfig(tile_size=5))


@pytest.mark.slow
def test_memory_holds_one_chunk_of_activations_whatever_the_batch():
    """At a fixed chunk, four times the batch adds only its features and their gradients (O(B·D)); one graph over
    the smaller batch needs several times the chunked step's memory."""

    def peak(batch_size, chunk):
        proc = run_cli(
            [PY, str(ROOT / "tests" / "peak_memory_step.py"), str(batch_size), str(chunk)],
            env={"OMP_NUM_THREADS": "1"},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rise_bytes"]

    # measured: 62.5 MB (128 in chunks of 16), 63.7 MB (512 in chunks of 16), 360 MB (128 in one graph)
    small, large, one_graph = peak(128, 16), peak(512, 16), peak(128, 0)
    # per added sample: its features of two towers (D = 64, fp32) as outputs, the loss's leaves and their
    # gradients: about 2 KB; allowed 8 KB, plus 8 MiB for allocator granularity
    assert large - small < 384 * 8 * 1024 + 8 * 2**20, (small, large)
    assert one_graph > 4 * small, (one_graph, small)
