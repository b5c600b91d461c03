"""Symile's loss, tiled and through the ring, against its whole-matrix form (fp64): value and every gradient."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tessera.losses import gram_loss, gram_reference, gram_volume, symile_loss, symile_reference

from .test_losses import _assert_close, _spawned, in_gloo_group


def _features(n, d=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    return [F.normalize(base + torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1) for _ in range(k)]


def _permutations(sizes, k, seeds):
    """The shuffles symile_loss draws on each rank (rows of its own), as global row indices."""
    perms = [[[] for _ in range(k - 1)] for _ in range(k)]
    for rank, n in enumerate(sizes):
        g = torch.Generator().manual_seed(seeds[rank])
        offset = sum(sizes[:rank])
        for anchor in range(k):
            for m in range(k - 1):
                perms[anchor][m].append(torch.randperm(n, generator=g) + offset)
    return [[torch.cat(p) for p in anchor] for anchor in perms]


def _grads(fn, features, scale):
    leaves = [t.detach().clone().requires_grad_(True) for t in [*features, scale]]
    loss = fn(leaves[:-1], leaves[-1])
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("n,tile,k", [(2, 1024, 3), (9, 4, 3), (64, 16, 4), (300, 128, 3)])
def test_tiled_symile_equals_the_whole_matrix_form_fp64(n, tile, k):
    features, scale = _features(n, k=k), torch.tensor(12.0, dtype=torch.float64)
    perms = _permutations([n], k, [7])

    def tiled(f, s):
        return symile_loss(f, s, tile_size=tile, generator=torch.Generator().manual_seed(7))

    _assert_close(_grads(tiled, features, scale), _grads(lambda f, s: symile_reference(f, s, perms), features, scale),
                  rtol=1e-10, atol=1e-13)  # fmt: skip


def test_symile_needs_three_modalities_of_one_shape():
    a, b, c = _features(4)
    with pytest.raises(ValueError, match="three or more modalities"):
        symile_loss([a, b], torch.tensor(10.0))
    with pytest.raises(ValueError, match="of one shape"):
        symile_loss([a, b, c[:3]], torch.tensor(10.0))


SIZES = [[5, 4], [700, 650]]


def _scaled_features(loss, sizes):
    seed, scale = {"symile": (2, 9.0), "gram": (3, 6.0)}[loss]
    return _features(sum(sizes), d=64, seed=seed), torch.tensor(scale, dtype=torch.float64)


def _ring_losses(rank, world):
    out = []
    for loss in ("symile", "gram"):
        for sizes in SIZES:
            features, scale = _scaled_features(loss, sizes)
            rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))

            for budget in (None, 2**30):  # the ring, then the blocks gathered by collectives

                def tiled(f, s, loss=loss, budget=budget):
                    if loss == "gram":
                        return gram_loss(f, s, tile_size=256, gather_budget=budget)
                    seeded = torch.Generator().manual_seed(100 + rank)
                    return symile_loss(f, s, tile_size=256, generator=seeded, gather_budget=budget)

                got = _grads(tiled, [f[rows] for f in features], scale)
                dist.all_reduce(got[-1])  # DeepSpeed/DDP average the replicated scale's gradient
                got[-1] /= world
                out.append([t.numpy() for t in got])
    return out


@pytest.mark.multiproc
def test_ring_symile_and_gram_on_every_rank_equal_the_global_whole_matrix_forms():
    world = 2
    results, procs = _spawned(functools.partial(in_gloo_group, _ring_losses), world, 300)
    failed = [r for r in results.values() if isinstance(r, str)]
    assert not failed, "\n".join(failed)
    cases = [(loss, sizes) for loss in ("symile", "gram") for sizes in SIZES]
    for index, (loss, sizes) in enumerate(cases):
        features, scale = _scaled_features(loss, sizes)
        if loss == "symile":
            perms = _permutations(sizes, 3, [100, 101])
            want = _grads(lambda f, s, perms=perms: symile_reference(f, s, perms), features, scale)
        else:
            want = _grads(gram_reference, features, scale)
        for rank, mode in itertools.product(range(world), range(2)):
            got = [torch.from_numpy(x) for x in results[rank][2 * index + mode]]
            rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            expected = [want[0]] + [g[rows] * world for g in want[1:-1]] + [want[-1]]
            _assert_close(
                got, expected, rtol=1e-9 if loss == "gram" else 1e-10, atol=1e-12 if loss == "gram" else 1e-13
            )


def test_the_objective_adds_each_tuples_symile_loss_where_the_batch_carries_the_tuple():
    from tessera.config import from_dict
    from tessera.losses import contrastive_loss_reference
    from tessera.models import ModelConfig, build_model
    from tessera.train.components.objectives import ContrastiveObjective
    from tessera.train.recipes.config import LossConfig

    from .test_joint import JOINT_MODEL

    cfg = {**JOINT_MODEL, "tuples": [["image", "audio", "text"]]}
    model = build_model(from_dict(ModelConfig, cfg, "model"))
    assert set(model.logit_scales) >= {"image__text", "text__audio", "image__audio__text"}
    g = torch.Generator().manual_seed(0)
    sound = model.transforms(False)["audio"]
    batch = {
        "image": torch.randn(6, 3, 32, 32, generator=g),
        "text": torch.randint(1, 400, (6, 16), generator=g),
        "audio": torch.stack([sound((torch.randn(16000, generator=g) * 0.1, 16000)) for _ in range(6)]),
    }
    objective = ContrastiveObjective(model.pairs, LossConfig(higher_order="symile", higher_order_weight=0.5), None,
                                     cfg["tuples"])  # fmt: skip
    out = model(batch)
    torch.manual_seed(5)
    losses, report = objective.loss(out, batch)
    torch.manual_seed(5)  # the shuffles the objective drew, in its order
    perms = [[torch.randperm(6) for _ in range(2)] for _ in range(3)]
    f, s = out["features"], out["logit_scale"]
    symile = symile_reference([f["image"], f["audio"], f["text"]], s["image__audio__text"], perms)
    assert losses["loss/image-audio-text"].item() == pytest.approx(symile.item(), rel=1e-5)
    pairs = [contrastive_loss_reference(f[a], f[b], s[f"{a}__{b}"]) for a, b in (("image", "text"), ("text", "audio"))]
    assert losses["loss"].item() == pytest.approx(sum(p.item() for p in pairs) + 0.5 * symile.item(), rel=1e-5)
    assert "temperature/image-audio-text" in report
    # a batch without audio has no tuple loss
    losses, _ = objective(model, {"image": batch["image"], "text": batch["text"]})
    assert set(losses) == {"loss/image-text", "loss"}


@pytest.mark.parametrize(
    "over,message",
    [
        ({"loss": {"higher_order": "symile"}}, "set model.tuples"),
        ({"model_tuples": [["image", "audio", "text"]]}, "their temperatures would never train"),
        ({"model_tuples": [["image", "text"]]}, "is not three or more different modalities"),
        ({"model_tuples": [["image", "text", "video"]], "loss": {"higher_order": "symile"}}, "'video' has no tower"),
    ],
)
def test_bad_tuple_configs_say_what_is_wrong(over, message):
    from tessera.config import ConfigError, from_dict
    from tessera.train.recipes.runs import PretrainConfig

    from .test_joint import JOINT_MODEL

    model = {**JOINT_MODEL, "tuples": over.pop("model_tuples", [])}
    with pytest.raises(ConfigError, match=message):
        from_dict(PretrainConfig, {"model": model, **over}, "")


@pytest.mark.parametrize("n,tile,k", [(2, 1024, 3), (9, 4, 3), (64, 16, 3), (40, 16, 4), (300, 128, 3)])
def test_tiled_gram_equals_the_whole_matrix_form_fp64(n, tile, k):
    features, scale = _features(n, k=k, seed=1), torch.tensor(8.0, dtype=torch.float64)
    got = _grads(lambda f, s: gram_loss(f, s, tile_size=tile), features, scale)
    _assert_close(got, _grads(gram_reference, features, scale), rtol=1e-9, atol=1e-12)


def test_gram_volume_is_the_parallelotopes_and_zero_for_aligned_vectors():
    e = torch.eye(3, dtype=torch.float64)
    assert gram_volume(e @ e.T).item() == pytest.approx(1.0)  # the unit cube
    v = torch.stack([e[0], e[0], F.normalize(e[0] + e[1], dim=0)])
    assert gram_volume(v @ v.T).item() == pytest.approx(0.0, abs=1e-4)  # two coincide: no volume (eps aside)


def test_the_objective_scores_a_tuple_by_gram_with_its_first_modality_as_the_anchor():
    from tessera.config import from_dict
    from tessera.models import ModelConfig, build_model
    from tessera.train.components.objectives import ContrastiveObjective
    from tessera.train.recipes.config import LossConfig

    from .test_joint import JOINT_MODEL

    tuples = [["text", "image", "audio"]]
    model = build_model(from_dict(ModelConfig, {**JOINT_MODEL, "tuples": tuples}, "model"))
    g = torch.Generator().manual_seed(1)
    sound = model.transforms(False)["audio"]
    batch = {
        "image": torch.randn(5, 3, 32, 32, generator=g),
        "text": torch.randint(1, 400, (5, 16), generator=g),
        "audio": torch.stack([sound((torch.randn(16000, generator=g) * 0.1, 16000)) for _ in range(5)]),
    }
    out = model(batch)
    losses, report = ContrastiveObjective(model.pairs, LossConfig(higher_order="gram"), None, tuples).loss(out, batch)
    f = out["features"]
    want = gram_reference([f["text"], f["image"], f["audio"]], out["logit_scale"]["text__image__audio"])
    assert losses["loss/text-image-audio"].item() == pytest.approx(want.item(), rel=1e-5)
    assert "temperature/text-image-audio" in report
