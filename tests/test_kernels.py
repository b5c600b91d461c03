"""The fused Triton kernels of the contrastive loss (tessera/losses/kernels.py), run by Triton's interpreter on CPU
in fp32, against the fp64 reference: on one process and round a ring of gloo ranks. Their speed and their bf16
rounding are measured on a GPU (scripts/bench_loss.py --device cuda, tests/test_gpu.py)."""

from __future__ import annotations

import functools
import itertools
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from tessera.losses import contrastive_loss, contrastive_loss_reference
from tessera.losses.options import interpreted

from .conftest import ROOT
from .test_losses import _assert_close, _case, _loss_and_grads, _spawned, in_gloo_group

# the options the kernel fuses: (kind, dcl, label smoothing), every one without labels
FUSED = [
    ("infonce", False, 0.0),
    ("infonce", True, 0.0),
    ("infonce", False, 0.1),
    ("siglip", False, 0.0),
]


def use_interpreter() -> None:
    """Make Triton's interpreter work under numpy >= 2.4 (conftest turned it on before triton was imported). triton
    3.6's interpreter takes a loop's runtime bound (`range(0, K, BK)`) by int() of a one-element array, which
    numpy 2.4 refuses; this takes its one element instead. The users' pins are left alone."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "one_element_index", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched.one_element_index = True
    interpreter._patch_lang_tensor = patched


pytestmark = pytest.mark.skipif(not interpreted(), reason="Triton's interpreter is off (a GPU runs tests/test_gpu.py)")


@pytest.fixture(autouse=True)
def interpreter():
    use_interpreter()


def _fused_case(n, kind, dcl, smoothing, seed=0, d=24):
    (a, b, s, bias), kw = _case(n, kind, False, dcl, smoothing, d=d, seed=seed)
    return (a, b, s, bias), kw


@pytest.mark.parametrize("n,tile", [(1, 64), (37, 64), (45, 16), (45, 20)])
@pytest.mark.parametrize("kind,dcl,smoothing", FUSED)
def test_fused_kernel_equals_the_fp64_reference(n, tile, kind, dcl, smoothing):
    """Loss and every gradient (features, scale, bias), in fp32, within 1e-5 of fp64: the kernel's blocks (16 here)
    split tiles unevenly, and tiles split the batch unevenly."""
    if dcl and n == 1:
        pytest.skip("DCL has no negative at B=1")
    args, kw = _fused_case(n, kind, dcl, smoothing, seed=n)
    want = _loss_and_grads(contrastive_loss_reference, *args, **kw)
    fp32 = [t.float() if t is not None else None for t in args]
    got = _loss_and_grads(contrastive_loss, *fp32, tile_size=tile, kernel="triton", **kw)
    _assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_kernel_takes_the_upstream_gradient_on_the_device():
    """A loss scaled by 3 (a device scalar coming back into backward) gives 3x the gradients, fp16-style: the
    scale reaches the kernel as a pointer, not a number read on the host."""
    args, kw = _fused_case(30, "infonce", False, 0.0)
    fp32 = [t.float().detach().requires_grad_(True) for t in args[:3]]
    (3 * contrastive_loss(*fp32, kernel="triton", tile_size=16, **kw)).backward()
    want = _loss_and_grads(contrastive_loss_reference, *args, **kw)
    for got, ref in zip([t.grad for t in fp32], want[1:]):
        torch.testing.assert_close(got.double(), 3 * ref, rtol=1e-5, atol=1e-6)


def test_kernel_choice_and_why_the_torch_path_runs(caplog):
    """auto keeps CPU tensors on the torch path silently; triton with label positives runs the torch path and
    says why once; a bad name is an error."""
    args, kw = _fused_case(20, "infonce", False, 0.0)
    labels = torch.arange(20) % 5
    with caplog.at_level(logging.WARNING, logger="tessera.losses"):
        auto = contrastive_loss(*args[:3], kernel="auto", **kw)
        assert not caplog.records
        for _ in range(2):
            got = contrastive_loss(*args[:3], kind="infonce", labels=labels, kernel="triton")
    told = [r.getMessage() for r in caplog.records]
    assert told == ["loss.kernel=triton: the infonce loss runs the torch path: label positives need a mask per tile "
                    "(loss.positives=label)"]  # fmt: skip
    want = contrastive_loss_reference(*args[:3], None, "infonce", labels)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(auto, contrastive_loss_reference(*args[:3], None, "infonce"))
    with pytest.raises(ValueError, match="loss.kernel must be one of"):
        contrastive_loss(*args[:3], kernel="cuda")


def _fused_ring(rank, world):
    use_interpreter()
    told = []
    handler = logging.Handler()
    handler.emit = lambda record: told.append(record.getMessage())
    logging.getLogger("tessera.losses").addHandler(handler)
    logging.getLogger("tessera.losses").setLevel(logging.INFO)
    sizes = [13, 9, 11][:world]
    out = []
    for (kind, dcl, smoothing), budget in itertools.product(FUSED, (None, 2**30)):  # the ring, then gathered
        (a, b, s, bias), kw = _fused_case(sum(sizes), kind, dcl, smoothing, seed=5)
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        fp32 = [t.float() if t is not None else None for t in (a[rows], b[rows], s, bias)]
        got = _loss_and_grads(contrastive_loss, *fp32, tile_size=8, kernel="triton", gather_budget=budget, **kw)
        for g in got[3:]:  # what DeepSpeed/DDP do with the replicated scale and bias
            torch.distributed.all_reduce(g)
            g /= world
        out.append([t.numpy() for t in got])
    return out, told


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 3])
def test_fused_kernel_round_the_ring_equals_the_global_batch_loss(world):
    """Unequal blocks per rank, several tiles per block, DCL's diagonal on each rank's own block only; the blocks
    round the ring and gathered by collectives."""
    results, procs = _spawned(functools.partial(in_gloo_group, _fused_ring), world, 300)
    failed = [r for r in results.values() if isinstance(r, str)]
    assert not failed, "\n".join(failed)
    sizes = [13, 9, 11][:world]
    for rank in range(world):  # which way the blocks went, said once per direction and choice
        told = [m.split(" (")[0] for m in results[rank][1]]
        assert told == ["loss forward: gathers every rank's blocks", "loss backward: gathers every rank's blocks"]
        results[rank] = results[rank][0]
    for case, (kind, dcl, smoothing) in enumerate(FUSED):
        args, kw = _fused_case(sum(sizes), kind, dcl, smoothing, seed=5)
        want = _loss_and_grads(contrastive_loss_reference, *args, **kw)
        for rank, mode in itertools.product(range(world), range(2)):
            rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            got = [torch.from_numpy(x) for x in results[rank][2 * case + mode]]
            _assert_close(got, [want[0], want[1][rows] * world, want[2][rows] * world, *want[3:]], 1e-5, 1e-6)


@pytest.mark.slow
def test_kernels_compile_for_an_h100_without_one():
    """Every launch the loss makes on bf16 features, compiled ahead of time for sm_90 by triton's own compiler and
    ptxas (the interpreter above checks the arithmetic, not what the GPU compiler accepts; `python
    tests/compile_kernels.py 80 90` compiles every dtype for both targets)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "compile_kernels.py"), "90", "bf16"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("sm_90 ") == 6, proc.stdout
