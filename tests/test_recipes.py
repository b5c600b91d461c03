"""Every recipe in configs/ is exercised: its model builds at full size (on the meta device, where it is large), and a
shrunk override of it trains one CPU step through its own task, engine settings and data layout, and exports what
its task exports. A recipe added without an entry below fails `test_every_recipe_is_exercised`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tessera import modalities
from tessera.config import from_dict
from tessera.data.pipeline import seeded_rng
from tessera.models import build_model, save_model
from tessera.train.loop import train
from tessera.train.recipes.load import apply_overrides, read_recipe
from tessera.train.recipes.runs import FinetuneConfig, PretrainConfig
from tessera.train.recipes.tasks import make_task

from .conftest import ROOT

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
TINY_IMAGE = "{image_size: 32, patch_size: 8, width: 64, layers: 1, head_width: 32}"
TINY_TEXT = "{context_length: 16, width: 64, heads: 2, layers: 1}"
TINY_CLIP = [
    "model.embed_dim=32",
    f"model.towers.image.overrides={TINY_IMAGE}",
    f"model.towers.text.overrides={TINY_TEXT}",
]
# How each recipe trains one step on a CPU: overrides that shrink its towers (the demo-sized ones stay as they are).
# Everything else (loss, pairing, precision, ZeRO stage, batching, adapter, task) is the recipe's own.
SHRINK: dict[str, list[str]] = {
    "demo.yaml": [],
    "demo-joint.yaml": [],
    "demo-triple.yaml": [],
    "demo-video.yaml": [],
    "demo-motion.yaml": [],
    "vit-b-32-cpu.yaml": [],
    "vit-b-32.yaml": TINY_CLIP,
    "siglip-vit-b-32.yaml": TINY_CLIP,
    "joint-vit-b-32.yaml": [
        *TINY_CLIP,
        "model.towers.audio.width=32",
        "model.towers.audio.depth=1",
        "model.towers.audio.heads=2",
        "model.towers.graph.hidden_dim=16",
        "model.towers.graph.layers=1",
        "model.towers.graph.heads=2",
    ],
    "finetune-lora-demo.yaml": [],
    "finetune-fewshot-demo.yaml": [],
    "finetune-coop-demo.yaml": [],
}
# each recipe's sources by name -> the local test shards of the same modalities
SOURCES = {
    "shapes-txt": "train-txt-{000000..000001}.tar",
    "shapes": "train-txt-{000000..000001}.tar",
    "laion": "train-txt-{000000..000001}.tar",
    "shapes-json": "train-json-{000000..000001}.tar",
    "sounds": "sounds-{000000..000001}.tar",
    "audio-captions": "sounds-{000000..000001}.tar",
    "graphs": "graphs-{000000..000001}.tar",
    "molecules": "molecules-000000.tar",
    "pictures-sounds": "pictures-sounds-000000.tar",
    "video-frames": "pictures-sounds-000000.tar",
    "videos": "videos-{000000..000001}.tar",
    "motion": "videos-{000000..000001}.tar",
}
MOLECULES = ["CCO", "c1ccccc1O", "CC(=O)O", "CCN", "C1CCCCC1", "CC(C)O", "c1ccncc1", "OCC(O)CO"]


def _cls(recipe) -> type:
    return FinetuneConfig if recipe.name.startswith("finetune-") else PretrainConfig


def test_every_recipe_is_exercised():
    assert sorted(SHRINK) == sorted(p.name for p in RECIPES), (
        "every recipe in configs/ needs an entry in tests/test_recipes.py:SHRINK (how it trains one CPU step)"
    )


@pytest.fixture(scope="module")
def recipe_shards(tmp_path_factory):
    """Small demo shards of every layout the recipes read: pictures, sounds, graphs, pictures with sounds, SMILES
    molecules and videos; the demo's classes.json."""
    from tessera.data import demo, demo_joint, demo_video
    from tessera.data.make_shards import write_shards

    out = tmp_path_factory.mktemp("recipes")
    demo.build(out, train_per_source=32, samples_per_shard=16, seed=0)
    demo_joint.build(out, per_source=32, triple=16, samples_per_shard=16, seed=0)
    demo_video.build(out, train_clips=29, samples_per_shard=16, seed=0, motion_clips=0)  # + 3 broken: 2 shards
    write_shards(
        [(f"m{i:04d}", {"smi": s.encode(), "txt": f"the molecule {s}".encode()}) for i, s in enumerate(MOLECULES * 2)],
        out,
        "molecules",
        16,
    )
    return out


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    """The demo recipe's model, exported: what the fine-tuning recipes start from."""
    cfg = from_dict(PretrainConfig, read_recipe(ROOT / "configs" / "demo.yaml"))
    torch.manual_seed(0)
    return save_model(build_model(cfg.model), tmp_path_factory.mktemp("base") / "model")


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_builds_its_model_at_full_size(recipe, demo_base):
    tree = read_recipe(recipe)
    if _cls(recipe) is FinetuneConfig:
        tree["base"] = str(demo_base)
    cfg = from_dict(_cls(recipe), tree)
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert list(model.towers) == list(cfg.model.towers)
    for m, tower in cfg.model.towers.items():
        assert type(model.towers[m]) is modalities.encoder_class(tower.encoder)
        assert all(p.is_meta for p in model.towers[m].parameters())
    total = sum(p.numel() for p in model.parameters())
    if recipe.name in ("vit-b-32.yaml", "siglip-vit-b-32.yaml"):
        import open_clip

        with torch.device("meta"):
            reference = open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-32"))
        # open_clip's ViT-B/32, and one temperature (plus SigLIP's bias)
        assert total == sum(p.numel() for p in reference.parameters()) + (cfg.model.init_logit_bias is not None)
    assert total > 0


def _covering_accum(cfg) -> int:
    """Micro-steps per step such that one optimizer step draws a batch from every training source (per-source
    batching draws the source of micro-batch i from (seed, i) alone)."""
    names, weights = [s.name for s in cfg.data.train], [s.weight for s in cfg.data.train]
    if len(names) == 1:
        return 1
    seen: set[str] = set()
    for i in range(1000):
        seen.add(seeded_rng(cfg.seed, "source", i).choices(names, weights=weights)[0])
        if len(seen) == len(names):
            return i + 1
    raise AssertionError("the schedule never draws every source")


# the joint recipes take one step through five and four sources' loaders: tens of seconds
STEPS = [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if "joint" in p.name else []) for p in RECIPES]


@pytest.mark.parametrize("recipe", STEPS)
def test_recipe_trains_one_step_shrunk(recipe, recipe_shards, demo_base, tmp_path, in_process_training):
    tree = apply_overrides(
        read_recipe(recipe),
        [
            *SHRINK[recipe.name],
            f"output_dir={tmp_path / 'run'}",
            "train.steps=1",
            "train.log_every=1",
            "train.ckpt_every=-1",
            "train.batch_size=8",
            "data.val=[]",
            "data.num_workers=0",
            f"eval.classes={recipe_shards / 'classes.json'}",
        ],
    )
    data = tree["data"]
    data["train"] = [{**src, "shards": str(recipe_shards / SOURCES[src["name"]])} for src in data["train"]]
    if data.get("resampled"):
        data["train_num_samples"] = 64
    if _cls(recipe) is FinetuneConfig:
        tree["base"] = str(demo_base)
        if tree.get("task") == "fewshot":
            tree["fewshot"] = {**tree["fewshot"], "classes": str(recipe_shards / "classes.json")}
    cfg = from_dict(_cls(recipe), tree)
    tree["train"]["grad_accum"] = _covering_accum(cfg)
    cfg = from_dict(_cls(recipe), tree)

    summary = train(make_task(cfg))
    assert summary["step"] == 1
    out = tmp_path / "run"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and math.isfinite(lines[0]["loss"])
    if cfg.task == "fewshot":
        assert 0 <= lines[0]["train_acc1"] <= 1
    else:  # one step drew every source: every pair the loss aligns took part
        assert {f"loss/{a}-{b}" for a, b in cfg.model.pair_list()} <= set(lines[0])
    if cfg.loss.reversal_negatives:  # and the clips played backwards, as negatives of their captions
        assert math.isfinite(lines[0]["loss/reversal/video-text"])
    if cfg.task == "pretrain" or cfg.adapter.kind == "full":
        assert (out / "model" / "tessera_model.safetensors").is_file()
    else:
        assert (out / "adapter").is_dir()
        assert (out / "model").is_dir() == (cfg.adapter.kind == "lora" and cfg.adapter.export_merged)
