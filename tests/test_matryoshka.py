"""Matryoshka losses from shared tiles against one full-matrix reference per prefix (fp64), in value and every
gradient, on one process and across 2 gloo ranks under NCCL's point-to-point rules."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.distributed as dist

from tessera.losses import contrastive_loss, matryoshka_losses
from tessera.models import truncate_embeddings as truncate

from .test_losses import OPTIONS, _assert_close, _labels, _params, _spawned, in_gloo_group

WEIGHTS = torch.tensor([0.7, 1.3, 0.4, 2.0], dtype=torch.float64)


def _raw_features(n, d, seed=0):
    """Unnormalised features: the loss renormalises every prefix itself."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    return a, 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64) + 0.6 * a


def _weighted(dims):
    """sum_k w_k L_k with unequal weights, so that backward sees a different upstream gradient for every prefix."""
    w = WEIGHTS[: len(dims)]

    def loss(a, b, scale, bias, **kw):
        return (matryoshka_losses(a, b, scale, bias, dims=dims, **kw) * w).sum()

    return loss


def _grads(fn, a, b, scale, bias, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (a, b, scale) + ((bias,) if bias is not None else ())]
    loss = fn(*leaves[:3], leaves[3] if bias is not None else None, **kw)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize(
    "n,tile,dims", [(1, 1024, (3, 16)), (7, 3, (2, 5, 16)), (64, 16, (4, 8, 12, 16)), (300, 64, (16,))]
)
@pytest.mark.parametrize("kind,use_labels,dcl,smoothing", OPTIONS)
def test_every_prefix_and_gradient_equals_its_own_reference_fp64(n, tile, dims, kind, use_labels, dcl, smoothing):
    if dcl and n == 1:
        pytest.skip("DCL needs a negative")
    a, b = _raw_features(n, 16)
    scale, bias = _params(kind, torch.float64)
    kw = dict(kind=kind, labels=_labels(n) if use_labels else None, dcl=dcl, label_smoothing=smoothing)
    got = _grads(_weighted(dims), a, b, scale, bias, tile_size=tile, **kw)
    want = _grads(_weighted(dims), a, b, scale, bias, impl="full", **kw)
    _assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_each_prefix_is_the_plain_loss_of_the_truncated_features():
    a, b = _raw_features(50, 32, seed=4)
    scale = torch.tensor(20.0, dtype=torch.float64)
    got = matryoshka_losses(a, b, scale, dims=(8, 16, 32), tile_size=16)
    want = torch.stack([contrastive_loss(truncate(a, d), truncate(b, d), scale) for d in (8, 16, 32)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got[0] > got[2], "8 of 32 correlated features should separate pairs worse than all 32"


def test_fp32_features_within_1e5_of_fp64():
    a, b = _raw_features(200, 64, seed=2)
    scale = torch.tensor(50.0, dtype=torch.float64)
    dims = (8, 16, 32, 64)
    want = _grads(_weighted(dims), a, b, scale, None, impl="full")
    got = _grads(_weighted(dims), a.float(), b.float(), scale.float(), None, tile_size=48)
    _assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_truncate_renormalises_the_prefix():
    x = torch.randn(5, 64)
    t = truncate(x, 16)
    assert t.shape == (5, 16)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(t, x[:, :16] / x[:, :16].norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("dims", [(), (8, 4, 16), (8, 8, 16), (0, 16), (8, 12)])
def test_bad_widths_say_what_is_wrong(dims):
    a, b = _raw_features(4, 16)
    with pytest.raises(ValueError, match="increase strictly and end at the embedding width 16"):
        matryoshka_losses(a, b, torch.tensor(10.0, dtype=torch.float64), dims=dims)


RING_CASES = [  # (kind, labels, dcl, smoothing), rows per rank, tile, dims
    (("infonce", False, False, 0.0), [5, 5], 3, (2, 6, 8)),
    (("infonce", True, True, 0.0), [4, 1], 1024, (4, 8)),
    (("infonce", False, False, 0.1), [6, 3], 2, (1, 3, 8)),
    (("siglip", True, False, 0.0), [4, 6], 4, (5, 8)),
    (("siglip", False, False, 0.0), [1200, 1100], 512, (64, 128, 256, 512)),
]


def _case(case, seed=5):
    (kind, use_labels, dcl, smoothing), sizes, _, dims = case
    a, b = _raw_features(sum(sizes), dims[-1], seed)
    scale, bias = _params(kind, torch.float64)
    kw = dict(kind=kind, labels=_labels(sum(sizes), seed) if use_labels else None, dcl=dcl, label_smoothing=smoothing)
    return (a, b, scale, bias), kw


def _ring_losses(rank, world):
    out = []
    for case in RING_CASES:
        sizes, tile, dims = case[1:]
        (a, b, scale, bias), kw = _case(case)
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        if kw["labels"] is not None:
            kw["labels"] = kw["labels"][rows]
        for budget in GATHER_BUDGETS:
            got = _grads(_weighted(dims), a[rows], b[rows], scale, bias, tile_size=tile, gather_budget=budget, **kw)
            for i in range(3, len(got)):  # DeepSpeed/DDP average the replicated scale's and bias's gradients
                dist.all_reduce(got[i])
                got[i] /= world
            out.append([t.numpy() for t in got])
    return out


GATHER_BUDGETS = (None, 2**30)  # the ring, then the blocks gathered by collectives


@pytest.mark.multiproc
def test_ring_matryoshka_on_every_rank_equals_the_global_references():
    """Every option, unequal sizes, and a 4.5 MB column block, through the ring under NCCL's rules and gathered."""
    world = 2
    results, procs = _spawned(functools.partial(in_gloo_group, _ring_losses), world, 300)
    failed = [r for r in results.values() if isinstance(r, str)]
    assert not failed, "\n".join(failed)
    assert [p.exitcode for p in procs] == [0] * world
    for index, case in enumerate(RING_CASES):
        sizes, dims = case[1], case[3]
        args, kw = _case(case)
        want = _grads(_weighted(dims), *args, impl="full", **kw)
        for rank in range(world):
            for mode in range(len(GATHER_BUDGETS)):
                got = [torch.from_numpy(x) for x in results[rank][index * len(GATHER_BUDGETS) + mode]]
                rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
                expected = [want[0], want[1][rows] * world, want[2][rows] * world] + want[3:]
                _assert_close(got, expected, rtol=1e-10, atol=1e-13)


def test_objective_weighs_every_prefix_of_every_pair_and_reports_each():
    from tessera.config import from_dict
    from tessera.models import ModelConfig, build_model
    from tessera.train.components.objectives import ContrastiveObjective
    from tessera.train.recipes.config import LossConfig

    from .conftest import TINY_MODEL

    model = build_model(from_dict(ModelConfig, TINY_MODEL, "model"))  # embed_dim 32
    torch.manual_seed(0)
    batch = {"image": torch.randn(10, 3, 32, 32), "text": torch.randint(1, 400, (10, 16))}
    cfg = LossConfig(tile_size=3, matryoshka=[8, 16], matryoshka_weights=[0.5, 0.25, 1.0])
    losses, report = ContrastiveObjective(model.pairs, cfg)(model, batch)
    out = model(batch)
    a, b, s = out["features"]["image"], out["features"]["text"], out["logit_scale"]["image__text"]
    each = {d: contrastive_loss(truncate(a, d), truncate(b, d), s).item() for d in (8, 16, 32)}
    for d, want in each.items():
        assert report[f"loss/image-text@{d}"].item() == pytest.approx(want, rel=1e-5)
    weighted = 0.5 * each[8] + 0.25 * each[16] + each[32]
    assert losses["loss"].item() == pytest.approx(weighted, rel=1e-5)
    # default weights: the mean over the prefixes, on the plain loss's scale
    losses, _ = ContrastiveObjective(model.pairs, LossConfig(matryoshka=[8, 16]))(model, batch)
    assert losses["loss"].item() == pytest.approx(sum(each.values()) / 3, rel=1e-5)


@pytest.mark.parametrize(
    "loss,message",
    [
        ({"matryoshka": [16, 8]}, "increasing positive widths"),
        ({"matryoshka": [8, 64]}, r"must not exceed model.embed_dim \(32\)"),
        ({"matryoshka": [8, 16], "matryoshka_weights": [1, 1]}, "one weight per width, the full 32 included: 3"),
        ({"matryoshka_weights": [1.0]}, "loss.matryoshka lists no widths"),
        ({"matryoshka": [8], "matryoshka_weights": [0, 0]}, "not all zero"),
    ],
)
def test_bad_matryoshka_configs_say_what_is_wrong(loss, message):
    from tessera.config import ConfigError, from_dict
    from tessera.train.recipes.runs import PretrainConfig

    from .conftest import TINY_MODEL

    with pytest.raises(ConfigError, match=message):
        from_dict(PretrainConfig, {"model": TINY_MODEL, "loss": loss}, "")


@pytest.mark.parametrize("head", ["identity", "linear"])
def test_truncated_exports_serve_the_renormalised_prefix_in_every_format(tmp_path, capsys, head):
    """open_clip, transformers and Tessera exports at a smaller width embed as the full model's prefix renormalised
    (identity heads: the slice folds into the towers' projections; linear heads: their first rows do)."""
    import open_clip
    from transformers import CLIPModel

    import tessera
    from tessera.models import load_model, save_model
    from tessera.train.cli import main as cli

    from .conftest import TINY_MODEL, call_main
    from .test_interop import CAPTIONS, _embed, _images, _trained_like

    towers = TINY_MODEL["towers"]
    if head == "linear":  # encoders 48 and 40 wide, linear heads to the 32-wide space
        towers = {"image": {**towers["image"], "output_dim": 48}, "text": {**towers["text"], "output_dim": 40}}
    model = _trained_like({**TINY_MODEL, "towers": towers})
    src = save_model(model, tmp_path / "model", formats=())
    images = _images()
    full_img, full_txt = _embed(model, images, CAPTIONS)
    want_img, want_txt = truncate(full_img, 8), truncate(full_txt, 8)

    for fmt in ("open_clip", "hf", "tessera"):
        rc, out, err = call_main(
            cli, ["export", "--format", fmt, str(src), "--truncate-dim", "8", "--out", str(tmp_path / fmt)], capsys
        )
        assert rc == 0, err
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'open_clip'}")
    tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'open_clip'}")(CAPTIONS)
    with torch.no_grad():
        z_img = oc.eval().encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        z_txt = oc.encode_text(tokens, normalize=True)
        hf = CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
        hf_txt = torch.nn.functional.normalize(hf.get_text_features(input_ids=tokens).pooler_output, dim=-1)
    assert z_img.shape == (2, 8) and (z_img - want_img).abs().max() < 1e-6 and (z_txt - want_txt).abs().max() < 1e-6
    assert hf.config.projection_dim == 8 and (hf_txt - want_txt).abs().max() < 1e-5
    served = load_model(tmp_path / "tessera")
    assert served.cfg.truncate_dim == 8 and (tmp_path / "tessera" / "open_clip").is_dir()
    got_img, got_txt = _embed(served, images, CAPTIONS)
    # the prefix of the raw embedding, renormalised: the same as of the normalised one, to rounding
    assert (got_img - want_img).abs().max() < 1e-6 and (got_txt - want_txt).abs().max() < 1e-6
    # the Python API truncates a full export the same way
    api = tessera.load(src, device="cpu", truncate_dim=8)
    assert (api.embed(texts=CAPTIONS) - want_txt).abs().max() < 1e-6

    rc, _, err = call_main(cli, ["export", "--format", "open_clip", str(src), "--truncate-dim", "64"], capsys)
    assert rc == 2 and "truncate_dim must be in [1, embed_dim=32]" in err and "Traceback" not in err, err


@pytest.mark.slow
def test_matryoshka_pretraining_logs_and_evaluates_every_prefix(demo_shards, tmp_path, capsys):
    """The CLI trains with loss.matryoshka (through the two-pass step), logs each prefix's loss, evaluates retrieval
    and zero-shot at each prefix, and `tessera eval retrieval --truncate-dim` on the export agrees with it."""
    from tessera.eval.retrieval import main as retrieval_main

    from .conftest import PY, run_cli
    from .test_train import tiny_run_args

    out = tmp_path / "run"
    args = tiny_run_args(
        demo_shards,
        out,
        "train.steps=4",
        "train.chunk_size=8",
        "train.precision=fp32",
        "loss.matryoshka=[8, 16]",
        f"eval.classes={demo_shards}/classes.json",
    )
    proc = run_cli([PY, "-m", "tessera.train.pretrain", *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"][-1]
    prefixes = [train[f"loss/image-text@{w}"] for w in (8, 16, 32)]
    assert train["loss"] == pytest.approx(sum(prefixes) / 3, rel=1e-4)
    record = [x for x in lines if x["kind"] == "eval"][-1]
    assert set(record["widths"]) == {"8", "16"} and set(record["zeroshot"]["image"]["widths"]) == {"8", "16"}
    assert "image_to_text @8" in proc.stdout and "@16: acc1" in proc.stdout

    result = tmp_path / "at8.json"
    data = f"{demo_shards}/val-000000.tar"
    argv = ["--model", str(out / "model"), "--data", data, "--truncate-dim", "8", "--out", str(result)]
    assert retrieval_main(argv) == 0
    capsys.readouterr()
    at8 = json.loads(result.read_text())["metrics"]
    for key, value in record["widths"]["8"].items():
        assert at8[key] == pytest.approx(value, abs=1e-6), key
