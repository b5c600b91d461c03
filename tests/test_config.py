"""Typed configs: validation messages, overrides, recipes, --help."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tessera.config import ConfigError
from tessera.train.recipes.load import apply_overrides, load_config, merge_overrides, read_recipe
from tessera.train.recipes.runs import PretrainConfig

from .conftest import PY, ROOT, TINY_MODEL, run_cli

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown key 'train.stpes'.*Did you mean 'steps'"):
        load_config(None, ["train.stpes=10"])
    with pytest.raises(ConfigError, match=r"unknown key 'deepspeed.zero_stag'.*'zero_stage'"):
        load_config(None, ["deepspeed.zero_stag=2"])


def test_bad_values_say_what_to_fix():
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match="deepspeed.zero_stage: 4 is not one of"):
        load_config(None, ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match="train.steps must be positive"):
        load_config(None, ["train.steps=0"])
    with pytest.raises(ConfigError, match="resampled=true needs data.train_num_samples"):
        load_config(None, ["data.resampled=true"])
    with pytest.raises(ConfigError, match="unknown encoder 'open_clip_imag'.*'open_clip_image'"):
        load_config(None, ["model.towers={image: {encoder: open_clip_imag}}"])
    with pytest.raises(ConfigError, match="'ViT-B-33' is not an open_clip model config"):
        load_config(None, ["model.towers={image: {encoder: open_clip_image, model: ViT-B-33}}"])
    with pytest.raises(ConfigError, match="'layerz' is not a field of open_clip's CLIPVisionCfg.*'layers'"):
        load_config(None, ["model.towers={image: {encoder: open_clip_image, overrides: {layerz: 2}}}"])


def test_loss_options_are_checked_against_the_model():
    with pytest.raises(ConfigError, match="siglip needs a logit bias: set model.init_logit_bias=-10"):
        load_config(None, ["loss.kind=siglip"])
    with pytest.raises(ConfigError, match="init_logit_bias is set but loss.kind=infonce"):
        load_config(None, ["model.init_logit_bias=-10"])
    with pytest.raises(ConfigError, match="loss.kind: 'sigmoid' is not one of"):
        load_config(None, ["loss.kind=sigmoid"])
    with pytest.raises(ConfigError, match="loss.tile_size must be positive"):
        load_config(None, ["loss.tile_size=0"])
    with pytest.raises(ConfigError, match="InfoNCE options"):
        load_config(None, ["loss.kind=siglip", "model.init_logit_bias=-10", "loss.dcl=true"])
    cfg = load_config(ROOT / "configs" / "siglip-vit-b-32.yaml")
    assert (cfg.loss.kind, cfg.model.init_logit_bias, cfg.model.init_temperature) == ("siglip", -10.0, 0.1)


def test_required_overrides_from_the_issue_all_work(tmp_path):
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "seed=7",
            "train.steps=12",
            "train.batch_size=8",
            "train.lr=0.002",
            "deepspeed.zero_stage=2",
            "resume=latest",
            "data.train=[{shards: 'a-{000..003}.tar', weight: 2}, {shards: b.tar, weight: 1}]",
            f"model={{embed_dim: 32, towers: {TINY_MODEL['towers']}}}",
        ],
    )
    assert (cfg.output_dir, cfg.seed, cfg.train.steps, cfg.train.batch_size) == (str(tmp_path), 7, 12, 8)
    assert cfg.train.lr == 0.002 and cfg.deepspeed.zero_stage == 2 and cfg.resume == "latest"
    assert [(s.shards, s.weight) for s in cfg.data.train] == [("a-{000..003}.tar", 2.0), ("b.tar", 1.0)]
    # a bare shard spec is one source of weight 1
    cfg = load_config(None, ["data.train=shards/x-{0..9}.tar"])
    assert [(s.shards, s.weight, s.name) for s in cfg.data.train] == [("shards/x-{0..9}.tar", 1.0, "source0")]


def test_numbers_in_yaml_11_exponent_form_are_numbers():
    cfg = load_config(None, ["train.lr=5e-4", "train.min_lr=1E-6"])
    assert cfg.train.lr == 5e-4 and cfg.train.min_lr == 1e-6


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="not key=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({"seed": 3}, ["seed.x=1"])
    with pytest.raises(ConfigError, match="'train.steps' is given twice"):
        apply_overrides({}, ["train.steps=3", "train.steps=4"])
    # what bash makes of an unquoted brace pattern: one override per shard, and a hint to quote it
    with pytest.raises(ConfigError, match="expanded by the shell .* quote it"):
        apply_overrides({}, [f"data.train=s/train-{i:06d}.tar" for i in range(4)])
    # a tool's defaults, with the keys its caller sets again replaced
    assert merge_overrides(["train.steps=3", "seed=1"], ["seed=2"]) == ["train.steps=3", "seed=2"]
    # a key may still refine one set before it
    tree = apply_overrides({}, ['model={"embed_dim": 32, "towers": {}}', "model.embed_dim=64"])
    assert tree["model"] == {"embed_dim": 64, "towers": {}}


def test_recipe_inheritance(tmp_path):
    (tmp_path / "a.yaml").write_text("seed: 1\ntrain: {steps: 5, lr: 0.1}\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\ntrain: {steps: 9}\n")
    tree = read_recipe(tmp_path / "b.yaml")
    assert tree == {"seed": 1, "train": {"steps": 9, "lr": 0.1}}
    (tmp_path / "c.yaml").write_text("inherit: c.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        read_recipe(tmp_path / "c.yaml")
    # `base` is the model a fine-tuning recipe starts from; a recipe named there is a clear error
    (tmp_path / "d.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="inherits another with 'inherit: a.yaml'"):
        read_recipe(tmp_path / "d.yaml")


PRETRAIN_RECIPES = [p for p in RECIPES if not p.name.startswith("finetune-")]


@pytest.mark.parametrize("recipe", PRETRAIN_RECIPES, ids=[p.name for p in PRETRAIN_RECIPES])
def test_every_recipe_loads_and_round_trips(recipe: Path):
    cfg = load_config(recipe)
    assert isinstance(cfg, PretrainConfig)
    from tessera.train.recipes.load import dump_config

    again = load_config(
        None,
        [
            f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
            for k, v in yaml.safe_load(dump_config(cfg)).items()
        ],
    )
    assert yaml.safe_load(dump_config(again)) == yaml.safe_load(dump_config(cfg))


def test_recipes_exist_with_tiny_variants():
    names = {p.name for p in RECIPES}
    assert {"demo.yaml", "vit-b-32.yaml", "vit-b-32-cpu.yaml"} <= names


def test_help_lists_every_documented_key():
    proc = run_cli([PY, "-m", "tessera.train.pretrain", "--help"])
    assert proc.returncode == 0, proc.stderr
    for key in (
        "output_dir",
        "seed",
        "data.train",
        "train.steps",
        "train.batch_size",
        "train.lr",
        "deepspeed.zero_stage",
        "resume",
        "data.max_bad_fraction",
        "train.precision",
        "loss.kind",
        "loss.tile_size",
        "loss.impl",
        "loss.dcl",
        "loss.label_smoothing",
        "model.init_logit_bias",
    ):
        assert f"  {key} = " in proc.stdout, key


@pytest.mark.parametrize(
    "command, shown",
    [
        ("pretrain", "train.steps"),
        ("finetune", "train.steps"),
        ("make-shards", "manifest fields by modality"),  # each decoder's fields, read without torch
        ("demo-data", "--train-per-source"),
        ("export", "--format"),
        ("import open_clip", "--model"),
        ("eval retrieval", "CLIP_benchmark's convention"),  # the runner's docstring, read from its source
        ("eval zeroshot", "--classes"),
        ("eval linear-probe", "--weight-decays"),
        ("eval mteb", "ZeroShotClassification"),
    ],
)
def test_help_answers_without_importing_torch(command, shown):
    """Every `tessera` command's `--help` reads its command line only: torch, DeepSpeed and the towers' libraries
    (seconds of imports) load only for a run."""
    script = f"""
import contextlib, sys
from tessera.train.cli import main
with contextlib.suppress(SystemExit):
    main({command.split()!r} + ["--help"])
print("heavy:", sorted(m for m in ("torch", "deepspeed", "open_clip", "transformers", "peft", "webdataset")
                       if m in sys.modules))
"""
    proc = run_cli([PY, "-c", script])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shown in proc.stdout and "heavy: []" in proc.stdout, proc.stdout[-500:]


def test_cli_reports_config_errors_without_traceback():
    proc = run_cli([PY, "-m", "tessera.train.pretrain", "train.stepz=3"])
    assert proc.returncode == 2
    assert "error: unknown key 'train.stepz'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "recipe",
    [p for p in RECIPES if p.name.startswith("finetune-")],
    ids=[p.name for p in RECIPES if p.name.startswith("finetune-")],
)
def test_finetune_recipes_load_onto_an_exported_base(recipe: Path, tiny_model_cfg, tmp_path):
    from tessera.models import build_model, load_model, save_model
    from tessera.train.recipes.runs import FinetuneConfig
    from tessera.train.recipes.tasks import make_task

    save_model(build_model(tiny_model_cfg), tmp_path / "base")
    classes = tmp_path / "classes.json"  # stands in for the demo's
    classes.write_text('{"classnames": ["circle", "square", "star"], "templates": ["a {}"]}')
    cfg = load_config(
        recipe, [f"base={tmp_path / 'base'}", f"eval.classes={classes}", f"fewshot.classes={classes}"], FinetuneConfig
    )
    assert cfg.model.embed_dim == tiny_model_cfg.embed_dim and cfg.adapter.kind in ("lora", "prompt", "full")
    # the recipe's adapter fits the base
    model = make_task(cfg).attach(load_model(tmp_path / "base"))
    assert (
        0
        < sum(p.numel() for p in model.parameters() if p.requires_grad)
        < 0.2 * sum(p.numel() for p in model.parameters())
    )
