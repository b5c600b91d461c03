"""The package's shape: one `tessera` namespace, and the import graph's layering that users and workers rely on."""

from __future__ import annotations

import json

from .conftest import PY, jpeg_bytes, run_cli


def test_commands_work_from_a_folder_holding_data_models_train_and_eval_folders(tmp_path):
    """A user's project folder with its own data/, models/, train/ and eval/ packages shadows none of Tessera's."""
    for name in ("data", "models", "train", "eval"):
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
