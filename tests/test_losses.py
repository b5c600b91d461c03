"""The contrastive loss against open_clip's, on one process and across real gloo process groups."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from train.losses import contrastive_loss, infonce_reference


def _features(n, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    b = F.normalize(torch.randn(n, d, generator=g, dtype=dtype) + 0.5 * a, dim=-1)
    return a, b


@pytest.mark.parametrize("n", [1, 7, 64])
def test_matches_open_clip_cliploss_value_and_gradients(n):
    a, b = _features(n, 16)
    scale = torch.tensor(14.3, dtype=torch.float64)
    ours = [t.clone().requires_grad_(True) for t in (a, b, scale)]
    ref = [t.clone().requires_grad_(True) for t in (a, b, scale)]
    loss = contrastive_loss(*ours)
    expected = ClipLoss()(ref[0], ref[1], ref[2])
    assert torch.allclose(loss, expected, rtol=1e-12)
    loss.backward()
    expected.backward()
    for x, y in zip(ours, ref):
        assert torch.allclose(x.grad, y.grad, rtol=1e-10, atol=1e-12)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, n_local, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        a, b = _features(n_local * world, 8, seed=3)
        scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
        rows = slice(rank * n_local, (rank + 1) * n_local)
        la = a[rows].clone().requires_grad_(True)
        lb = b[rows].clone().requires_grad_(True)
        loss = contrastive_loss(la, lb, scale)
        loss.backward()
        # what DeepSpeed/DDP do: average every gradient over the ranks
        grads = torch.cat([la.grad.flatten(), lb.grad.flatten(), scale.grad.reshape(1)])
        loss_avg = loss.detach().clone()
        dist.all_reduce(grads)
        dist.all_reduce(loss_avg)
        grads /= world
        loss_avg /= world
        queue.put((rank, loss_avg.item(), grads, la.grad.clone(), lb.grad.clone(), scale.grad.item()))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 3])
def test_gathered_loss_across_ranks_equals_the_global_batch_loss(world):
    n_local = 5
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, n_local, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    a, b = _features(n_local * world, 8, seed=3)
    a.requires_grad_(True)
    b.requires_grad_(True)
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    ref = infonce_reference(a, b, scale)
    ref.backward()
    for rank, loss, _, ga, gb, _ in results:
        assert loss == pytest.approx(ref.item(), rel=1e-12)
        rows = slice(rank * n_local, (rank + 1) * n_local)
        # a rank's feature gradient is W x the global loss's (DDP then divides by W)
        assert torch.allclose(ga / world, a.grad[rows], rtol=1e-10, atol=1e-13)
        assert torch.allclose(gb / world, b.grad[rows], rtol=1e-10, atol=1e-13)
    # the ranks' temperature gradients average to the global one
    assert sum(r[5] for r in results) / world == pytest.approx(scale.grad.item(), rel=1e-10)
