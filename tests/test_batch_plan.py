"""Batch plans (hard-negative batches, B3): the shard index, the communities, each epoch's batches, and a loader
that follows the plan, resumes exactly and continues on another layout."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
import torch

from tessera.config import ConfigError, from_dict
from tessera.data import DataConfig, SampleStats, ShardError, SourceConfig, eval_batches, expand_shards, train_loader
from tessera.data.plan import BatchPlan, ShardReader, epoch_batches, index_shards
from tessera.data.shards import iter_raw_samples
from tessera.models import build_model, save_model
from tessera.tools.plan_batches import grow_communities, main, nearest_neighbors

from .conftest import call_main

SHARDS = "train-txt-{000000..000003}.tar"


@pytest.fixture(scope="module")
def tiny_model():
    from tessera.models import ModelConfig

    from .conftest import TINY_MODEL

    torch.manual_seed(0)
    return build_model(from_dict(ModelConfig, TINY_MODEL, "model"))


def _plan(demo_shards, out, size=12, pattern=SHARDS, model=None):
    """A plan of the samples that decode, whose communities are runs of `size` of them in shard order (the loader
    tests need no model)."""
    index = index_shards(expand_shards(str(demo_shards / pattern)), SampleStats())
    if model is not None:
        good = {
            k
            for b in eval_batches(
                [SourceConfig(str(demo_shards / pattern))],
                model.transforms(False),
                model.collators(),
                model.modalities,
                100,
            )
            for k in b["__key__"]
        }
        index = index.subset([r for r, k in enumerate(index.key) if k in good])
    rows = list(range(len(index)))
    plan = BatchPlan(index, [rows[i : i + size] for i in range(0, len(rows), size)], {"batch_size": 4 * size})
    out.write_text(json.dumps(plan.to_json()))
    return plan


def _loader(model, demo_shards, plan, batch_size=8, workers=0, rank=0, world=1, chunk=0, **data):
    cfg = from_dict(
        DataConfig,
        {"train": str(demo_shards / SHARDS), "num_workers": workers, "batch_plan": str(plan), **data},
        "data",
    )
    return train_loader(
        cfg,
        model.transforms(True),
        model.collators(),
        model.modalities,
        batch_size,
        chunk,
        seed=3,
        rank=rank,
        world=world,
    )


def _keys(batch) -> list[str]:
    return [k for chunk in (batch if isinstance(batch, list) else [batch]) for k in chunk["__key__"]]


def test_the_index_reads_every_sample_as_the_shard_stream_does(demo_shards):
    urls = expand_shards(str(demo_shards / SHARDS))
    stats = SampleStats()
    index = index_shards(urls, stats)
    streamed = [s for s in iter_raw_samples(urls, SampleStats()) if "__bad__" not in s]
    assert len(index) == len(streamed) and stats.skipped["duplicate_key"] == 1  # the demo's duplicate key
    reader = ShardReader()
    for row, want in enumerate(streamed):
        got = reader.read(index, row)
        assert got["__key__"] == want["__key__"] and got["__index__"] == want["__index__"]
        assert {k: v for k, v in got.items() if not k.startswith("__")} == {
            k: v for k, v in want.items() if not k.startswith("__")
        }
    reader.close()


def test_shards_without_offsets_to_seek_are_refused(demo_shards, tmp_path):
    packed = tmp_path / "packed.tar.gz"
    packed.write_bytes(gzip.compress((demo_shards / "train-txt-000000.tar").read_bytes()))
    with pytest.raises(ShardError, match="gzip-compressed"):
        index_shards([str(packed)], SampleStats())
    with pytest.raises(ShardError, match="not a local file"):
        index_shards(["pipe:cat x.tar"], SampleStats())
    with pytest.raises(ShardError, match="cannot read shard"):
        index_shards([str(tmp_path / "gone.tar")], SampleStats())


def test_communities_are_full_and_follow_the_neighbour_graph():
    """Eight well-separated clusters of 24 points: communities of 24 are whole clusters, and of 8 lie in one."""
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(8, 32), dim=1) * 4
    points = torch.nn.functional.normalize(centres.repeat_interleave(24, 0) + torch.randn(192, 32) * 0.3, dim=1)
    cluster = torch.arange(192) // 24
    perm = torch.randperm(192)
    points, cluster = points[perm], cluster[perm]
    neighbors = nearest_neighbors(points, 5)
    assert (cluster[neighbors] == cluster[:, None]).all()
    for size in (24, 8):
        communities, left_over = grow_communities(neighbors, size, seed=1)
        assert left_over == 0
        assert sorted(r for c in communities for r in c) == list(range(192))
        assert [len(c) for c in communities] == [size] * (192 // size)
        pure = sum(len(set(cluster[c].tolist())) == 1 for c in communities)
        assert pure >= len(communities) - 1  # the last one may gather what the others left behind
    assert (
        nearest_neighbors(points, 3, skip=2).tolist()
        == points.mm(points.T).fill_diagonal_(-9).topk(5).indices[:, 2:].tolist()
    )


def test_the_duplicate_guard_keeps_copies_of_one_item_apart():
    """24 items in 8 clusters of 3, each item 8 near-identical copies (false negatives to each other): past the
    copies, the graph links the items of a cluster, and the guard keeps any two copies out of one community."""
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(8, 32), dim=1) * 4
    items = torch.nn.functional.normalize(centres.repeat_interleave(3, 0) + torch.randn(24, 32) * 0.5, dim=1)
    copies = torch.nn.functional.normalize(items.repeat_interleave(8, 0) + torch.randn(192, 32) * 0.01, dim=1)
    item, cluster = torch.arange(192) // 8, torch.arange(192) // 24
    neighbors = nearest_neighbors(copies, 8, skip=7)
    assert (cluster[neighbors] == cluster[:, None]).all() and (item[neighbors] != item[:, None]).all()
    plain, _ = grow_communities(neighbors, 3, seed=0)
    guarded, packed_last = grow_communities(neighbors, 3, seed=0, emb=copies, max_similarity=0.99)
    assert sorted(r for c in guarded for r in c) == list(range(192))

    def with_copies(communities):
        return sum(len(set(item[c].tolist())) < len(c) for c in communities)

    assert with_copies(plain) > 40  # the copies reach each other through the items they all link to
    assert with_copies(guarded) == packed_last == 0
    assert all(len(set(cluster[c].tolist())) == 1 for c in guarded)  # three items of one cluster: hard negatives


def test_each_epoch_packs_every_sample_once_from_few_communities():
    communities = [list(range(i, i + 10)) for i in range(0, 400, 10)]
    of = {r: i for i, c in enumerate(communities) for r in c}
    batches = epoch_batches(communities, seed=0, epoch=0, batch=40)
    assert len(batches) == 10 and sorted(r for b in batches for r in b) == list(range(400))
    assert all(len({of[r] for r in b}) <= 5 for b in batches)  # 4 communities, or 5 where one straddles
    assert batches == epoch_batches(communities, seed=0, epoch=0, batch=40)
    assert batches != epoch_batches(communities, seed=0, epoch=1, batch=40)
    mixed = epoch_batches(communities, seed=0, epoch=0, batch=40, random_rate=0.3)
    assert sorted(r for b in mixed for r in b) == list(range(400))
    spread = [len({of[r] for r in b}) for b in mixed]
    # random batches draw from all over; the packed ones from the communities thinned by that draw (by 30%)
    assert sum(s > 15 for s in spread) == 3 and sum(s <= 8 for s in spread) == 7
    odd = epoch_batches(communities, seed=0, epoch=0, batch=48)  # 400 = 8 x 48 + 16 left out this epoch
    assert len(odd) == 8 and len({r for b in odd for r in b}) == 384


@pytest.mark.parametrize("workers,chunk", [(0, 0), (2, 4)])
def test_the_loader_follows_the_plan_on_every_rank(tiny_model, demo_shards, tmp_path, workers, chunk):
    plan = _plan(demo_shards, tmp_path / "plan.json", model=tiny_model)
    ranks = [
        _loader(tiny_model, demo_shards, tmp_path / "plan.json", workers=workers, rank=r, world=2, chunk=chunk)
        for r in range(2)
    ]
    want = epoch_batches(plan.communities, seed=3, epoch=0, batch=16)
    for i in range(6):
        got = [_keys(next(loader)) for loader in ranks]
        assert all(len(k) == 8 for k in got)
        assert got[0] + got[1] == [plan.index.key[r] for r in want[i]]


def test_a_planned_run_resumes_exactly_and_on_another_layout_without_repeats(tiny_model, demo_shards, tmp_path):
    plan = _plan(demo_shards, tmp_path / "plan.json", model=tiny_model)
    path = tmp_path / "plan.json"
    ref = _loader(tiny_model, demo_shards, path, workers=2, batch_plan_random=0.25)
    [next(ref) for _ in range(3)]
    state = ref.state_dict()
    after_ref = [next(ref) for _ in range(35)]  # into epoch 1
    resumed = _loader(tiny_model, demo_shards, path, workers=2, batch_plan_random=0.25)
    resumed.load_state_dict(state)
    after = [next(resumed) for _ in range(35)]
    assert resumed.epoch == ref.epoch == 1
    assert [_keys(b) for b in after] == [_keys(b) for b in after_ref]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(after, after_ref))

    before = [_loader(tiny_model, demo_shards, path, workers=2, rank=r, world=2) for r in range(2)]
    seen = [k for loader in before for _ in range(3) for k in _keys(next(loader))]
    states = [loader.state_dict() for loader in before]
    one = _loader(tiny_model, demo_shards, path, workers=0)  # 1 rank: batches of 8 where there were 16
    one.load_state_dict(states[0], lambda: states)
    assert one.epoch == 0
    while True:
        keys = _keys(next(one))
        if one.epoch != 0:
            break
        seen += keys
    assert len(seen) == len(set(seen)) and set(seen) <= set(plan.index.key)
    assert len(plan.index) - len(seen) < 8  # what fills no batch of the new layout


def test_a_plan_for_other_or_changed_shards_is_a_clear_error(tiny_model, demo_shards, tmp_path):
    _plan(demo_shards, tmp_path / "other.json", pattern="train-json-{000000..000003}.tar")
    with pytest.raises(ConfigError, match="in no data.train source"):
        _loader(tiny_model, demo_shards, tmp_path / "other.json")
    copy = tmp_path / "copy"
    shutil.copytree(demo_shards, copy)
    _plan(copy, tmp_path / "plan.json")
    with open(copy / "train-txt-000001.tar", "ab") as fh:
        fh.write(bytes(512))
    with pytest.raises(ShardError, match="changed since"):
        _loader(tiny_model, copy, tmp_path / "plan.json")
    (tmp_path / "bad.json").write_text('{"format": "tessera-batch-plan", "version": 1, "shards": []}')
    with pytest.raises(ConfigError, match="damaged"):
        _loader(tiny_model, demo_shards, tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="resampled"):
        from_dict(DataConfig, {"train": "x.tar", "batch_plan": "p.json", "resampled": True}, "data")


def test_plan_batches_embeds_links_and_cuts(tiny_model, demo_shards, tmp_path, capsys):
    save_model(tiny_model, tmp_path / "model", formats=())
    out = tmp_path / "plan.json"
    args = ["--model", str(tmp_path / "model"), "--data", str(demo_shards / SHARDS), "--out", str(out)]
    rc, stdout, err = call_main(main, [*args, "--batch-size", "32", "--per-batch", "4", "--neighbors", "4"], capsys)
    assert rc == 0, err
    plan = BatchPlan.load(out)
    assert sorted(len(c) for c in plan.communities)[1:] == [8] * (len(plan.communities) - 1)
    assert plan.meta["modalities"] == ["image", "text"] and "communities of 8" in stdout
    assert plan.meta["summary"]["skipped"]  # the demo's damaged samples are left out, counted
    summary = plan.meta["summary"]
    assert summary["cohesion"] > summary["random_cohesion"]
    rc, _, err = call_main(main, [*args, "--modalities", "audio"], capsys)
    assert rc == 2 and "error:" in err


@pytest.mark.slow
def test_a_run_trains_on_a_plan_and_resumes_on_it(tiny_model, demo_shards, tmp_path, capsys):
    from .conftest import PY, run_cli
    from .test_train import tiny_run_args

    save_model(tiny_model, tmp_path / "model", formats=())
    plan = tmp_path / "plan.json"
    data = [
        arg
        for src in ("train-txt", "train-json")
        for arg in ("--data", str(demo_shards / f"{src}-{{000000..000003}}.tar"))
    ]
    rc, _, err = call_main(
        main, ["--model", str(tmp_path / "model"), *data, "--out", str(plan), "--batch-size", "16"], capsys
    )
    assert rc == 0, err
    run = ["data.val=[]", f"data.batch_plan={plan}", "data.batch_plan_random=0.25", "train.ckpt_every=2"]
    for steps in (4, 6):  # the second run resumes at the step-4 checkpoint
        args = tiny_run_args(demo_shards, tmp_path / "run", *run, f"train.steps={steps}", "resume=latest")
        proc = run_cli([PY, "-m", "tessera.train.pretrain", *args])
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch plan" in proc.stderr and "resum" in proc.stderr.lower()
    steps = [json.loads(line).get("step") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 6
