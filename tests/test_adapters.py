"""LoRA adapters on any tower (peft): what trains, save -> load round trips, merging, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tessera.config import from_dict
from tessera.models import ConfigError, ModelConfig, build_model, load_model, save_model
from tessera.models.adapters import load_adapter, merge_adapter, parameter_counts, save_adapter
from tessera.models.lora import LoraConfig, apply_lora, lora_targets
from tessera.train.recipes.load import merge_overrides

from .conftest import SEED, TINY_MODEL, learned, loss_fall
from .test_joint import JOINT_MODEL

BATCH = {"image": torch.randn(3, 3, 32, 32), "text": torch.randint(1, 400, (3, 16))}
RESNET_MODEL = {
    "embed_dim": 32,
    "towers": {
        "image": {
            "encoder": "open_clip_image",
            "model": "RN50",
            "overrides": {"layers": [1, 1, 1, 1], "width": 8, "image_size": 32, "head_width": 16},
        },
        "text": TINY_MODEL["towers"]["text"],
    },
}


def _base(cfg=TINY_MODEL, seed=0):
    torch.manual_seed(seed)
    return build_model(from_dict(ModelConfig, cfg, "model")).eval()


def _randomize_lora(tuned, seed=1):
    """LoRA's B starts at zero (the adapter is a no-op); give every adapter weight a value, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _expected_lora_params(model, names, rank):
    total = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.MultiheadAttention):  # in_proj (E -> 3E) and out_proj (E -> E)
            e = module.embed_dim
            total += rank * (e + 3 * e) + rank * (e + e)
        elif isinstance(module, nn.Conv2d):  # A: in -> r with the conv's kernel; B: 1x1, r -> out
            total += (
                rank * module.in_channels * module.kernel_size[0] * module.kernel_size[1] + rank * module.out_channels
            )
        else:
            total += rank * (module.in_features + module.out_features)
    return total


@pytest.mark.parametrize("towers", [None, ["text"], ["image"]])
def test_only_the_adapter_trains_and_its_size_is_exact(towers):
    base = _base()
    frozen_total = parameter_counts(base)["total"]
    cfg = LoraConfig(towers=towers, rank=4)
    names = lora_targets(base, cfg)
    assert names and all(n.split(".")[1] in (towers or ["image", "text"]) for n in names)
    expected = _expected_lora_params(base, names, 4)
    tuned = apply_lora(base, cfg)
    counts = parameter_counts(tuned)
    assert counts == {"trainable": expected, "total": frozen_total + expected}
    assert all("lora_" in n for n, p in tuned.named_parameters() if p.requires_grad)


def test_heads_and_temperatures_can_train_too():
    cfg = {
        **TINY_MODEL,
        "towers": {**TINY_MODEL["towers"], "text": {**TINY_MODEL["towers"]["text"], "head": {"kind": "linear"}}},
    }
    base = _base(cfg)
    tuned = apply_lora(base, LoraConfig(towers=["text"], rank=2, train_heads=True, train_temperatures=True))
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert any("heads.text" in n and "modules_to_save" in n for n in trainable)
    assert any(n.endswith("logit_scales.image__text") for n in trainable)
    assert not any("heads.image" in n for n in trainable)


def test_base_weights_do_not_change_when_the_adapter_trains():
    base = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = apply_lora(base, LoraConfig(rank=4))
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned.train()
    for _ in range(3):
        feats = tuned(BATCH)["features"]
        loss = -(feats["image"] * feats["text"]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    merged_state = tuned.get_base_model().state_dict()
    changed = [
        k for k in before if "lora_" not in k and k in merged_state and not torch.equal(before[k], merged_state[k])
    ]
    assert changed == []
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in tuned.named_parameters() if "lora_B" in n)


def test_save_load_round_trip_gives_identical_embeddings_and_merging_needs_no_peft(tmp_path):
    base = _base()
    save_model(base, tmp_path / "base")
    tuned = apply_lora(base, LoraConfig(rank=4))
    _randomize_lora(tuned)
    tuned.eval()
    with torch.no_grad():
        want = tuned(BATCH)["features"]
    files = save_adapter(tuned, tmp_path / "adapter")
    assert {p.name for p in files} == {"adapter_config.json", "adapter_model.safetensors"}
    size = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < 0.1 * (tmp_path / "base" / "tessera_model.safetensors").stat().st_size

    loaded = load_adapter(load_model(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = loaded(BATCH)["features"]
        for m in want:
            assert torch.equal(got[m], want[m])
        merged = merge_adapter(loaded).eval()
        plain = merged(BATCH)["features"]
    for m in want:
        assert torch.allclose(plain[m], want[m], atol=1e-5, rtol=0)
        assert not torch.allclose(plain[m], base_features(tmp_path / "base")[m], atol=1e-3)  # the adapter matters
    save_model(merged, tmp_path / "merged")
    from safetensors.torch import load_file

    assert not any("lora" in k for k in load_file(str(tmp_path / "merged" / "tessera_model.safetensors")))
    again = load_model(tmp_path / "merged").eval()
    with torch.no_grad():
        for m, v in again(BATCH)["features"].items():
            assert torch.allclose(v, want[m], atol=1e-5, rtol=0)


def base_features(path):
    with torch.no_grad():
        return load_model(path).eval()(BATCH)["features"]


def test_trained_temperatures_travel_with_the_adapter(tmp_path):
    base = _base()
    tuned = apply_lora(base, LoraConfig(rank=2, train_temperatures=True))
    with torch.no_grad():
        tuned.get_base_model().logit_scales["image__text"].fill_(3.0)
    files = save_adapter(tuned, tmp_path / "a")
    assert "tessera_scales.safetensors" in {p.name for p in files}
    loaded = load_adapter(_base(), tmp_path / "a")
    assert float(loaded.get_base_model().logit_scales["image__text"]) == 3.0


def test_every_kind_of_tower_takes_a_preset():
    base = _base(JOINT_MODEL)
    names = lora_targets(base, LoraConfig())
    for tower in ("image", "text", "audio", "graph"):
        assert any(n.startswith(f"towers.{tower}.") for n in names), tower
    hf = _base(
        {
            "embed_dim": 32,
            "towers": {
                "image": TINY_MODEL["towers"]["image"],
                "text": {
                    "encoder": "hf_text",
                    "max_length": 16,
                    "config": {
                        "model_type": "bert",
                        "hidden_size": 32,
                        "num_hidden_layers": 1,
                        "num_attention_heads": 2,
                        "intermediate_size": 64,
                    },
                },
            },
        }
    )
    hf_names = lora_targets(hf, LoraConfig(towers=["text"]))
    assert hf_names and all(n.rsplit(".", 1)[-1] in ("query", "value") for n in hf_names)  # peft's bert default
    expected = _expected_lora_params(base, names, 2)
    tuned = apply_lora(base, LoraConfig(rank=2))  # (peft injects into `base` itself)
    assert parameter_counts(tuned)["trainable"] == expected


@pytest.mark.parametrize("cfg", [TINY_MODEL, RESNET_MODEL], ids=["vit", "modified-resnet"])
def test_every_module_lora_adapts_takes_part_in_the_forward(cfg):
    """A wrapped module whose weight the tower reads directly (ModifiedResNet's attention pool) would train
    nothing: every adapter weight must get a gradient."""
    base = _base(cfg)
    with torch.no_grad():  # open_clip starts each bottleneck's last BatchNorm at zero, which stops its gradient
        for name, p in base.named_parameters():
            if name.endswith("bn3.weight"):
                p.fill_(1.0)
    tuned = apply_lora(base, LoraConfig(rank=2))
    _randomize_lora(tuned)
    out = tuned(BATCH)["features"]
    (out["image"].sum() + out["text"].sum()).backward()
    lora = {n: p for n, p in tuned.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values()), [
        n for n, p in lora.items() if p.grad is None
    ]
    if cfg is RESNET_MODEL:
        assert any(".conv2.lora_A" in n for n in lora) and not any("attnpool" in n for n in lora)
        with pytest.raises(ConfigError, match="'tower.attnpool.q_proj' cannot take LoRA"):
            lora_targets(_base(cfg), LoraConfig(target_modules={"image": ["q_proj"]}))


def test_bad_adapters_and_targets_are_clear_errors(tmp_path):
    base = _base()
    with pytest.raises(ConfigError, match=r"lora.target_modules.text: \['nope'\] match no Linear"):
        lora_targets(base, LoraConfig(target_modules={"text": ["c_fc", "nope"]}))
    with pytest.raises(ConfigError, match="no 'audio' tower"):
        lora_targets(base, LoraConfig(towers=["audio"]))
    save_adapter(apply_lora(_base(), LoraConfig(rank=4)), tmp_path / "a")
    wider = {
        **TINY_MODEL,
        "towers": {
            **TINY_MODEL["towers"],
            "text": {
                **TINY_MODEL["towers"]["text"],
                "overrides": {**TINY_MODEL["towers"]["text"]["overrides"], "width": 128},
            },
        },
    }
    with pytest.raises(ConfigError, match="does not fit this model"):
        load_adapter(_base(wider), tmp_path / "a")
    deeper = {
        **TINY_MODEL,
        "towers": {
            **TINY_MODEL["towers"],
            "image": {
                **TINY_MODEL["towers"]["image"],
                "overrides": {**TINY_MODEL["towers"]["image"]["overrides"], "layers": 2},
            },
        },
    }
    save_adapter(apply_lora(_base(deeper), LoraConfig(rank=4)), tmp_path / "deep")
    with pytest.raises(ConfigError, match="does not fit this model"):
        load_adapter(_base(), tmp_path / "deep")
    with pytest.raises(ConfigError, match="not an adapter directory"):
        load_adapter(_base(), tmp_path)


def test_an_adapter_loads_only_onto_the_base_it_was_trained_on(tmp_path):
    """The same architecture with other weights is another base: an adapter that records its base refuses it."""
    from tessera.models.adapters import fingerprint

    base, other = _base(seed=0), _base(seed=1)
    assert fingerprint(base) == fingerprint(_base(seed=0)) != fingerprint(other)
    save_adapter(apply_lora(_base(seed=0), LoraConfig(rank=4)), tmp_path / "a", base=("runs/b", fingerprint(base)))
    load_adapter(base, tmp_path / "a")
    with pytest.raises(ConfigError, match=r"trained on the base 'runs/b' \(weights [0-9a-f]{12}\), and this model is"):
        load_adapter(other, tmp_path / "a")


def test_eval_tools_take_an_adapter(demo_shards, tmp_path):
    from tessera.eval.retrieval import main as retrieval_main

    base = _base()
    save_model(base, tmp_path / "base")
    tuned = apply_lora(base, LoraConfig(rank=4))
    _randomize_lora(tuned)
    save_adapter(tuned, tmp_path / "adapter")
    save_model(merge_adapter(tuned), tmp_path / "merged")
    data = ["--data", str(demo_shards / "val-000000.tar"), "--query", "text", "--target", "image"]
    assert (
        retrieval_main(
            [
                "--model",
                str(tmp_path / "base"),
                "--adapter",
                str(tmp_path / "adapter"),
                *data,
                "--out",
                str(tmp_path / "a.json"),
            ]
        )
        == 0
    )
    assert retrieval_main(["--model", str(tmp_path / "merged"), *data, "--out", str(tmp_path / "m.json")]) == 0
    a, m = (json.loads((tmp_path / f).read_text())["metrics"] for f in ("a.json", "m.json"))
    assert a == pytest.approx(m, abs=1e-6)
    with pytest.raises(SystemExit) as exc:
        retrieval_main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path), *data])
    assert exc.value.code == 2


# -- fine-tuning through the training loop ------------------------------------------------------------------------


def _finetune_args(base, out, demo_shards, *extra):
    return merge_overrides(
        [
            f"base={base}",
            f"output_dir={out}",
            f"data.train={demo_shards}/train-txt-{{000000..000003}}.tar",
            f"data.val={demo_shards}/val-000000.tar",
            "data.num_workers=1",
            "train.batch_size=16",
            "train.lr=0.003",
            "train.warmup_steps=1",
            "train.log_every=1",
            "train.weight_decay=0.0",
            "eval.batch_size=160",
            "adapter.lora.rank=4",
        ],
        extra,
    )


def test_finetune_config_errors(tmp_path):
    from tessera.train.recipes.load import load_config
    from tessera.train.recipes.runs import FinetuneConfig

    with pytest.raises(ConfigError, match="needs base=RUN_DIR/model"):
        load_config(None, [], FinetuneConfig)
    with pytest.raises(ConfigError, match="not an exported Tessera model"):
        load_config(None, [f"base={tmp_path}"], FinetuneConfig)
    save_model(_base(), tmp_path / "base")
    with pytest.raises(ConfigError, match="remove the 'model' section"):
        load_config(None, [f"base={tmp_path / 'base'}", "model.embed_dim=64"], FinetuneConfig)
    with pytest.raises(ConfigError, match="zero_stage 0-2"):
        load_config(None, [f"base={tmp_path / 'base'}", "deepspeed.zero_stage=3"], FinetuneConfig)
    cfg = load_config(None, [f"base={tmp_path / 'base'}", "adapter.lora.towers=[text]"], FinetuneConfig)
    assert cfg.model.pair_list() == [("image", "text")] and cfg.adapter.lora.towers == ["text"]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.learning
def test_lora_finetuning_under_two_rank_deepspeed(demo_shards, tmp_path):
    """torchrun + DeepSpeed ZeRO-2: only the adapter trains, the loss falls, and the run leaves an adapter that
    loads onto the base to give exactly its exported merged model; the base itself is untouched."""
    from safetensors.torch import load_file

    from .conftest import PY, run_cli

    base = _base()
    save_model(base, tmp_path / "base")
    before = load_file(str(tmp_path / "base" / "tessera_model.safetensors"))
    out = tmp_path / "ft"
    proc = run_cli(
        [
            PY,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "tessera.train.finetune",
            *_finetune_args(
                tmp_path / "base",
                out,
                demo_shards,
                "train.steps=10",
                "deepspeed.zero_stage=2",
                "train.precision=fp32",
                f"seed={SEED}",
            ),
        ],
        env={"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = parameter_counts(apply_lora(_base(), LoraConfig(rank=4)))
    assert f"{counts['trainable']:,} of {counts['total']:,} parameters trainable" in proc.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if x["kind"] == "train"]
    assert len(losses) == 10
    learned(loss_fall(losses), 0.05, "the loss's fall over 10 steps")
    assert {p.name for p in (out / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "base.json",  # the base's identity, checked by every load_adapter below
    }
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size < 200_000
    after = load_file(str(tmp_path / "base" / "tessera_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    tuned = load_adapter(load_model(tmp_path / "base"), out / "adapter").eval()
    exported = load_model(out / "model").eval()
    with torch.no_grad():
        a, b = tuned(BATCH)["features"], exported(BATCH)["features"]
        c = load_model(tmp_path / "base").eval()(BATCH)["features"]
    for m in a:
        assert torch.allclose(a[m], b[m], atol=1e-5, rtol=0)
        assert not torch.allclose(a[m], c[m], atol=1e-4)  # the adapter learned something
    merged = load_file(str(out / "model" / "tessera_model.safetensors"))
    unadapted = [k for k in before if "conv1" in k or "ln_" in k or "token_embedding" in k]
    assert unadapted and all(torch.equal(before[k], merged[k]) for k in unadapted)


@pytest.mark.slow
def test_tessera_finetune_command_and_full_finetuning(demo_shards, tmp_path):
    from .conftest import PY, run_cli

    save_model(_base(), tmp_path / "base")
    proc = run_cli(
        [
            PY,
            "-m",
            "tessera.train.cli",
            "finetune",
            *_finetune_args(
                tmp_path / "base",
                tmp_path / "full",
                demo_shards,
                "train.steps=3",
                "adapter.kind=full",
                "train.precision=fp32",
                "data.val=[]",
            ),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "full" / "model" / "tessera_model.safetensors").exists() and not (
        tmp_path / "full" / "adapter"
    ).exists()
    assert "fine-tuning" in proc.stderr and "(full)" in proc.stderr


@pytest.mark.slow
def test_lora_finetuning_resumes_exactly_from_an_adapter_only_checkpoint(demo_shards, tmp_path, in_process_training):
    import shutil

    from tessera.train.finetune import main as finetune_main

    save_model(_base(), tmp_path / "base")
    common = ["train.steps=6", "train.ckpt_every=3", "train.precision=fp32", "data.val=[]", "data.num_workers=0"]
    assert finetune_main(_finetune_args(tmp_path / "base", tmp_path / "full", demo_shards, *common)) == 0
    ckpt = tmp_path / "full" / "checkpoints" / "step00000003"
    assert (
        sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        < 0.5 * (tmp_path / "base" / "tessera_model.safetensors").stat().st_size
    )  # the adapter and its optimizer state only
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoints" / "step00000003")
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("step00000003")
    assert (
        finetune_main(_finetune_args(tmp_path / "base", tmp_path / "resumed", demo_shards, *common, "resume=latest"))
        == 0
    )

    def losses(run):
        return [
            (x["step"], x["loss"])
            for x in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
            if x["kind"] == "train"
        ]

    resumed, full = losses("resumed"), losses("full")[3:]
    assert [s for s, _ in resumed] == [4, 5, 6] == [s for s, _ in full]
    assert [v for _, v in resumed] == pytest.approx([v for _, v in full], abs=1e-6)


@pytest.mark.slow
@pytest.mark.learning
def test_few_shot_lora_beats_the_zero_shot_classifier_of_its_base(colour_shards, tmp_path, in_process_training):
    from tessera.data import SourceConfig
    from tessera.eval.zeroshot import evaluate_zeroshot, read_classes
    from tessera.train.finetune import main as finetune_main

    save_model(_base(), tmp_path / "base")
    names, templates = read_classes(colour_shards / "classes.json")
    val = [SourceConfig(str(colour_shards / "val-000000.tar"))]
    zero_shot = evaluate_zeroshot(load_model(tmp_path / "base"), val, "image", names, templates, 240)["metrics"]["acc1"]
    out = tmp_path / "fewshot"
    assert (
        finetune_main(
            [
                f"base={tmp_path / 'base'}",
                f"output_dir={out}",
                "task=fewshot",
                "fewshot.k=8",
                f"data.train={colour_shards}/train-{{000000..000003}}.tar",
                f"data.val={colour_shards}/val-000000.tar",
                f"eval.classes={colour_shards}/classes.json",
                "data.num_workers=0",
                "train.steps=80",
                "train.batch_size=32",
                "train.lr=0.01",
                "train.warmup_steps=2",
                "train.weight_decay=0",
                "train.precision=fp32",
                "train.log_every=10",
                "adapter.lora.rank=16",
                "eval.batch_size=240",
                f"seed={SEED}",
            ]
        )
        == 0
    )
    shots = load_file_keys(out / "fewshot" / "shots-000000.tar")
    assert len(shots) == 8 * 8  # k per class, every class has them
    few_shot = json.loads((out / "eval" / "zeroshot_image.json").read_text())
    assert few_shot["n"] == 240
    # measured: 13.8% zero-shot (chance 12.5%) -> 35.4% after 80 steps on 64 shots
    learned(few_shot["metrics"]["acc1"], zero_shot + 0.1, "held-out acc1 over zero-shot + 0.1")
    # the shots are a function of the seed alone
    from tessera.data.shots import write_shots

    again = write_shots([f"{colour_shards}/train-{{000000..000003}}.tar"], 8, 8, 0, tmp_path / "again")
    assert load_file_keys(again) == shots


def load_file_keys(shard) -> list[str]:
    from tessera.data import SampleStats, expand_shards
    from tessera.data.shards import iter_raw_samples

    return [s["__key__"] for s in iter_raw_samples(expand_shards(str(shard)), SampleStats())]
