"""Contrastive loss memory and speed: open_clip's `ClipLoss`/`SigLipLoss` vs Tessera's tiled loss, side by side.

Every configuration (loss, batch B) runs forward + backward in a fresh subprocess, so that one run's memory
cannot flatter or hurt the next. Reported per configuration:
- peak memory: the process's peak resident set during the first forward + backward, minus its resident set just
  before (the features, their gradient buffers and every import are already resident then);
- wall time (best of --repeats);
- GFLOP/s: the GEMM FLOPs each implementation executes (open_clip 6 B^2 D; Tessera 8 B^2 D, since its backward
  recomputes the logits it did not keep, 6 B^2 D for SigLIP on one process), and that rate against a plain
  `torch.mm` of B x D by D x B
  (capped at 8192) timed in the same subprocess: the machine's practical limit.
open_clip runs are skipped (and the table says so) where its B x B matrices would not fit in --mem-gib.

Implementations (--impls): open_clip (its `ClipLoss`/`SigLipLoss`), tessera (the tiled loss's torch path:
loss.kernel=torch), triton (its fused kernel: loss.kernel=triton, CUDA only), inf_cl (Inf-CL's `cal_inf_loss`,
both directions, InfoNCE on CUDA only, where it is installed). The table compares each against open_clip and
gives its share of the torch.mm rate, counted at 8 B^2 D FLOPs for Tessera's kernel (5 GEMMs of the tile run).

--precision measures instead the error of the loss and of every gradient (features, scale) against fp64, at the
given --dtype, for open_clip's `ClipLoss` fed that dtype's features (its logits then come out in that dtype, as
under amp_bf16), Tessera's torch path and its kernel.

With --world W, every configuration runs as W gloo processes (torchrun, one thread each), B is the global
batch and each rank holds B/W rows: open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)` (or its
`SigLipLoss` neighbour exchange) against Tessera's ring. Time and peak memory are the worst rank's.

    python scripts/bench_loss.py                              # B = 1024 ... 65536, D = 512, fp32, infonce
    python scripts/bench_loss.py --batches 1024,4096 --kind siglip
    python scripts/bench_loss.py --world 2 --batches 4096,16384 --out runs/bench_loss_w2
    python scripts/bench_loss.py --device cuda --dtype bf16 --batches 8192,65536,262144   # one GPU
    python scripts/bench_loss.py --device cuda --dtype bf16 --precision --batches 65536

Writes runs/bench_loss/results.json, runs/bench_loss/memory.png (log-log memory vs B) and time.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchlib import meminfo_gib, reset_peak, status_kib

ROOT = Path(__file__).resolve().parents[1]
# open_clip's peak is about 15 bytes per logit (fp32 logits, their transpose's softmax, the gradients), measured
OPENCLIP_BYTES_PER_LOGIT = 16
IMPLS = ("open_clip", "tessera", "triton", "inf_cl")


def one(impl: str, kind: str, B: int, D: int, tile: int, dtype: str, repeats: int, device: str = "cpu") -> dict:
    """Runs in the subprocess (in each of them, under torchrun)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from tessera.losses import contrastive_loss, count_flops, default_tile

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world > 1:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    local = B // world
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(rank)
    cuda = device == "cuda"
    a = F.normalize(torch.randn(local, D, generator=g), dim=-1).to(device, dt).requires_grad_(True)
    b = F.normalize(torch.randn(local, D, generator=g).to(device) + a.detach().float(), dim=-1)
    b = b.to(dt).requires_grad_(True)
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True) if kind == "siglip" else None

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def start_peak() -> int:  # KiB: the device's allocated memory on GPU, the resident set on CPU
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() // 1024
        return reset_peak()

    def peak_kib() -> int:
        return torch.cuda.max_memory_allocated() // 1024 if cuda else status_kib("VmHWM")

    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)

    if impl == "open_clip":
        from open_clip.loss import ClipLoss, SigLipLoss

        peer = (
            ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
            if kind == "infonce"
            else SigLipLoss(rank=rank, world_size=world)
        )

        def loss_fn():
            return peer(a, b, scale) if kind == "infonce" else peer(a, b, scale, bias)

        flops = 6 * B * B * D
    elif impl == "inf_cl":
        if kind != "infonce" or not cuda:
            raise SystemExit("inf_cl: Inf-CL computes InfoNCE, on CUDA only")
        try:
            from inf_cl import cal_inf_loss
        except ImportError:
            raise SystemExit("inf_cl: not installed (pip install inf_cl)") from None

        def loss_fn():  # both directions, as CLIP's loss
            return (cal_inf_loss(a, b, scale=scale) + cal_inf_loss(b, a, scale=scale)) / 2

        flops = 8 * B * B * D  # its sweeps run about 10 B^2 D; counted as ours, for a like-for-like rate
    else:
        kernel = "triton" if impl == "triton" else "torch"

        def loss_fn():
            return contrastive_loss(a, b, scale, bias, kind=kind, tile_size=tile or None, kernel=kernel)

        flops = count_flops(kind, B, D, world) if kernel == "torch" else 8 * B * B * D

    times, peaks, value = [], [], None
    for _ in range(repeats):
        if world > 1:
            dist.barrier()
        sync()
        before = start_peak()
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        sync()
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - t0)
        peaks.append(peak_kib() - before)
        value = float(loss)
        del loss
    # The first run's peak: later runs reuse what the allocator kept from it and would show less.
    seconds, peak = min(times), peaks[0]
    if world > 1:  # the worst rank's
        worst = torch.tensor([seconds, float(peak)], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        seconds, peak = worst.tolist()
    features_mib = 2 * B * D * a.element_size() / 2**20

    # the machine's practical GEMM rate at this size, same dtype
    n = min(B, 8192)
    x, y = torch.randn(n, D, device=device).to(dt), torch.randn(D, n, device=device).to(dt)
    x @ y
    sync()
    t0 = time.perf_counter()
    mm_reps = max(1, int((2e12 if cuda else 2e10) // (2 * n * n * D)))
    for _ in range(mm_reps):
        x @ y
    sync()
    mm_gflops = 2 * n * n * D * mm_reps / (time.perf_counter() - t0) / 1e9
    del x, y
    if world > 1:  # every rank ran its GEMMs at once: the machine's rate is their sum
        total = torch.tensor([mm_gflops], dtype=torch.float64)
        dist.all_reduce(total)
        mm_gflops = total.item()
        dist.destroy_process_group()

    if rank != 0:
        return {}
    return {
        "impl": impl,
        "kind": kind,
        "B": B,
        "world": world,
        "D": D,
        "dtype": dtype,
        "tile": (tile or default_tile(a.device)) if impl in ("tessera", "triton") else None,
        "seconds": seconds,
        "peak_mib": peak / 1024,
        "gflops": flops / seconds / 1e9,
        "mm_gflops": mm_gflops,
        "mm_fraction": flops / seconds / 1e9 / mm_gflops,
        "loss": value,
        "features_mib": features_mib,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def precision(B: int, D: int, dtype: str, device: str, tile: int) -> list[dict]:
    """The error of the loss and of d(a), d(b), d(scale) against fp64, for each implementation fed `dtype`
    features: max |x - x64| / max |x64| per output."""
    import torch
    import torch.nn.functional as F
    from open_clip.loss import ClipLoss

    from tessera.losses import contrastive_loss

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(B, D, generator=g), dim=-1).to(device, dt)
    b = F.normalize(torch.randn(B, D, generator=g).to(device) + a.float(), dim=-1).to(dt)
    scale = torch.tensor(100.0, device=device)  # CLIP's cap: where rounding of the logits hurts most

    def outputs(fn, x, y, s):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, y, s)]
        loss = fn(*leaves)
        loss.backward()
        return [loss.detach().double()] + [t.grad.double() for t in leaves]

    tile = tile or None
    want = outputs(lambda x, y, s: contrastive_loss(x, y, s, tile_size=tile, kernel="torch"), a.double(), b.double(),
                   scale.double())  # fmt: skip
    peers = {
        "open_clip": lambda x, y, s: ClipLoss()(x, y, s),
        "tessera": lambda x, y, s: contrastive_loss(x, y, s, tile_size=tile, kernel="torch"),
    }
    if device == "cuda":
        peers["triton"] = lambda x, y, s: contrastive_loss(x, y, s, tile_size=tile, kernel="triton")
    rows = []
    for impl, fn in peers.items():
        got = outputs(fn, a, b, scale)
        errors = [float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(got, want)]
        rows.append(dict(zip(["impl", "loss", "d_a", "d_b", "d_scale"], [impl, *errors])) | {"B": B, "D": D})
        print(f"{impl:>9} B={B}: relative error loss {errors[0]:.2e}, d(a) {errors[1]:.2e}, d(b) {errors[2]:.2e}, "
              f"d(scale) {errors[3]:.2e}", flush=True)  # fmt: skip
    return rows


def run_sub(args, impl: str, B: int) -> dict:
    launcher = (
        [sys.executable]
        if args.world == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.world)]
    )
    cmd = [
        *launcher,
        __file__,
        "--one",
        impl,
        "--batches",
        str(B),
        "--dim",
        str(args.dim),
        "--tile",
        str(args.tile),
        "--kind",
        args.kind,
        "--dtype",
        args.dtype,
        "--repeats",
        str(args.repeats if B <= 8192 or args.device == "cuda" else 1),
        "--device",
        args.device,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.world > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.world)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"impl": impl, "B": B, "skipped": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads([x for x in proc.stdout.strip().splitlines() if x.startswith("{")][-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1024,4096,8192,16384,32768,65536")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--tile", type=int, default=0, help="Tessera's tile_size (default: the loss's, per device)")
    p.add_argument("--kind", choices=["infonce", "siglip"], default="infonce")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration up to B=8192 (best kept)")
    p.add_argument(
        "--mem-gib", type=float, default=None, help="memory open_clip may use (default: 85%% of MemAvailable)"
    )
    p.add_argument("--world", type=int, default=1, help="processes (gloo ranks) sharing the global batch")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU (peak = its allocated memory)"
    )
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_loss"))
    p.add_argument("--impls", default="open_clip,tessera,triton", help="comma-separated: " + ",".join(IMPLS))
    p.add_argument("--precision", action="store_true", help="measure errors against fp64 instead of time")
    p.add_argument("--one", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",")]
    impls = [x for x in args.impls.split(",") if x]
    if unknown := sorted(set(impls) - set(IMPLS)):
        p.error(f"--impls: unknown {unknown}; choose from {','.join(IMPLS)}")
    if args.device == "cpu" and "triton" in impls:
        impls.remove("triton")  # the kernel runs on CUDA (on CPU only in Triton's interpreter, for the tests)
    out = Path(args.out)
    if args.precision:
        rows = [r for B in batches for r in precision(B, args.dim, args.dtype, args.device, args.tile)]
        out.mkdir(parents=True, exist_ok=True)
        (out / "precision.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
        print(f"wrote {out}/precision.json")
        return
    if args.one:
        result = one(args.one, args.kind, batches[0], args.dim, args.tile, args.dtype, args.repeats, args.device)
        if result:
            print(json.dumps(result))
        return

    if args.device == "cuda":
        import torch

        mem_gib = args.mem_gib or 0.85 * torch.cuda.mem_get_info()[1] / 2**30
    else:
        mem_gib = args.mem_gib or 0.85 * meminfo_gib("MemAvailable")
    rows = []
    for B in batches:
        for impl in impls:
            need = OPENCLIP_BYTES_PER_LOGIT * B * B / 2**30  # W ranks x (B/W x B) logits each
            if impl == "open_clip" and need > mem_gib:
                row = {"impl": impl, "B": B, "skipped": f"needs about {need:.0f} GiB, {mem_gib:.0f} GiB available"}
            else:
                row = run_sub(args, impl, B)
            rows.append(row)
            print(_line(row), flush=True)

    table = _table(rows)
    print("\n" + table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    (out / "table.md").write_text(table + "\n")
    _plot(rows, out)
    print(f"\nwrote {out}/results.json, table.md, memory.png, time.png")


def _line(r: dict) -> str:
    if "skipped" in r:
        return f"{r['impl']:>9} B={r['B']:>6}: skipped ({r['skipped']})"
    return (
        f"{r['impl']:>9} B={r['B']:>6}: {r['seconds']:8.3f} s  peak {r['peak_mib']:9.1f} MiB  "
        f"{r['gflops']:6.1f} GFLOP/s ({100 * r['mm_fraction']:.0f}% of torch.mm)"
    )


def _table(rows: list[dict]) -> str:
    """One line per (B, implementation): time and memory against open_clip's, rates against torch.mm's."""
    by = {(r["impl"], r["B"]): r for r in rows}
    lines = [
        "| B | implementation | time | time / open_clip | peak | memory / open_clip | GFLOP/s | share of torch.mm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for B in sorted({r["B"] for r in rows}):
        o = by.get(("open_clip", B), {})
        for impl in dict.fromkeys(r["impl"] for r in rows):
            r = by.get((impl, B))
            if r is None:
                continue
            if "skipped" in r:
                lines.append(f"| {B} | {impl} | skipped: {r['skipped']} | | | | | |")
                continue
            ratio_t = f"{r['seconds'] / o['seconds']:.2f}x" if "seconds" in o else "-"
            ratio_m = f"1/{o['peak_mib'] / max(r['peak_mib'], 1e-3):.0f}" if "peak_mib" in o else "-"
            lines.append(
                f"| {B} | {impl} | {r['seconds']:.3f} s | {ratio_t} | {r['peak_mib']:.0f} MiB | {ratio_m} | "
                f"{r['gflops']:.0f} | {r['mm_fraction']:.0%} |"
            )
    return "\n".join(lines)


def _plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, name in [
        ("peak_mib", "peak memory above the features (MiB)", "memory.png"),
        ("seconds", "forward + backward (s)", "time.png"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl, style in [("open_clip", "o--"), ("tessera", "s-"), ("triton", "^-"), ("inf_cl", "d:")]:
            pts = sorted((r["B"], r[key]) for r in rows if r["impl"] == impl and key in r)
            if pts:
                ax.plot(*zip(*pts), style, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch B (D = 512)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
