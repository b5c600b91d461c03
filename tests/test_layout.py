"""The package's shape: one `tessera` namespace, and the import graph's layering that users and workers rely on."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

from tessera import modalities
from tessera.data import Decoder
from tessera.models import Encoder

from .conftest import PY, ROOT, jpeg_bytes, run_cli


def test_commands_work_from_a_folder_holding_data_models_train_and_eval_folders(tmp_path):
    """A user's project folder with its own data/, models/, train/ and eval/ packages shadows none of Tessera's."""
    for name in ("data", "models", "losses", "train", "eval", "tools"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} package')\n")
    (tmp_path / "pic.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "samples.jsonl").write_text(json.dumps({"image": "pic.jpg", "text": "a red picture"}) + "\n")

    # `python -c` puts the folder first on sys.path, as `python -m` does; one interpreter runs every entry point
    script = """
import contextlib, io, runpy, sys
for module in ("tessera.train.pretrain", "tessera.train.finetune", "tessera.eval.retrieval", "tessera.eval.zeroshot",
               "tessera.eval.linear_probe", "tessera.data.make_shards", "tessera.data.demo", "tessera.train.cli"):
    sys.argv = [module, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            assert exc.code in (0, None), (module, exc.code)
    assert "usage" in out.getvalue().lower() or "tessera pretrain" in out.getvalue(), module
    print("ok", module)
sys.argv = ["make_shards", "--manifest", "samples.jsonl", "--out", "shards"]
with contextlib.suppress(SystemExit):
    runpy.run_module("tessera.data.make_shards", run_name="__main__", alter_sys=True)
from tessera.models import build_model, load_model
from tessera.data import expand_shards
print(expand_shards("shards"))
"""
    proc = run_cli([PY, "-c", script], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok tessera.") == 8 and "shard-000000.tar" in proc.stdout, proc.stdout


PACKAGES = {
    "tessera": ROOT / "tessera",
    "tessera.models": ROOT / "models",
    "tessera.data": ROOT / "data",
    "tessera.losses": ROOT / "losses",
    "tessera.train": ROOT / "train",
    "tessera.eval": ROOT / "eval",
    "tessera.tools": ROOT / "tools",
}
_ASSEMBLY = (
    "tessera.train.recipes.tasks",
    "tessera.train.loop",
    "tessera.train.pretrain",
    "tessera.train.finetune",
    "tessera.train.cli",
)
# what each layer may not import, at module level or when used
LAYERS = {
    "tessera.data": ("tessera.models", "tessera.train", "tessera.eval"),
    "tessera.models": ("tessera.data", "tessera.train", "tessera.eval"),
    # the loss is a library of its own: torch only, usable without the loader, the models or the trainer
    "tessera.losses": ("tessera.data", "tessera.models", "tessera.train", "tessera.eval"),
    "tessera.eval": ("tessera.train", "tessera.tools"),
    # offline tools prepare runs from models and shards; they never need the training runtime
    "tessera.tools": ("tessera.train",),
    # the loop's components never reach up to the tasks that assemble them, the loop or the entry points
    "tessera.train.components": _ASSEMBLY,
    "tessera.train.distributed": _ASSEMBLY,
    # a recipe is read (and --help printed) without the runtime: no DeepSpeed, no engine, no loop
    **{
        f"tessera.train.recipes.{m}": ("tessera.train.components", "tessera.train.distributed", *_ASSEMBLY)
        for m in ("config", "runs", "load")
    },
}
# function-local imports allowed: optional extras only (RDKit, the `chem` extra, and PyG's converter of its molecules;
# wandb, the `wandb` extra) imported where first used: optional libraries, and the loss's Triton kernels (importing
# triton jit-compiles its library, which a CPU run never needs)
OPTIONAL_EXTRAS = ("rdkit", "torch_geometric.utils", "tessera.losses.kernels", "wandb")


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            name = ".".join([package, *path.relative_to(folder).with_suffix("").parts])
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, nested: bool) -> list[tuple[str, int]]:
    """(module, line) of the Tessera modules `name` imports at module level (nested=False), or of every import
    inside a function (nested=True)."""
    tree = ast.parse(path.read_text())
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function == nested:
                if isinstance(child, ast.Import):
                    found.extend((a.name, child.lineno) for a in child.names)
                else:
                    base = child.module or ""
                    if child.level:
                        parts = package.split(".")
                        base = ".".join(parts[: len(parts) - child.level + 1] + ([base] if base else []))
                    found.extend([(f"{base}.{a.name}", child.lineno) for a in child.names] + [(base, child.lineno)])
            visit(child, inner)

    visit(tree, False)
    return found


def test_every_modality_is_one_registry_entry_with_self_contained_parts():
    for name, entry in modalities.MODALITIES.items():
        dec = modalities.decoder(name)
        assert isinstance(dec, Decoder) and dec.modality == name and dec.suffixes, name
        assert entry.template.count("{}") == 1
        for enc_name in entry.encoders:
            cls = modalities.encoder_class(enc_name)
            assert issubclass(cls, Encoder) and dataclasses.is_dataclass(cls.config_cls), enc_name
    assert modalities.language() == "text"
    assert len({m.keyword for m in modalities.MODALITIES.values() if m.encoders}) == len(
        [m for m in modalities.MODALITIES.values() if m.encoders]
    ), "every modality with a tower has its own Python API keyword"
    # generic code names no modality and no encoder: they come from the registry
    generic = [
        "data/loader.py",
        "data/pipeline.py",
        "data/per_source.py",
        "data/make_shards.py",
        "data/shards.py",
        "models/lora.py",
        "models/prompts.py",
        "models/adapters.py",
        "models/multitower.py",
        "eval/common.py",
        "eval/retrieval.py",
        "eval/ranking.py",
        "eval/joint.py",
        "eval/zeroshot.py",
        "eval/linear_probe.py",
        "eval/api.py",
        "train/loop.py",
        "train/recipes/tasks.py",
        "train/components/objectives.py",
        "train/distributed/engine.py",
        "train/components/export.py",
        "train/components/evaluate.py",
    ]
    names = [*(m for m, entry in modalities.MODALITIES.items() if entry.encoders), *modalities.encoder_names()]
    for rel in generic:
        code = "\n".join(line for line in (ROOT / rel).read_text().splitlines() if not line.lstrip().startswith("#"))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                raise AssertionError(f"{rel}:{node.lineno} names '{node.value}': ask tessera.modalities instead")


def test_the_import_graph_is_layered_and_acyclic():
    modules = _modules()
    graph = {
        name: {m for m, _ in _imports(name, path, nested=False) if m in modules and m != name}
        for name, path in modules.items()
    }
    for name, deps in graph.items():
        for layer, forbidden in LAYERS.items():
            if name == layer or name.startswith(layer + "."):
                bad = sorted(d for d in deps if d.startswith(forbidden))
                assert not bad, f"{name} imports {bad}"
    if name.startswith("tessera.") and name.count(".") == 1 and name not in PACKAGES:  # the root's own modules
        assert not [d for d in graph[name] if d.startswith(tuple(PACKAGES)[1:])]
    # no cycle: repeatedly remove modules that import nothing left
    left = dict(graph)
    while left:
        leaves = [m for m, deps in left.items() if not deps & left.keys()]
        assert leaves, f"import cycle among {sorted(left)}"
        for m in leaves:
            del left[m]


def test_modules_imported_when_used_keep_the_layers():
    """A string naming a Tessera module ("tessera.eval.commands", "tessera.data.image:ImageDecoder") is what a module
    imports when used (importlib, the modality registry): those imports obey the layers too."""
    modules = _modules()
    named = {
        name: {
            node.value.partition(":")[0]
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.partition(":")[0] in modules
        }
        for name, path in modules.items()
    }
    assert (
        "tessera.eval.commands" in named["tessera.train.cli"]
        and "tessera.train.loop" in named["tessera.train.pretrain"]
    )
    for name, deps in named.items():
        for layer, forbidden in LAYERS.items():
            if name == layer or name.startswith(layer + "."):
                bad = sorted(d for d in deps if d.startswith(forbidden))
                assert not bad, f"{name} imports {bad} when used"


def test_no_function_local_imports_but_optional_extras():
    local = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for name, path in _modules().items()
        for module, line in _imports(name, path, nested=True)
        if not module.startswith(OPTIONAL_EXTRAS)
    ]
    assert not local, "\n".join(local)


def test_reading_shards_imports_no_model_library(tmp_path):
    """A loader worker decodes and batches without open_clip, transformers, peft, deepspeed or torch_geometric."""
    script = f"""
import io, sys
import numpy as np
from tessera.data import SampleStats, expand_shards
from tessera.data.make_shards import write_shards
from tessera.data.shards import iter_raw_samples
from tessera.data.loader import eval_batches
from tessera.data import SourceConfig
buf = io.BytesIO(); np.savez(buf, x=np.ones((3, 2), np.float32), edge_index=np.array([[0, 1], [1, 2]]))
from PIL import Image
img = io.BytesIO(); Image.new("RGB", (8, 8), (200, 0, 0)).save(img, format="PNG")
write_shards([("a", {{"png": img.getvalue(), "txt": b"a red square", "graph.npz": buf.getvalue(), "cls": b"1"}})],
             "{tmp_path}", "s", 1)
keys = ["image", "text", "graph", "label"]
keep = lambda v: v
batch = next(eval_batches([SourceConfig("{tmp_path}/s-000000.tar")], {{m: keep for m in keys}},
                          {{m: list for m in keys}}, keys, 1))
assert batch["graph"][0].num_nodes == 3 and batch["label"] == [1], batch
heavy = [m for m in ("open_clip", "transformers", "peft", "deepspeed", "torch_geometric", "timm", "tessera.models")
         if m in sys.modules]
print("heavy:", heavy)
"""
    proc = run_cli([PY, "-c", script])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "heavy: []" in proc.stdout, proc.stdout
