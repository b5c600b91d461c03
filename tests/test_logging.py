"""What a run reports beside metrics.jsonl: a Weights & Biases run (offline here: no network) whose history is
metrics.jsonl's scalars, with the evaluation's table and plots, continued under the same id by a resumed run; a clear
error before the first step without the wandb package; and `tessera report`'s picture of a run."""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from pathlib import Path

import pytest

from tessera.train.components.metrics import _flatten

from .conftest import PY, run_cli
from .test_train import tiny_run_args

wandb = pytest.importorskip("wandb", reason="the wandb extra")
from wandb.proto import wandb_internal_pb2  # noqa: E402

BLOCK = 32768  # the .wandb file: a LevelDB-style log of protobuf records in 32 KiB blocks, after a 7-byte header
FULL, LAST = 1, 4


def wandb_records(path: Path) -> list:
    """Every record of an offline run's `run-<id>.wandb` file, in order."""
    data, pos, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += BLOCK - pos % BLOCK
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a run's file once W&B's service has written its last (`exit`): `run.finish()` can return before
    the service, another process, has flushed the file (seen under load)."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path) if path.is_file() else []
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def offline_run(out: Path) -> tuple[str, list[dict]]:
    """The id and the history rows (key -> value, W&B's own `_` keys left out) of the one offline run in `out`."""
    (run_dir,) = sorted((out / "wandb").glob("offline-run-*"))
    (path,) = run_dir.glob("run-*.wandb")
    rows = []
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "history":
            flat = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            media = {k.removesuffix("/_type") for k in flat if k.endswith("/_type")}  # a table's, an image's fields
            row: dict = {}
            for key, value in flat.items():
                name = next((m for m in media if key.startswith(m + "/")), None)
                if name is None:
                    row[key] = value
                else:
                    row.setdefault(name, {})[key.removeprefix(name + "/")] = value
            rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    return path.stem.removeprefix("run-"), rows


def scalar_rows(rows: list[dict]) -> list[dict]:
    """The rows of logged scalars (media rows hold tables and images)."""
    return [r for r in rows if not any(isinstance(v, dict) for v in r.values())]


def as_rows(out: Path) -> list[dict]:
    """metrics.jsonl as the trackers see it: each line's finite scalars under `kind/`, with its step."""
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step, kind = record.pop("step"), record.pop("kind")
        record.pop("time")
        rows.append({"step": step, **{f"{kind}/{k}": v for k, v in _flatten(record).items()}})
    return rows


def assert_same(logged: list[dict], written: list[dict]) -> None:
    assert len(logged) == len(written), ([r["step"] for r in logged], [r["step"] for r in written])
    for x, y in zip(logged, written):
        assert x.keys() == y.keys(), (x["step"], sorted(x.keys() ^ y.keys()))
        assert all(math.isclose(x[k], y[k], rel_tol=1e-12) for k in x), (x, y)


WANDB_RUN = [
    "log.report_to=[wandb, tensorboard]",
    "log.wandb.mode=offline",
    "log.wandb.project=tessera-tests",
    "log.wandb.tags=[tiny, offline]",
    "train.precision=fp32",
    "train.steps=4",
    "train.log_every=1",
    "train.ckpt_every=2",
    "eval.every=2",
    "data.num_workers=0",
]


@pytest.mark.slow
def test_an_offline_wandb_run_holds_metrics_jsonl_and_a_resumed_run_continues_it(
    demo_shards, tmp_path, in_process_training, monkeypatch
):
    from tessera.train.pretrain import main

    monkeypatch.setenv("WANDB_SILENT", "true")
    val = f"data.val={demo_shards}/train-txt-000000.tar"  # 60 samples: a quick evaluation
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(tiny_run_args(demo_shards, full, *WANDB_RUN, val)) == 0
    run_id, rows = offline_run(full)
    assert_same(scalar_rows(rows), as_rows(full))
    kinds = [r["step"] for r in scalar_rows(rows) if any(k.startswith("eval/metrics/") for k in r)]
    assert kinds == [2, 4]  # the evaluation at step 2 and at the end
    media = {k: v for r in rows for k, v in r.items() if isinstance(v, dict)}
    assert media["eval/retrieval"]["_type"] == "table-file" and media["eval/retrieval"]["nrows"] == 2
    assert media["eval/retrieval_recall"]["_type"] == "image-file"  # the end's R@K plot
    assert (full / "tensorboard").is_dir()  # beside it, as asked
    config = finished_records(next((full / "wandb").glob("offline-run-*/run-*.wandb")))[1]
    assert config.run.run_id == run_id and list(config.run.tags) == ["tiny", "offline"]
    assert config.run.project == "tessera-tests" and config.run.display_name == "full"

    # resumed from the step-2 checkpoint, elsewhere: the same W&B run goes on from step 3
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step00000002", resumed / "checkpoints" / "step00000002")
    (resumed / "checkpoints" / "latest").write_text("step00000002")
    assert main(tiny_run_args(demo_shards, resumed, *WANDB_RUN, val, "resume=latest")) == 0
    resumed_id, rows = offline_run(resumed)
    assert resumed_id == run_id
    assert_same(scalar_rows(rows), as_rows(resumed))
    assert [r["step"] for r in scalar_rows(rows)][0] == 3


@pytest.mark.slow
def test_wandb_without_the_package_is_a_clear_error_before_the_first_step(demo_shards, tmp_path):
    out = tmp_path / "run"
    script = (
        "import runpy, sys; sys.modules['wandb'] = None; "  # what an environment without the package imports
        "runpy.run_module('tessera.train.pretrain', run_name='__main__', alter_sys=True)"
    )
    args = tiny_run_args(demo_shards, out, "log.report_to=[wandb]", "data.num_workers=0")
    proc = run_cli([PY, "-c", script, *args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "log.report_to names wandb" in proc.stderr and "pip install -e '.[wandb]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def _metrics_file(run: Path) -> list[dict]:
    lines = []
    for step in (2, 4, 6):
        lines.append(
            {
                "step": step,
                "kind": "train",
                "time": 0.0,
                "loss/image-text": 5.0 - step / 2,
                "loss": 5.0 - step / 2,
                "temperature/image-text": 0.07 - step / 1000,
                "lr": 1e-4 * step,
                "samples_per_s": 100.0 + step,
                "data_wait": 0.01 * step,
                "grad_norm": 3.0 / step,
                "data": {"seen": 10 * step, "skipped": {"missing_image": step // 2}, "events": {}},
            }
        )
    for kind, r1 in (("eval", 0.5), ("eval_ema", 0.6)):
        lines.append(
            {
                "step": 6,
                "kind": kind,
                "time": 0.0,
                "metrics": {"image_to_text_R@1": r1, "image_to_text_R@5": 0.9, "image_retrieval_recall@1": r1},
                "zeroshot": {"image": {"metrics": {"acc1": r1 / 2}}},
            }
        )
    run.mkdir()
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 8, "kind": "tra'  # cut short by a crash
    (run / "metrics.jsonl").write_text(text)
    return lines


def test_report_plots_every_curve_of_a_run_and_counts_a_cut_line(tmp_path, capsys):
    from tessera.tools.report import main, read_metrics, series

    run = tmp_path / "run"
    lines = _metrics_file(run)
    read, bad = read_metrics(run)
    assert read == lines and bad == 1
    curves = series(read)
    assert curves["loss"]["image-text"] == [(2, 4.0), (4, 3.0), (6, 2.0)] and curves["loss"]["total"][-1] == (6, 2.0)
    assert curves["skipped"]["missing_image"] == [(2, 1.0), (4, 2.0), (6, 3.0)]
    assert curves["R@1"] == {"image_to_text": [(6, 0.5)], "image_to_text (ema)": [(6, 0.6)]}
    assert curves["acc1"] == {"image": [(6, 0.25)], "image (ema)": [(6, 0.3)]}
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert f"report: {run / 'report.png'}" in out and "left out: 1 line(s)" in out
    for panel in ("loss", "lr", "temperature", "samples_per_s", "data_wait", "skipped", "grad_norm", "R@1", "acc1"):
        assert panel in out.split("panels: ")[1]
    assert (run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_errors_say_what_to_fix(tmp_path, capsys):
    from tessera.tools.report import main

    assert main([str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main([str(tmp_path)]) == 2
    assert "no training or evaluation line" in capsys.readouterr().err
    _metrics_file(tmp_path / "run")
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "no" / "such.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_online_wandb_run_without_a_login_is_a_clear_error(tmp_path, monkeypatch):
    from tessera.config import UserError
    from tessera.train.components.metrics import MetricsLogger
    from tessera.train.recipes.config import LogConfig, WandbConfig

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc holding a key
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    log = LogConfig(report_to=["wandb"], wandb=WandbConfig(mode="online"))
    with pytest.raises(UserError, match=r"wandb could not start the run: .*wandb login.*log.wandb.mode=offline"):
        MetricsLogger(tmp_path / "run", True, 10, log=log)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
