"""Shared fixtures: a tiny model config, tiny real shards made by the demo generator, helpers."""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Without a GPU, Triton's kernels run in its interpreter (tests/test_kernels.py). It must be on before triton is
# first imported: triton's own library functions (tl.sum, tl.max) are jitted then, and only those jitted under the
# interpreter run in it. On a machine with an NVIDIA GPU the kernels run on it (tests/test_gpu.py).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from tessera.config import from_dict  # noqa: E402
from tessera.data.demo import COLORS, COMBOS, _encode, build, caption, render  # noqa: E402
from tessera.data.make_shards import write_shards  # noqa: E402
from tessera.models import ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


ZYGOTE = Path(__file__).with_name("zygote.py")
_zygote: subprocess.Popen | None = None


def pytest_configure(config):
    """Under pytest-xdist (`scripts/test.sh` runs `-n auto`), each worker gets its share of the cores: torch's
    OpenMP threads in two workers (and in the runs they start) would otherwise spin against each other. Each
    process that runs tests starts its warm interpreter (`tests/zygote.py`), which its command runs fork from once
    it has imported everything (TESSERA_TEST_ZYGOTE=0 runs every command in a fresh interpreter)."""
    global _zygote
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    controller = workers > 1 and "PYTEST_XDIST_WORKER" not in os.environ
    if os.environ.get("TESSERA_TEST_ZYGOTE") == "0" or controller:
        os.environ.pop("TESSERA_TEST_ZYGOTE", None)
        return
    path = Path(tempfile.mkdtemp(prefix="tessera-zygote-")) / "socket"
    os.environ["TESSERA_TEST_ZYGOTE"] = str(path)
    os.environ["TESSERA_TEST_PYTHON"] = sys.executable
    _zygote = subprocess.Popen([sys.executable, str(ZYGOTE), "serve", str(path)], stdin=subprocess.DEVNULL)


def pytest_unconfigure(config):
    if _zygote is not None:
        _zygote.kill()
        _zygote.wait()


def pytest_collection_modifyitems(config, items):
    """The files with the most slow and multi-process tests first, each file's tests together and in their order:
    workers taking whole files (`--dist loadfile`) then end together, with no long file started last."""
    weight: dict[str, int] = {}
    for item in items:
        slow = any(item.get_closest_marker(m) for m in ("slow", "multiproc"))
        weight[item.path] = weight.get(item.path, 0) + (20 if slow else 1)
    items.sort(key=lambda item: -weight[item.path])  # stable: each file keeps its tests' order


# The seed the learning tests add to their runs' (TESSERA_TEST_SEED; scripts/learning_margins.py varies it).
SEED = int(os.environ.get("TESSERA_TEST_SEED", "0"))


def learned(value: float, bound: float, what: str) -> None:
    """A learning test's verdict: `value` (an accuracy, a loss's fall) must exceed `bound`. With
    TESSERA_LEARNING_REPORT naming a file, the result is also appended there as a JSON line, with the margin, for
    `scripts/learning_margins.py` to set beside the CPU kind, threads and seed it ran under."""
    report = os.environ.get("TESSERA_LEARNING_REPORT")
    if report:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        row = {"test": test, "what": what, "value": value, "bound": bound, "margin": value - bound}
        with open(report, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    assert value > bound, f"{what}: {value:.4f} does not exceed its bound {bound:.4f}"


def loss_fall(losses: list[float], n: int = 3) -> float:
    """How far a run's loss fell: the mean of its first n logged losses less the mean of its last n."""
    return sum(losses[:n]) / n - sum(losses[-n:]) / n


# A CLIP small enough to train a step in well under a second on one CPU core.
TINY_MODEL = {
    "embed_dim": 32,
    "towers": {
        "image": {
            "encoder": "open_clip_image",
            "model": "ViT-B-32",
            "overrides": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
        },
        "text": {
            "encoder": "open_clip_text",
            "model": "ViT-B-32",
            "overrides": {"context_length": 16, "width": 64, "heads": 2, "layers": 1},
        },
    },
}


@pytest.fixture
def tiny_model_cfg():
    return from_dict(ModelConfig, TINY_MODEL, "model")


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """Demo data (with its broken samples): 2 x 240 train samples in shards of 60, and 480 val samples."""
    out = tmp_path_factory.mktemp("demo")
    build(out, train_per_source=240, samples_per_shard=60, seed=0)
    return out


def jpeg_bytes(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


PY = sys.executable
# what a run's environment may change and still fork from the warm interpreter: nothing read at process start or
# at import (glibc's MALLOC_* tunables, for one, are read when the process starts)
WARM_ENV = {"OMP_NUM_THREADS", "PYTHONUNBUFFERED", "DEEPSPEED_TIMEOUT"}


def command(args: list[str], env: dict | None = None) -> list[str]:
    """`args` as the suite starts it: a Python run (`python -m X ...`, `python script.py ...`, torchrun and each of
    its ranks) through the warm interpreter (`tests/zygote.py`) where there is one and `env` changes only what no
    import reads; anything else as it is."""
    if "TESSERA_TEST_ZYGOTE" not in os.environ or set(env or ()) - WARM_ENV or args[:1] != [PY] or args[1] == "-c":
        return list(args)
    rest = list(args[1:])
    if rest[:2] == ["-m", "torch.distributed.run"]:  # its ranks too: --no-python, with the client as their program
        at = next(i for i in range(2, len(rest)) if rest[i] in ("-m", "--module") or rest[i].endswith(".py"))
        if rest[at].endswith(".py"):
            rest[at : at + 1] = ["--no-python", PY, str(ZYGOTE), rest[at]]
        else:
            rest[at : at + 2] = ["--no-python", PY, str(ZYGOTE), "-m", rest[at + 1]]
    return [PY, str(ZYGOTE), *rest]


def finished(procs: list[subprocess.Popen], timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Wait for processes started together (with text pipes), each in turn; their outcomes, in order."""
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def run_cli(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 600):
    """Run a command with the test interpreter's environment; return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(command(args, env), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


# C and C++ compilers by name: what a machine without a toolchain lacks
COMPILERS = re.compile(r"^(cc|c\+\+|clang|clang\+\+|(.*-)?(gcc|g\+\+|cpp)(-\d+)?)$")


def no_compiler_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which no C or C++ compiler can be found: PATH is one folder linking every program of the
    current PATH but the compilers, CC and CXX name nothing, and torch's JIT extensions go to an empty folder
    (`tmp_path/torch_extensions`, which stays empty when nothing compiles)."""
    bin_dir = tmp_path / "bin-without-compilers"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        for program in Path(folder).glob("*") if Path(folder).is_dir() else []:
            link = bin_dir / program.name
            if not COMPILERS.match(program.name) and not link.exists() and os.access(program, os.X_OK):
                link.symlink_to(program)
    (tmp_path / "torch_extensions").mkdir()
    return {
        "PATH": str(bin_dir),
        "CC": str(tmp_path / "no-cc"),
        "CXX": str(tmp_path / "no-cxx"),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
    }


def call_main(main, args: list[str], capsys) -> tuple[int, str, str]:
    """Run an entry point's `main(argv)` in this process (no interpreter start, no re-import): its exit status,
    stdout and stderr. For the error paths of commands whose full run a subprocess test already covers."""
    try:
        rc = main(args) or 0
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="session")
def unlabelled_shard(tmp_path_factory) -> Path:
    """Image-text pairs with no `cls` member: what classification tools must refuse with a clear error."""
    out = tmp_path_factory.mktemp("unlabelled")
    write_shards(
        [(f"u{i:04d}", {"jpg": jpeg_bytes((30 * i, 60, 90)), "txt": f"picture {i}".encode()}) for i in range(8)],
        out,
        "pairs",
        8,
    )
    return out / "pairs-000000.tar"


@pytest.fixture
def in_process_training():
    """For tests that run training in the pytest process: afterwards, restore the environment. Joining its
    world-of-one process group sets RANK, MASTER_PORT, ... which later CLI subprocesses would inherit, and then
    collide with the store still listening on that port. (The group itself stays: DeepSpeed caches its groups,
    so a second in-process run reuses it.)"""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def colour_shards(tmp_path_factory):
    """Demo pictures labelled by colour (8 classes): 400 for training, 240 held out, and their classes.json."""
    out = tmp_path_factory.mktemp("colours")
    colours, rng = list(COLORS), random.Random(0)

    def samples(n, prefix):
        for i in range(n):
            combo = rng.choice(COMBOS)
            yield (
                f"{prefix}{i:05d}",
                {
                    "jpg": _encode(render(*combo, rng), "jpg", rng),
                    "txt": caption(*combo, rng).encode(),
                    "cls": str(colours.index(combo[1])).encode(),
                },
            )

    write_shards(samples(400, "t"), out, "train", 100)
    write_shards(samples(240, "v"), out, "val", 240)
    (out / "classes.json").write_text(
        json.dumps({"classnames": colours, "templates": ["a {} shape", "something {}", "a picture in {}"]})
    )
    return out
