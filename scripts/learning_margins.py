"""How far each learning test clears its bound, across CPU kinds, thread counts and seeds.

    python scripts/learning_margins.py                        # ATen's kernels for this CPU and AVX2, 1 and 2 threads
    python scripts/learning_margins.py --seeds 0,1 --kinds native,avx2,default
    bash scripts/test.sh --cpu-kinds                          # the same, with the suite's install

A learning test asserts that training learns: an accuracy above a bound, a loss that falls by at least so much
(`pytest -m learning`; each reports through `tests/conftest.learned`). A bound a rounding can reach makes the suite's
verdict depend on the machine: ATen picks its vectorised kernels by CPU (ATEN_CPU_CAPABILITY: `default` is scalar,
`avx2`, `avx512` where the CPU has it), and the thread count changes the order of reductions. This runs the learning
tests once per (kind, threads, seed), in one process each (OMP_NUM_THREADS as given; torchrun's ranks keep their
1 thread), and prints every result beside its bound with the margin left, the smallest margin per test last.
`native` is no override: what ATen picks here. Writes runs/learning_margins/margins.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu() -> dict:
    """This machine's CPU: its name, the vector extensions that matter here, and what ATen picks."""
    flags, name = set(), "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and name == "?":
            name = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    picked = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile")
    return {"name": name, "flags": [f for f in wanted if f in flags], "aten": picked, "cores": os.cpu_count()}


def run(kind: str, threads: int, seed: int, pytest_args: list[str]) -> tuple[list[dict], int]:
    """The learning tests under one configuration: their reported rows, and pytest's exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.jsonl"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "TESSERA_TEST_SEED": str(seed),
            "TESSERA_LEARNING_REPORT": str(report),
        }
        env.pop("ATEN_CPU_CAPABILITY", None)
        if kind != "native":
            env["ATEN_CPU_CAPABILITY"] = kind
        cmd = [sys.executable, "-m", "pytest", "-m", "learning", "-n0", "-q", "-p", "no:cacheprovider", *pytest_args]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.is_file() else []
    if proc.returncode not in (0, 1):  # 1: a test failed, which the table shows; anything else is pytest's trouble
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    for row in rows:
        row.update(kind=kind, threads=threads, seed=seed)
    return rows, proc.returncode


def table(rows: list[dict]) -> str:
    configs = sorted({(r["kind"], r["threads"], r["seed"]) for r in rows})
    lines = ["| test | result | bound | " + " | ".join(f"{k} {t}t s{s}" for k, t, s in configs) + " | least margin |"]
    lines.append("|---" * (len(configs) + 4) + "|")
    by_result: dict[tuple, dict] = {}
    for r in rows:
        by_result.setdefault((r["test"].split("::", 1)[-1], r["what"]), {})[(r["kind"], r["threads"], r["seed"])] = r
    for (test, what), got in sorted(by_result.items()):
        bounds = sorted({round(r["bound"], 3) for r in got.values()})
        cells = [f"{got[c]['value']:.3f}" if c in got else "-" for c in configs]
        least = min(r["margin"] for r in got.values())
        bound = bounds[0] if len(bounds) == 1 else f"{bounds[0]}..{bounds[-1]}"
        lines.append(f"| {test} | {what} | {bound} | " + " | ".join(cells) + f" | {least:+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="native,avx2", help="ATEN_CPU_CAPABILITY values; native: no override")
    parser.add_argument("--threads", default="1,2", help="OMP_NUM_THREADS values")
    parser.add_argument("--seeds", default="0", help="TESSERA_TEST_SEED values (added to the tests' seeds)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "learning_margins"))
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (e.g. -k prompt)")
    args = parser.parse_args(argv)
    machine = cpu()
    print(
        f"CPU: {machine['name']}, {machine['cores']} cores, {', '.join(machine['flags'])}; ATen picks {machine['aten']}"
    )
    rows, failed = [], []
    configs = itertools.product(
        args.kinds.split(","), [int(t) for t in args.threads.split(",")], [int(s) for s in args.seeds.split(",")]
    )
    for kind, threads, seed in configs:
        got, status = run(kind, threads, seed, args.pytest_args)
        print(f"  {kind:8s} {threads} thread(s) seed {seed}: {len(got)} results, pytest exit {status}", flush=True)
        rows += got
        failed += [] if status == 0 else [(kind, threads, seed)]
    print(table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "margins.json").write_text(json.dumps({"cpu": machine, "rows": rows}, indent=1))
    print(f"wrote {out / 'margins.json'}")
    if failed:
        print(f"failing configurations: {failed}")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
