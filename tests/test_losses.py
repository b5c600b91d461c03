"""The tiled contrastive losses against the full-matrix reference and open_clip's, on one process and across
real gloo process groups."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.loss import ClipLoss, SigLipLoss

from tessera.losses import contrastive_loss, contrastive_loss_reference

from . import strict_p2p

# (kind, use labels, dcl, label smoothing): every option, alone and combined where the combination is allowed
OPTIONS = [
    ("infonce", False, False, 0.0),
    ("infonce", True, False, 0.0),
    ("infonce", False, True, 0.0),
    ("infonce", True, True, 0.0),
    ("infonce", False, False, 0.1),
    ("infonce", True, False, 0.1),
    ("siglip", False, False, 0.0),
    ("siglip", True, False, 0.0),
]


def _features(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    b = F.normalize(torch.randn(n, d, generator=g, dtype=dtype) + 0.5 * a, dim=-1)
    return a, b


def _labels(n, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, max(2, n // 3), (n,), generator=g)
    labels[0] = 10**6  # at least two distinct ids, so DCL always has a negative
    return labels


def _params(kind, dtype, scale=14.3):
    scale = torch.tensor(scale, dtype=dtype)
    bias = torch.tensor(-3.0, dtype=dtype) if kind == "siglip" else None
    return scale, bias


def _loss_and_grads(fn, a, b, scale, bias, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (a, b, scale) + ((bias,) if bias is not None else ())]
    loss = fn(*leaves[:3], leaves[3] if bias is not None else None, **kw)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _assert_close(got, want, rtol, atol):
    assert len(got) == len(want), f"{len(got)} outputs, expected {len(want)}"
    for i, (x, y) in enumerate(zip(got, want)):
        assert torch.allclose(x.to(y.dtype), y, rtol=rtol, atol=atol), (
            f"output {i} (loss, d_a, d_b, d_scale, d_bias): max error {(x.to(y.dtype) - y).abs().max():.3g}"
        )


def _case(n, kind, use_labels, dcl, smoothing, d=16, dtype=torch.float64, scale=14.3, seed=0):
    a, b = _features(n, d, seed, dtype)
    s, bias = _params(kind, dtype, scale)
    kw = dict(kind=kind, labels=_labels(n, seed) if use_labels else None, dcl=dcl, label_smoothing=smoothing)
    return (a, b, s, bias), kw


@pytest.mark.parametrize("n,tile", [(1, 1024), (7, 3), (7, 1024), (64, 16), (64, 64), (1000, 128), (1000, 1024)])
@pytest.mark.parametrize("kind,use_labels,dcl,smoothing", OPTIONS)
def test_tiled_equals_full_matrix_reference_fp64(n, tile, kind, use_labels, dcl, smoothing):
    if dcl and n == 1:
        pytest.skip("DCL has no negative at B=1 (tested to raise)")
    args, kw = _case(n, kind, use_labels, dcl, smoothing)
    got = _loss_and_grads(contrastive_loss, *args, tile_size=tile, **kw)
    want = _loss_and_grads(contrastive_loss_reference, *args, **kw)
    _assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("n,tile", [(7, 3), (64, 16), (1000, 256)])
@pytest.mark.parametrize("kind,use_labels,dcl,smoothing", OPTIONS)
def test_tiled_fp32_within_1e5_of_fp64_reference(n, tile, kind, use_labels, dcl, smoothing):
    args, kw = _case(n, kind, use_labels, dcl, smoothing)
    got = _loss_and_grads(contrastive_loss, *[None if t is None else t.float() for t in args], tile_size=tile, **kw)
    want = _loss_and_grads(contrastive_loss_reference, *args, **kw)
    # gradients: relative to the largest entry (single entries of a gradient can be ~0)
    for i, (x, y) in enumerate(zip(got, want)):
        err = (x.double() - y).abs().max() / y.abs().max().clamp_min(1e-12)
        assert err < 1e-5, f"output {i}: relative error {err:.3g}"


@pytest.mark.parametrize("n", [1, 7, 64, 1000])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-13), (torch.float32, 1e-5, 1e-6)])
def test_matches_open_clip_cliploss(n, dtype, rtol, atol):
    a, b = _features(n, 32, dtype=dtype)
    scale = torch.tensor(14.3, dtype=dtype)
    got = _loss_and_grads(contrastive_loss, a, b, scale, None, tile_size=96)
    want = _loss_and_grads(lambda x, y, s, _: ClipLoss()(x, y, s), a, b, scale, None)
    _assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("n", [1, 7, 64, 1000])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-13), (torch.float32, 1e-5, 1e-6)])
def test_matches_open_clip_sigliploss(n, dtype, rtol, atol):
    a, b = _features(n, 32, dtype=dtype)
    scale, bias = torch.tensor(10.0, dtype=dtype), torch.tensor(-10.0, dtype=dtype)
    got = _loss_and_grads(contrastive_loss, a, b, scale, bias, kind="siglip", tile_size=96)
    want = _loss_and_grads(lambda x, y, s, t: SigLipLoss()(x, y, s, t), a, b, scale, bias)
    _assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_value_without_grad_and_scaled_upstream_gradient(kind):
    """Forward alone (eval) gives the same value; a weighted loss (accumulation, loss scaling) gets weighted
    gradients, also where SigLIP computes its gradients during forward."""
    a, b = _features(50, 16)
    scale, bias = _params(kind, torch.float64)
    with torch.no_grad():
        value = contrastive_loss(a, b, scale, bias, kind=kind, tile_size=16)
    want = _loss_and_grads(lambda *t: 0.25 * contrastive_loss_reference(*t, kind=kind), a, b, scale, bias)
    got = _loss_and_grads(lambda *t: 0.25 * contrastive_loss(*t, kind=kind, tile_size=16), a, b, scale, bias)
    assert torch.allclose(value, 4 * want[0], rtol=1e-12)
    _assert_close(got, want, rtol=1e-10, atol=1e-13)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 80),
    d=st.integers(1, 24),
    tile=st.integers(1, 100),
    option=st.sampled_from(OPTIONS),
    scale=st.floats(0.5, 100.0),
    seed=st.integers(0, 2**16),
)
def test_property_any_shape_and_tile(n, d, tile, option, scale, seed):
    kind, use_labels, dcl, smoothing = option
    if dcl and n == 1:
        return
    args, kw = _case(n, kind, use_labels, dcl, smoothing, d=d, scale=scale, seed=seed)
    got = _loss_and_grads(contrastive_loss, *args, tile_size=tile, **kw)
    want = _loss_and_grads(contrastive_loss_reference, *args, **kw)
    _assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_stable_at_logit_scale_100_with_extreme_logits(kind):
    """Rows whose logits all sit ~200 below another row's in the same tile: a shared per-tile shift would
    underflow them; per-row/per-column log-sum-exps must not."""
    n = 48
    a, b = _features(n, 16)
    a[: n // 2] = -b[: n // 2]  # half the positives at cosine -1: logits -100 next to rows at +100
    args = (a, b) + _params(kind, torch.float64, scale=100.0)
    for dtype, rtol in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        got = _loss_and_grads(
            contrastive_loss, *[None if t is None else t.to(dtype) for t in args], kind=kind, tile_size=16
        )
        want = _loss_and_grads(contrastive_loss_reference, *args, kind=kind)
        for x, y in zip(got, want):
            assert torch.isfinite(x).all()
            assert ((x.double() - y).abs().max() / y.abs().max()) < rtol


def test_bf16_features_within_stated_bound():
    """bf16 features (the CPU GEMM rounds its fp32 accumulation to bf16 on output): the loss is within 1% of the
    fp64 reference on the same (rounded) inputs, and every gradient within 2% of its largest entry."""
    a, b = _features(512, 64)
    a16, b16 = a.bfloat16(), b.bfloat16()
    scale = torch.tensor(50.0, dtype=torch.float64)
    got = _loss_and_grads(contrastive_loss, a16, b16, scale.float(), None, tile_size=128)
    want = _loss_and_grads(contrastive_loss_reference, a16.double(), b16.double(), scale, None)
    assert got[1].dtype == torch.bfloat16 and got[0].dtype == torch.float32
    assert abs(got[0].double() - want[0]) / want[0] < 1e-2
    for x, y in zip(got[1:], want[1:]):
        assert (x.double() - y).abs().max() / y.abs().max() < 2e-2


def test_fp16_features_keep_their_gradients_under_a_loss_scale():
    """fp16 training backpropagates a scaled loss (DeepSpeed's dynamic loss scale, here 2^16): the scale must
    reach the tiles before their fp16 cast, or entries of about 1/(2 G^2) (3e-8 at G = 4096) underflow. Features
    that share a direction, as trained ones do, make those entries add up to a large part of each gradient."""
    g = torch.Generator().manual_seed(5)
    shared = torch.randn(16, generator=g)
    a, b = (F.normalize(torch.randn(4096, 16, generator=g) + 2 * shared, dim=-1).half() for _ in range(2))
    for scale in (1.0, 10.0):
        got = [t.clone().requires_grad_() for t in (a, b)]
        (contrastive_loss(*got, torch.tensor(scale), tile_size=1024) * 2**16).backward()
        want = _loss_and_grads(contrastive_loss_reference, a.double(), b.double(), torch.tensor(scale).double(), None)
        for x, y in zip(got, want[1:3]):
            assert (x.grad.double() / 2**16 - y).abs().max() / y.abs().max() < 1e-2  # 6-8% when they underflow


def test_memory_saved_for_backward_is_linear_in_the_batch():
    """What autograd keeps between forward and backward: features and LSE vectors, never a B x B matrix."""
    n, d = 4096, 32
    a, b = _features(n, d, dtype=torch.float32)
    a.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        contrastive_loss(a, b, torch.tensor(10.0, requires_grad=True), tile_size=256)
    assert sum(saved) <= 4 * n * d  # a, b, scaled a, and small vectors; the full matrix would be 128x this
    assert max(saved) <= n * d


def test_bad_arguments_say_what_is_wrong():
    a, b = _features(4, 8)
    s = torch.tensor(10.0, dtype=torch.float64)
    with pytest.raises(ValueError, match="not one of"):
        contrastive_loss(a, b, s, kind="triplet")
    with pytest.raises(ValueError, match="needs logit_bias"):
        contrastive_loss(a, b, s, kind="siglip")
    with pytest.raises(ValueError, match="siglip parameter"):
        contrastive_loss(a, b, s, torch.tensor(-10.0))
    with pytest.raises(ValueError, match="choose one"):
        contrastive_loss(a, b, s, dcl=True, label_smoothing=0.1)
    with pytest.raises(ValueError, match="at least one negative"):
        contrastive_loss(a[:1], b[:1], s, dcl=True)
    with pytest.raises(ValueError, match="at least one negative"):
        contrastive_loss(a, b, s, dcl=True, labels=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must be"):
        contrastive_loss(a, b, s, labels=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="one shape"):
        contrastive_loss(a, b[:3], s)
    with pytest.raises(ValueError, match="tile_size"):
        contrastive_loss(a, b, s, tile_size=0)


# --------------------------------------------------------------------------------------------------------------
# Across ranks: real gloo process groups, one per world size, every case in the same group
# --------------------------------------------------------------------------------------------------------------

# impl: "ring" (tiled, blocks round the ring), "gathered" (tiled, blocks gathered by collectives), "full"
RING_CASES = [
    (option, sizes, tile, impl)
    for option in OPTIONS
    for sizes, tile, impl in [
        ("equal", 2, "ring"),
        ("unequal", 1024, "ring"),
        ("equal", 2, "gathered"),
        ("unequal", 3, "gathered"),
        ("equal", 3, "full"),
    ]
    if not (impl == "full" and sizes == "unequal")
] + [  # blocks and travelling accumulators of 2,050-2,120 x 512 fp64: above 8 MB, far beyond NCCL's buffered size
    (option, "large", 1024, "ring")
    for option in OPTIONS
    if option in [("infonce", False, False, 0.0), ("siglip", False, False, 0.0)]
]


def _local_sizes(world, which):
    return {"equal": [5] * world, "unequal": [4, 1, 6][:world], "large": [2100, 2050, 2120][:world]}[which]


def _dim(which):
    return 512 if which == "large" else 8


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(worker, world: int, timeout: float) -> tuple[dict, list]:
    """`world` fresh processes running worker(rank, world, port, queue), each putting one (rank, result); the
    results by rank, and the processes. Whatever happens, none outlives the test. They fork from a server that
    imported torch and the test modules once (multiprocessing's forkserver), not from this process: it may have
    run OpenMP threads, which a forked child cannot use."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", *(m for m in sys.modules if m.startswith("tests."))])  # the first call's
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=timeout) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        return results, procs
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()


def in_gloo_group(compute, rank, world, port, queue):
    """A spawned worker's body (bind `compute` with functools.partial): join a gloo group of `world` ranks under
    NCCL's point-to-point rules and put (rank, compute(rank, world)); on an error put (rank, the reason), so that
    the test fails at once with it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    strict_p2p.install()
    try:
        queue.put((rank, compute(rank, world)))
    except Exception as e:
        queue.put((rank, f"rank {rank}: {type(e).__name__}: {e}"))
        raise
    finally:
        dist.destroy_process_group()


def _ring_worker(rank, world, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    strict_p2p.install()  # a send completes only when its peer runs the group that receives it, as under NCCL
    try:
        out = []
        for (kind, use_labels, dcl, smoothing), sizes, tile, impl in RING_CASES:
            n = _local_sizes(world, sizes)
            (a, b, s, bias), kw = _case(sum(n), kind, use_labels, dcl, smoothing, d=_dim(sizes), seed=3)
            rows = slice(sum(n[:rank]), sum(n[: rank + 1]))
            if kw["labels"] is not None:
                kw["labels"] = kw["labels"][rows]
            how = dict(impl="full") if impl == "full" else dict(gather_budget=None if impl == "ring" else 2**30)
            got = _loss_and_grads(contrastive_loss, a[rows], b[rows], s, bias, tile_size=tile, **how, **kw)
            # what DeepSpeed/DDP do with the replicated scale and bias: average their gradients over the ranks
            for i in range(3, len(got)):
                dist.all_reduce(got[i])
                got[i] /= world
            out.append([t.numpy() for t in got])  # by value: torch's shared-memory tensors die with the process
        queue.put((rank, out))
    except Exception as e:  # reported, so that the test fails at once with the reason
        queue.put((rank, f"rank {rank}: {type(e).__name__}: {e}"))
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 3])
def test_ring_loss_on_every_rank_equals_the_global_batch_loss(world):
    """Every option, equal and unequal sizes, and blocks above 8 MB, under NCCL's point-to-point rules."""
    results, procs = _spawned(_ring_worker, world, 300)
    failed = [r for r in results.values() if isinstance(r, str)]
    assert not failed, "\n".join(failed)
    assert [p.exitcode for p in procs] == [0] * world

    for case_index, ((kind, use_labels, dcl, smoothing), sizes, _, _) in enumerate(RING_CASES):
        n = _local_sizes(world, sizes)
        args, kw = _case(sum(n), kind, use_labels, dcl, smoothing, d=_dim(sizes), seed=3)
        want = _loss_and_grads(contrastive_loss_reference, *args, **kw)
        for rank in range(world):
            got = [torch.from_numpy(x) for x in results[rank][case_index]]
            rows = slice(sum(n[:rank]), sum(n[: rank + 1]))
            # every rank returns the global loss; its feature gradients are W x the global loss's (DDP / W)
            expected = [want[0], want[1][rows] * world, want[2][rows] * world] + want[3:]
            _assert_close(got, expected, rtol=1e-10, atol=1e-13)


def _send_then_receive_worker(rank, world, port, queue):
    """The pattern NCCL deadlocks on: each rank sends to the next in a group of its own, then receives."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    strict_p2p.install(timeout=3)
    try:
        x, y = torch.ones(2**20 + 1), torch.empty(2**20 + 1)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, (rank + 1) % world)])
        works += dist.batch_isend_irecv([dist.P2POp(dist.irecv, y, (rank - 1) % world)])
        try:
            for work in works:
                work.wait()
            queue.put((rank, "completed"))
        except strict_p2p.P2PDeadlock as e:
            queue.put((rank, str(e)))
        dist.barrier()  # rank 0 hosts the store: it stays until every rank has its verdict
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 3])
def test_strict_mode_reports_a_send_that_waits_for_a_later_group(world):
    results, _ = _spawned(_send_then_receive_worker, world, 120)
    for rank in range(world):
        assert "under NCCL this ring deadlocks" in results[rank], results[rank]
        assert f"{rank}>{(rank + 1) % world}#0" in results[rank]  # the send no receive met
