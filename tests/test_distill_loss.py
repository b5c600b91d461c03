"""The tiled distillation loss: exact against whole-matrix references in fp64 (every gradient, the student's
temperature and bias included), on one process and on 2 and 3 gloo ranks round the ring, and open_clip's
DistillClipLoss up to the teacher's entropy."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import DistillClipLoss

from tessera.losses import distill_loss, distill_reference
from tests.test_losses import _assert_close, _spawned, in_gloo_group


def _case(n: int, kind: str, d: int = 8, e: int = 12, seed: int = 0):
    """Student features (D=d) and teacher features of another width (E=e), with their scales and biases."""
    g = torch.Generator().manual_seed(seed)

    def features(width):
        return F.normalize(torch.randn(n, width, generator=g, dtype=torch.float64), dim=-1)

    a, b, ta, tb = features(d), features(d), features(e), features(e)
    scale = torch.tensor(11.0, dtype=torch.float64)
    teacher_scale = torch.tensor(23.0, dtype=torch.float64)
    bias = teacher_bias = None
    if kind == "siglip":
        bias, teacher_bias = torch.tensor(-4.0, dtype=torch.float64), torch.tensor(-6.5, dtype=torch.float64)
    return (a, b, scale, ta, tb, teacher_scale, bias, teacher_bias)


def _loss_and_grads(fn, a, b, scale, ta, tb, teacher_scale, bias, teacher_bias, **kw):
    leaves = [x.clone().requires_grad_() for x in (a, b, scale) + (() if bias is None else (bias,))]
    student_bias = leaves[3] if bias is not None else None
    loss = fn(leaves[0], leaves[1], leaves[2], ta, tb, teacher_scale, student_bias, teacher_bias, **kw)
    loss.backward()
    return [loss.detach()] + [x.grad for x in leaves]


def _reference(a, b, scale, ta, tb, teacher_scale, bias, teacher_bias):
    return distill_reference(a, b, scale, ta, tb, teacher_scale, bias, teacher_bias)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("n, tile", [(1, 4), (7, 3), (37, 5), (64, 64), (50, 1024)])
def test_tiled_equals_whole_matrix_reference_fp64(kind, n, tile):
    args = _case(n, kind, seed=n)
    got = _loss_and_grads(distill_loss, *args, kind=kind, tile_size=tile)
    want = _loss_and_grads(_reference, *args)
    _assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_fp32_within_1e5_of_fp64_and_zero_where_the_student_is_the_teacher():
    a, b, scale, ta, tb, teacher_scale, _, _ = _case(300, "infonce", seed=4)
    single = [x.float() for x in (a, b, scale, ta, tb, teacher_scale)]
    got = _loss_and_grads(distill_loss, *single, None, None, tile_size=64)
    want = _loss_and_grads(_reference, a, b, scale, ta, tb, teacher_scale, None, None)
    _assert_close([x.double() for x in got], want, rtol=1e-5, atol=1e-6)
    # a student with the teacher's features and temperature has nothing to learn: KL 0, every gradient 0
    same = _loss_and_grads(distill_loss, ta, tb, teacher_scale, ta, tb, teacher_scale, None, None, tile_size=64)
    _assert_close(same, [torch.zeros_like(x) for x in same], rtol=0, atol=1e-12)


def test_matches_open_clip_distillcliploss_up_to_the_teachers_entropy():
    """DistillClipLoss takes the cross-entropy H(p_T, p_S) = KL + H(p_T): the same gradients, a value that differs
    by the teacher's entropy."""
    a, b, scale, ta, tb, teacher_scale, _, _ = _case(40, "infonce", e=8, seed=5)
    ours = _loss_and_grads(distill_loss, a, b, scale, ta, tb, teacher_scale, None, None, tile_size=16)

    def open_clip_form(a, b, scale, ta, tb, teacher_scale, *_):
        return DistillClipLoss()(a, b, scale, ta, tb, teacher_scale)[1]

    theirs = _loss_and_grads(open_clip_form, a, b, scale, ta, tb, teacher_scale, None, None)
    t = teacher_scale * ta @ tb.T
    entropy = 0.5 * sum(-(x.softmax(1) * x.log_softmax(1)).sum(1).mean() for x in (t, t.T))
    _assert_close([ours[0] + entropy, *ours[1:]], theirs, rtol=1e-10, atol=1e-13)


def test_bad_arguments_say_what_is_wrong():
    a, b, scale, ta, tb, teacher_scale, _, _ = _case(4, "infonce")
    with pytest.raises(ValueError, match="not one of"):
        distill_loss(a, b, scale, ta, tb, teacher_scale, kind="kl")
    with pytest.raises(ValueError, match="teacher features must be two"):
        distill_loss(a, b, scale, ta[:3], tb[:3], teacher_scale)
    with pytest.raises(ValueError, match="siglip form needs"):
        distill_loss(a, b, scale, ta, tb, teacher_scale, kind="siglip")


# Across ranks: every case on 2 and 3 gloo ranks, under NCCL's point-to-point rules (tests.test_losses's harness)
RING_CASES = [
    (kind, sizes, impl)
    for kind in ("infonce", "siglip")
    for sizes, impl in (([5, 3, 6], "ring"), ([4, 1, 6], "gathered"), ([5, 5, 5], "full"))
]


def _ring_losses(rank, world):
    out = []
    for kind, sizes, impl in RING_CASES:
        n = sizes[:world]
        args = _case(sum(n), kind, seed=sum(n))
        rows = slice(sum(n[:rank]), sum(n[: rank + 1]))
        local = [x[rows] if i in (0, 1, 3, 4) else x for i, x in enumerate(args)]
        how = dict(impl="full") if impl == "full" else dict(gather_budget=None if impl == "ring" else 2**30)
        got = _loss_and_grads(distill_loss, *local, kind=kind, tile_size=2, **how)  # several tiles per block
        for g in got[3:]:  # DeepSpeed/DDP average the replicated scale's and bias's gradients over the ranks
            dist.all_reduce(g)
            g /= world
        out.append([t.numpy() for t in got])
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 3])
def test_ring_distillation_on_every_rank_equals_the_global_whole_matrix_form(world):
    results, procs = _spawned(functools.partial(in_gloo_group, _ring_losses), world, 300)
    failed = [r for r in results.values() if isinstance(r, str)]
    assert not failed, "\n".join(failed)
    assert [p.exitcode for p in procs] == [0] * world
    for index, (kind, sizes, _) in enumerate(RING_CASES):
        n = sizes[:world]
        want = _loss_and_grads(_reference, *_case(sum(n), kind, seed=sum(n)))
        for rank in range(world):
            got = [torch.from_numpy(x) for x in results[rank][index]]
            rows = slice(sum(n[:rank]), sum(n[: rank + 1]))
            # every rank returns the global loss; its feature gradients are W x the global loss's (DDP / W)
            expected = [want[0], want[1][rows] * world, want[2][rows] * world] + want[3:]
            _assert_close(got, expected, rtol=1e-10, atol=1e-13)
