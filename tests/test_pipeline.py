"""The training stream: bad-sample accounting, limits, partitioning across ranks, mixing, exact resume."""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter

import pytest
import torch

from tessera.config import from_dict
from tessera.data import DataConfig, DataQualityError, TrainLoader, eval_batches
from tessera.data.make_shards import write_shards
from tessera.models import build_model

from .conftest import jpeg_bytes


@pytest.fixture(scope="module")
def tiny_model():
    from tessera.models import ModelConfig

    from .conftest import TINY_MODEL

    torch.manual_seed(0)
    return build_model(from_dict(ModelConfig, TINY_MODEL, "model"))


def _loader(model, train, batch_size=16, workers=0, rank=0, world=1, seed=0, **data):
    cfg = from_dict(DataConfig, {"train": train, "num_workers": workers, **data}, "data")
    return TrainLoader(
        cfg, model.transforms(True), model.collators(), model.modalities, batch_size, seed=seed, rank=rank, world=world
    )


def _keys(batches):
    return [k for b in batches for k in b["__key__"]]


def test_batches_are_dicts_keyed_by_modality(tiny_model, demo_shards):
    loader = _loader(tiny_model, str(demo_shards / "train-txt-{000000..000003}.tar"))
    batch = next(loader)
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (16, 16) and batch["text"].dtype == torch.long
    assert len(batch["__key__"]) == 16


def test_demo_damage_is_counted_by_reason_and_training_continues(tiny_model, demo_shards):
    loader = _loader(
        tiny_model, str(demo_shards / "train-txt-{000000..000003}.tar"), shard_shuffle=False, shuffle_buffer=0
    )
    batches = list(itertools.islice(loader, 14))  # 224 good samples of 240: one whole epoch
    assert loader.epoch == 0
    stats = loader.stats
    assert dict(stats.skipped) == {"undecodable_image": 1, "empty_text": 1, "missing_image": 1, "duplicate_key": 1}
    assert stats.events["rejected_pickle_member"] == 1
    keys = _keys(batches)
    assert len(keys) == len(set(keys)) == 224
    assert not any(k in keys for k in ("bad0000001", "bad0000002"))
    assert "bad0000004" in keys  # its pickle member was dropped, the sample itself is fine


def _bad_shard(path, n_good, n_bad):
    def samples():
        for i in range(n_good):
            yield f"g{i:05d}", {"jpg": jpeg_bytes(), "txt": b"a red thing"}
        for i in range(n_bad):
            yield f"b{i:05d}", {"jpg": b"garbage", "txt": b"broken"}

    write_shards(samples(), path, "bad", 10_000)
    return str(path / "bad-000000.tar")


def test_too_many_bad_samples_stop_the_run_with_a_clear_error(tiny_model, tmp_path):
    shard = _bad_shard(tmp_path, 40, 60)
    loader = _loader(tiny_model, shard, batch_size=8, max_bad_fraction=0.2, bad_check_after=50)
    with pytest.raises(DataQualityError, match=r"above data.max_bad_fraction=0.2.*undecodable_image=") as err:
        for _ in range(100):
            next(loader)
    # where they are: counts by shard, and the first samples by shard, key and reason
    assert re.search(rf"by shard: {re.escape(shard)} \(\d+\)", str(err.value))
    assert re.search(rf"e\.g\. {re.escape(shard)}:b\d{{5}} \(undecodable_image\)", str(err.value))


def test_all_bad_data_fails_instead_of_hanging(tiny_model, tmp_path):
    shard = _bad_shard(tmp_path, 0, 30)
    loader = _loader(tiny_model, shard, batch_size=8, max_bad_fraction=1.0)
    with pytest.raises(DataQualityError, match="produced no batch"):
        next(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_read_disjoint_data_even_with_fewer_shards_than_slots(tiny_model, demo_shards, workers):
    # 4 shards, 3 ranks x 2 workers: the loaders adapt instead of leaving a slot empty
    spec = str(demo_shards / "train-txt-{000000..000003}.tar")
    seen = []
    for rank in range(3):
        loader = _loader(tiny_model, spec, batch_size=8, workers=workers, rank=rank, world=3)
        n = 0
        while True:
            batch = next(loader)
            if loader.epoch > 0:
                break
            seen.extend(batch["__key__"])
            n += 1
        assert n > 0
    counts = Counter(seen)
    assert max(counts.values()) == 1
    assert len(counts) > 150  # the rest are bad samples and each rank's dropped partial batch


def test_order_is_seeded_by_seed_and_epoch(tiny_model, demo_shards):
    spec = str(demo_shards / "train-txt-{000000..000003}.tar")
    a = _keys(itertools.islice(_loader(tiny_model, spec, seed=1), 3))
    b = _keys(itertools.islice(_loader(tiny_model, spec, seed=1), 3))
    c = _keys(itertools.islice(_loader(tiny_model, spec, seed=2), 3))
    assert a == b and a != c
    loader = _loader(tiny_model, spec, seed=1)
    first_epoch = [next(loader)["__key__"] for _ in range(14)]
    second_epoch = [next(loader)["__key__"] for _ in range(14)]
    assert loader.epoch == 1 and first_epoch != second_epoch


def test_sources_mix_by_weight(tiny_model, demo_shards):
    loader = _loader(
        tiny_model,
        [
            {"shards": str(demo_shards / "train-txt-{000000..000003}.tar"), "weight": 3},
            {"shards": str(demo_shards / "train-json-{000000..000003}.tar"), "weight": 1},
        ],
        batch_size=20,
        resampled=True,
        train_num_samples=10_000,
    )
    keys = _keys(itertools.islice(loader, 40))
    share = sum(k.startswith("j") for k in keys) / len(keys)
    assert 0.18 < share < 0.32  # expect 0.25


def test_resampled_epochs_have_train_num_samples(tiny_model, demo_shards):
    loader = _loader(
        tiny_model,
        str(demo_shards / "train-txt-{000000..000003}.tar"),
        batch_size=10,
        workers=2,
        resampled=True,
        train_num_samples=100,
    )
    batches = []
    while loader.epoch == 0:
        batches.append(next(loader))
    assert len(batches) == 10 + 1  # 10 batches in epoch 0, then the first of epoch 1


@pytest.mark.parametrize("workers,resampled", [(0, False), (2, False), (2, True)])
def test_resume_from_state_dict_continues_exactly(tiny_model, demo_shards, workers, resampled):
    spec = [
        {"shards": str(demo_shards / "train-txt-{000000..000003}.tar"), "weight": 2},
        {"shards": str(demo_shards / "train-json-{000000..000003}.tar"), "weight": 1},
    ]
    extra = {"resampled": True, "train_num_samples": 200} if resampled else {}
    ref = _loader(tiny_model, spec, workers=workers, seed=3, **extra)
    before = [next(ref) for _ in range(5)]
    state = ref.state_dict()
    after_ref = [next(ref) for _ in range(20)]  # runs into the next epoch
    epochs_ref = ref.epoch

    resumed = _loader(tiny_model, spec, workers=workers, seed=3, **extra)
    resumed.load_state_dict(state)
    after = [next(resumed) for _ in range(20)]
    assert resumed.epoch == epochs_ref >= 1
    assert _keys(after) == _keys(after_ref)
    for x, y in zip(after, after_ref):  # augmentation too: crops and caption choices replay exactly
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])
    assert resumed.stats.seen == ref.stats.seen
    if not resampled:
        assert not set(_keys(before)) & set(_keys(after[:5]))


def test_eval_batches_are_deterministic_and_keep_the_tail(tiny_model, demo_shards):
    model = tiny_model
    args = (model.transforms(False), model.collators(), model.modalities, 100)
    from tessera.data import SourceConfig

    src = [SourceConfig(str(demo_shards / "val-000000.tar"))]
    a = list(eval_batches(src, *args))
    b = list(eval_batches(src, *args, num_workers=1))
    assert [len(x["__key__"]) for x in a] == [100, 100, 100, 100, 80]
    assert _keys(a) == _keys(b) == sorted(_keys(a))
    assert torch.equal(a[0]["image"], b[0]["image"])


def test_eval_batches_read_every_sample_of_every_source(tiny_model, demo_shards):
    """Held-out sources of different sizes are read in full, one after the other (not mixed until one runs out)."""
    from tessera.data import SourceConfig

    args = (tiny_model.transforms(False), tiny_model.collators(), tiny_model.modalities, 64)
    big, small = (
        SourceConfig(str(demo_shards / "val-000000.tar")),
        SourceConfig(str(demo_shards / "train-txt-000001.tar")),
    )
    keys = _keys(eval_batches([small, big], *args))
    assert len(keys) == len(set(keys)) == 60 + 480
    assert keys[:60] == _keys(eval_batches([small], *args))


def _epoch_keys(loader, epoch: int) -> tuple[list[str], list[str]]:
    """The keys of the batches `loader` hands out while it is in `epoch`, and of the batch that opens the next."""
    keys = []
    while True:
        batch = next(loader)
        if loader.epoch != epoch:
            return keys, batch["__key__"]
        keys += batch["__key__"]


def _eval_args(model) -> tuple:
    return model.transforms(False), model.collators(), model.modalities, 100


@pytest.mark.parametrize("saved,resumed", [((2, 2), (1, 0)), ((1, 0), (2, 2))], ids=["4to1", "1to4"])
def test_an_epoch_continues_on_another_layout_with_no_sample_repeated_or_lost(tiny_model, demo_shards, saved, resumed):
    """Saved on `saved` (ranks, workers) mid-epoch, resumed on `resumed`: the epoch's batches together hold every
    good sample once, but for the partial batches each stream drops at its end."""
    from tessera.data import SourceConfig

    shards = str(demo_shards / "train-txt-{000000..000003}.tar")
    good = set(_keys(eval_batches([SourceConfig(shards)], *_eval_args(tiny_model))))
    (w0, k0), (w1, k1) = saved, resumed
    before = [_loader(tiny_model, shards, workers=k0, rank=r, world=w0, seed=5) for r in range(w0)]
    seen = [k for loader in before for k in _keys([next(loader) for _ in range(2)])]
    states = [loader.state_dict() for loader in before]
    after = [_loader(tiny_model, shards, workers=k1, rank=r, world=w1, seed=5) for r in range(w1)]
    for r, loader in enumerate(after):
        loader.load_state_dict(states[min(r, w0 - 1)], lambda: states)
        assert loader.epoch == 0
    seen += [k for loader in after for k in _epoch_keys(loader, 0)[0]]
    dropped = sum(loader.stats.events["dropped_partial_batch_samples"] for loader in after)
    assert len(seen) == len(set(seen)) and set(seen) <= good
    assert len(good - set(seen)) == dropped < 16 * max(1, k1) * w1


def test_ranks_in_different_epochs_resume_on_one_rank_without_repeats(tiny_model, demo_shards):
    """Rank 0 had finished epoch 0 and begun epoch 1 while rank 1 was still in epoch 0: resumed on one rank, epoch 0
    gives only what rank 1 had left, and epoch 1 leaves out what rank 0 had taken of it."""
    from tessera.data import SourceConfig

    shards = str(demo_shards / "train-txt-{000000..000003}.tar")
    good = set(_keys(eval_batches([SourceConfig(shards)], *_eval_args(tiny_model))))
    ranks = [_loader(tiny_model, shards, rank=r, world=2, seed=5) for r in range(2)]
    epoch0, epoch1 = _epoch_keys(ranks[0], 0)  # rank 0's whole epoch 0, and the first batch of its epoch 1
    epoch0 += _keys([next(ranks[1]) for _ in range(3)])
    states = [loader.state_dict() for loader in ranks]
    assert [st["epoch"] for st in states] == [1, 0]
    one = _loader(tiny_model, shards, seed=5)
    one.load_state_dict(states[0], lambda: states)
    assert one.epoch == 0
    rest, _ = _epoch_keys(one, 0)
    epoch0 += rest
    dropped = one.stats.events["dropped_partial_batch_samples"]  # its counts began from rank 0's, which had some
    assert len(epoch0) == len(set(epoch0)) and len(good - set(epoch0)) == dropped
    assert not set(epoch1) & set(_epoch_keys(one, 1)[0])


class _SlowInWorker0:
    """A transform that takes longer in loader worker 0, as a worker on a busy core would."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, value):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is not None and info.id == 0:
            time.sleep(0.01)
        return self.transform(value)


def test_the_batch_order_does_not_depend_on_how_fast_each_worker_is(tiny_model, demo_shards):
    """Results and resume do not depend on machine load: the loader hands batches out in its fixed rotation over
    the workers (torch's in-order delivery underneath), so a lagging worker changes timing, never the order."""
    spec = [
        {"shards": str(demo_shards / "train-txt-{000000..000003}.tar"), "weight": 2},
        {"shards": str(demo_shards / "train-json-{000000..000003}.tar"), "weight": 1},
    ]
    cfg = from_dict(DataConfig, {"train": spec, "num_workers": 2}, "data")
    orders = []
    for slow in (False, True):
        transforms = dict(tiny_model.transforms(True))
        if slow:
            transforms["image"] = _SlowInWorker0(transforms["image"])
        loader = TrainLoader(cfg, transforms, tiny_model.collators(), tiny_model.modalities, 16, seed=1)
        batches = [next(loader) for _ in range(12)]
        orders.append((_keys(batches), loader.state_dict()["cursors"]))
    assert orders[0] == orders[1]
