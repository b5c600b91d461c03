"""Weight EMA (train.ema): its arithmetic against the closed form, the swap for evaluation, the file a checkpoint
holds, the config's errors; then tiny runs: resume gives the uninterrupted run's average bit for bit, both exports
load, eval_ema lines, a LoRA run's average of its adapter; and ZeRO-3 over two ranks against ZeRO-0."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from tessera.config import ConfigError
from tessera.models import load_model, save_model
from tessera.models.adapters import load_adapter
from tessera.train.components.ema import EMA_FILE, WeightEMA
from tessera.train.recipes.config import EMAConfig
from tessera.train.recipes.load import help_text, load_config
from tessera.train.recipes.runs import PretrainConfig

from .conftest import PY, command, finished, run_cli
from .test_adapters import _base, _finetune_args
from .test_train import tiny_run_args


def _engine(module: nn.Module, stage: int = 0):
    """What WeightEMA reads of a DeepSpeed engine, for a module in one process."""
    return SimpleNamespace(module=module, optimizer=None, zero_optimization_stage=lambda: stage)


def _model(dtype=torch.float32) -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).to(dtype)
    model[1].bias.requires_grad_(False)  # frozen: never averaged
    return model


def _closed_form(weights: list[torch.Tensor], cfg: EMAConfig) -> torch.Tensor:
    """The average after steps 1..n with weights[s] after step s (weights[0]: the start), in float64: the last
    update at or before start_step (or the start) copied, then each later update u_i weighted (1-D) D^(m-i),
    D = decay**every."""
    n = len(weights) - 1
    updates = [s for s in range(1, n + 1) if s % cfg.every == 0]
    copied = max([s for s in updates if s <= cfg.start_step], default=0)
    averaged = [s for s in updates if s > cfg.start_step]
    big_d, m = cfg.decay**cfg.every, len(averaged)
    out = big_d**m * weights[copied].double()
    for i, s in enumerate(averaged, 1):
        out = out + (1 - big_d) * big_d ** (m - i) * weights[s].double()
    return out


@pytest.mark.parametrize(
    "decay,every,start_step,dtype",
    [(0.8, 1, 0, torch.float32), (0.9, 3, 4, torch.float32), (0.7, 2, 0, torch.float16)],
)
def test_the_average_after_k_updates_is_the_closed_form(decay, every, start_step, dtype):
    """fp16 parameters (DeepSpeed's own fp16 mode, through deepspeed.config) average into fp32 all the same."""
    torch.manual_seed(0)
    model = _model(dtype)
    cfg = EMAConfig(decay=decay, every=every, start_step=start_step)
    ema = WeightEMA(_engine(model), cfg)
    assert ema.names == ["0.weight", "0.bias", "1.weight"]  # trainable only
    assert ema.nbytes == 4 * (12 + 3 + 3) and all(s.dtype == torch.float32 for s in ema.shadow)
    history = {n: [p.detach().clone()] for n, p in model.named_parameters()}
    for step in range(1, 11):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(torch.randn_like(p) * 0.5)  # what an optimizer step would do
                history[name].append(p.detach().clone())
        ema.update(step)
    for name, shadow in zip(ema.names, ema.shadow):
        want = _closed_form(history[name], cfg)
        assert torch.allclose(shadow.double(), want, atol=1e-6, rtol=0), name


def test_the_average_swaps_in_for_evaluation_and_the_trained_weights_come_back_bit_for_bit():
    torch.manual_seed(0)
    model = _model()
    ema = WeightEMA(_engine(model), EMAConfig(decay=0.5))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(1)
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped():
        for name, shadow in zip(ema.names, ema.shadow):
            assert torch.equal(model.get_parameter(name), shadow)
        assert torch.equal(model[1].bias, trained["1.bias"])  # frozen: as it is
    for name, p in model.named_parameters():
        assert torch.equal(p, trained[name]), name


def test_a_shadow_module_holds_the_average_and_runs_forward_with_it():
    torch.manual_seed(0)
    model = _model()
    teacher = _model()  # the caller's copy, made before DeepSpeed; its own values are overwritten
    ema = WeightEMA(_engine(model), EMAConfig(decay=0.5), shadow_module=teacher)
    assert [s.data_ptr() for s in ema.shadow] == [teacher.get_parameter(n).data_ptr() for n in ema.names]
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema.update(1)
    x = torch.randn(2, 4)
    with ema.swapped(), torch.no_grad():
        want = model(x)
    assert torch.equal(teacher(x), want)
    with pytest.raises(ConfigError, match="ZeRO stage 0-2"):
        WeightEMA(_engine(model, stage=3), EMAConfig(), shadow_module=_model())
    with pytest.raises(ConfigError, match="no parameter '0.weight'"):
        WeightEMA(_engine(model), EMAConfig(), shadow_module=nn.Sequential(nn.Identity(), nn.LayerNorm(3)))


def test_the_saved_average_loads_back_and_a_mismatch_names_the_parameter(tmp_path):
    torch.manual_seed(0)
    ema = WeightEMA(_engine(_model()), EMAConfig(decay=0.5))
    ema.save(tmp_path / EMA_FILE, write=True)
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary file, renamed into place
    other = WeightEMA(_engine(_model()), EMAConfig(decay=0.5))
    other.load(tmp_path / EMA_FILE)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, other.shadow))
    state = load_file(str(tmp_path / EMA_FILE))
    with pytest.raises(ConfigError, match="missing: 1.weight"):
        other.load_state_dict({k: v for k, v in state.items() if k != "1.weight"}, "ckpt")
    with pytest.raises(ConfigError, match="not trainable here: 1.bias"):
        other.load_state_dict({**state, "1.bias": torch.zeros(3)}, "ckpt")
    with pytest.raises(ConfigError, match=r"'0.weight' has shape \[4, 3\], the model's parameter \[3, 4\]"):
        other.load_state_dict({**state, "0.weight": torch.zeros(4, 3)}, "ckpt")


def test_ema_config_from_yaml_and_the_command_line_and_its_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"steps": 50, "ema": {"decay": 0.999}}, "export": {"weights": "both"}}))
    cfg = load_config(str(recipe), [])
    assert cfg.train.ema == EMAConfig(decay=0.999) and cfg.export.weights == "both"
    cfg = load_config(None, ["train.ema.decay=0.99", "train.ema.every=4", "train.ema.start_step=10"])
    assert cfg.train.ema == EMAConfig(decay=0.99, every=4, start_step=10)
    assert load_config(None, []).train.ema is None and load_config(None, ["train.ema={}"]).train.ema == EMAConfig()
    assert "train.ema.decay = 0.9999" in help_text(PretrainConfig) and "export.weights = 'raw'" in help_text(
        PretrainConfig
    )
    for overrides, message in [
        (["train.ema.decay=1.0"], r"train.ema.decay must be in \[0, 1\), got 1.0"),
        (["train.ema.decay=-0.5"], r"train.ema.decay must be in \[0, 1\)"),
        (["train.ema.every=0"], "train.ema.every must be >= 1"),
        (["train.ema.start_step=-1"], "train.ema.start_step must be >= 0"),
        (["train.steps=10", "train.ema.start_step=10"], r"start_step \(10\) must be below train.steps \(10\)"),
        (["train.ema.decai=0.9"], "Did you mean 'decay'"),
        (["export.weights=ema"], "export.weights=ema exports the weights' moving average, but train.ema is not set"),
        (["export.weights=both", "train.ema=null"], "train.ema is not set"),
        (["export.weights=average", "train.ema.decay=0.9"], r"not one of \['raw', 'ema', 'both'\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _resume_from(source: Path, tag: str, run: Path) -> None:
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / tag, run / "checkpoints" / tag)
    (run / "checkpoints" / "latest").write_text(tag)


EMA_RUN = ["train.ema.decay=0.8", "train.precision=fp32", "train.steps=4", "train.ckpt_every=2", "data.num_workers=0"]


def test_a_resumed_run_has_the_uninterrupted_runs_average_and_both_exports_load(
    demo_shards, tmp_path, in_process_training, capsys
):
    """Evaluation at step 2 swaps the average in and out before the step-2 checkpoint; the resumed run evaluates
    nothing before its end, so equal weights also show that the swap gave the trained weights back exactly."""
    from tessera.train.pretrain import main

    val = f"data.val={demo_shards}/train-txt-000000.tar"  # 60 samples: a quick evaluation
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(tiny_run_args(demo_shards, full, *EMA_RUN, val, "eval.every=2", "export.weights=both")) == 0
    _resume_from(full, "step00000002", resumed)
    assert (
        main(tiny_run_args(demo_shards, resumed, *EMA_RUN, "data.val=[]", "export.weights=both", "resume=latest")) == 0
    )

    ema = load_file(str(full / "checkpoints" / "step00000004" / EMA_FILE))
    for name in (
        f"checkpoints/step00000004/{EMA_FILE}",
        "model/tessera_model.safetensors",
        "model-ema/tessera_model.safetensors",
    ):
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    raw, averaged = load_model(full / "model").state_dict(), load_model(full / "model-ema").state_dict()
    assert set(ema) == {n for n, p in load_model(full / "model").named_parameters()}  # every weight trains here
    assert all(torch.equal(averaged[k], v) for k, v in ema.items())
    assert sum(not torch.equal(raw[k], v) for k, v in ema.items()) > len(ema) // 2  # the average lags the weights
    meta = yaml.safe_load((full / "model-ema" / "config.yaml").read_text())["metadata"]
    assert meta["weights"] == "ema" and meta["ema"] == {"decay": 0.8, "every": 1, "start_step": 0}
    assert yaml.safe_load((full / "model" / "config.yaml").read_text())["metadata"]["weights"] == "raw"
    assert (full / "model-ema" / "open_clip").is_dir()

    evals = [(x["step"], x["kind"], x["weights"]) for x in _lines(full) if x["kind"].startswith("eval")]
    assert evals == [(2, "eval", "raw"), (2, "eval_ema", "ema"), (4, "eval", "raw"), (4, "eval_ema", "ema")]
    report = json.loads((full / "eval" / "ema" / "retrieval.json").read_text())
    assert report["weights"] == "ema" and report["model"] == str(full / "model-ema") and report["n"]

    # a checkpoint saved without train.ema: the average starts from the weights it resumes
    older = tmp_path / "older"
    _resume_from(full, "step00000004", older)
    (older / "checkpoints" / "step00000004" / EMA_FILE).unlink()
    (older / "checkpoints" / "step00000004" / "MANIFEST.json").unlink()  # as a checkpoint before EMA was on
    capsys.readouterr()
    assert main(tiny_run_args(demo_shards, older, *EMA_RUN, "data.val=[]", "export.weights=ema", "resume=latest")) == 0
    assert (
        "holds no weight EMA (saved without train.ema): it starts from the resumed weights" in capsys.readouterr().err
    )
    a, b = (
        load_file(str(older / "model" / "tessera_model.safetensors")),
        load_file(str(full / "model" / "tessera_model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_finetuning_keeps_and_exports_the_average_of_its_adapter_alone(demo_shards, tmp_path, in_process_training):
    from tessera.train.finetune import main

    save_model(_base(), tmp_path / "base")
    out = tmp_path / "lora"
    args = ["train.steps=3", "train.precision=fp32", "data.val=[]", "data.num_workers=0", "train.ema.decay=0.5"]
    assert main(_finetune_args(tmp_path / "base", out, demo_shards, *args, "export.weights=both")) == 0
    ema = load_file(str(out / "checkpoints" / "step00000003" / EMA_FILE))
    assert ema and all("lora_" in k for k in ema)  # the adapter's average, nothing of the frozen base
    tuned = {k: load_adapter(load_model(tmp_path / "base"), out / k) for k in ("adapter", "adapter-ema")}
    params = {k: dict(m.named_parameters()) for k, m in tuned.items()}
    assert all(torch.equal(params["adapter-ema"][k], v) for k, v in ema.items())
    assert any(not torch.equal(params["adapter"][k], v) for k, v in ema.items())
    assert yaml.safe_load((out / "model-ema" / "config.yaml").read_text())["metadata"]["weights"] == "ema"


TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tessera.train.pretrain"]


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero3_average_checkpoint_resume_and_export_equal_zero0s(demo_shards, tmp_path):
    """Two gloo ranks. ZeRO-3 keeps each rank's partition of the average, gathers it into the checkpoint and the
    export, evaluates it swapped in (persistent parameters gathered again), and a resume takes each rank's slice
    back: equal to ZeRO-0's average to fp32 rounding, and the resumed run's to the bit."""
    common = [*EMA_RUN, "export.weights=both", "train.ema.every=2", "train.ema.start_step=2"]
    val = [f"data.val={demo_shards}/train-txt-000000.tar", "eval.every=2"]
    runs = {
        "zero0": tiny_run_args(demo_shards, tmp_path / "zero0", *common, "deepspeed.zero_stage=0", "data.val=[]"),
        "zero3": tiny_run_args(demo_shards, tmp_path / "zero3", *common, "deepspeed.zero_stage=3", *val),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            command([*TORCHRUN, *a], {"OMP_NUM_THREADS": "1"}),
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for a in runs.values()
    ]
    for proc in finished(procs):
        assert proc.returncode == 0, proc.stderr[-4000:]
    _resume_from(tmp_path / "zero3", "step00000002", tmp_path / "resumed")
    args = tiny_run_args(
        demo_shards, tmp_path / "resumed", *common, "deepspeed.zero_stage=3", "data.val=[]", "resume=latest"
    )
    proc = run_cli([*TORCHRUN, *args], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]

    for name in (f"checkpoints/step00000004/{EMA_FILE}", "model-ema/tessera_model.safetensors"):
        zero0, zero3, resumed = (load_file(str(tmp_path / r / name)) for r in ("zero0", "zero3", "resumed"))
        assert zero0.keys() == zero3.keys() == resumed.keys()
        for k in zero0:
            assert torch.allclose(zero3[k], zero0[k], rtol=0, atol=2e-6), (name, k)
            assert torch.equal(resumed[k], zero3[k]), (name, k)
    lines = _lines(tmp_path / "zero3")
    assert [x["step"] for x in lines if x["kind"] == "eval_ema"] == [2, 4]

    # another world size: one rank resumes the step-2 checkpoint of two (DeepSpeed's universal form) at its last step,
    # so nothing trains, and takes the whole average as its one partition
    _resume_from(tmp_path / "zero3", "step00000002", tmp_path / "one")
    shorter = [o for o in common if not o.startswith(("train.steps=", "train.ema.start_step="))]
    shorter += ["train.steps=2", "deepspeed.zero_stage=3"]
    args = tiny_run_args(demo_shards, tmp_path / "one", *shorter, "data.val=[]", "resume=latest")
    proc = run_cli([PY, "-m", "tessera.train.pretrain", *args])
    assert proc.returncode == 0 and "saved by 2 rank(s), resumed on 1" in proc.stderr, proc.stderr[-4000:]
    saved = load_file(str(tmp_path / "zero3" / "checkpoints" / "step00000002" / EMA_FILE))
    exported = load_file(str(tmp_path / "one" / "model-ema" / "tessera_model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in saved.items())
