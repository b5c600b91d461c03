"""CLIP_benchmark as a client and as a data source: the real `clip_benchmark eval` on an exported model, on data in
its own webdataset layout, gives the numbers our evaluation gives on the same data, under the same names."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tessera.data.demo import COLORS, COMBOS, _encode, caption, render
from tessera.data.make_shards import write_shards
from tessera.eval.retrieval import main as retrieval_main
from tessera.eval.zeroshot import main as zeroshot_main
from tessera.models import save_model

from .conftest import PY, TINY_MODEL, call_main, run_cli
from .test_interop import _trained_like

pytestmark = pytest.mark.slow


def _benchmark_dataset(root, kind: str, n: int, shards: int, seed: int = 0) -> None:
    """A CLIP_benchmark webdataset: test/{0..shards-1}.tar + test/nshards.txt; retrieval samples carry several
    captions in one .txt (one per line), classification samples a `cls` and the root classnames + templates."""
    rng = random.Random(seed)
    colours = list(COLORS)

    def samples():
        for i in range(n):
            combo = rng.choice(COMBOS)
            sample = {"jpg": _encode(render(*combo, rng), "jpg", rng)}
            if kind == "retrieval":
                sample["txt"] = "\n".join(caption(*combo, rng) for _ in range(1 + i % 3)).encode()
            else:
                sample["cls"] = str(colours.index(combo[1])).encode()
            yield f"s{i:05d}", sample

    (root / "test").mkdir(parents=True)
    per = -(-n // shards)
    write_shards(samples(), root / "test", "tmp", per)
    for i, tar in enumerate(sorted((root / "test").glob("tmp-*.tar"))):
        tar.rename(root / "test" / f"{i}.tar")
    (root / "test" / "sizes.json").unlink(missing_ok=True)
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    (root / "dataset_type.txt").write_text(f"{kind}\n")
    if kind == "classification":
        (root / "classnames.txt").write_text("\n".join(colours) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c} shape.\na {c} thing\n")


# CLIP_benchmark 1.6.2 (its newest release) calls float() on a one-element 1-D array in its top-k accuracy, which
# NumPy 2.4 (our pin) refuses; this runs its CLI with that one line computed as it means it (a 0-d sum), and
# nothing else changed.
RUN_CLIP_BENCHMARK = """
import sys
from clip_benchmark import cli
from clip_benchmark.metrics import zeroshot_classification as zc

def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]

zc.accuracy = accuracy
sys.argv = ["clip_benchmark", *sys.argv[1:]]
sys.exit(cli.main())
"""


def _clip_benchmark(model_dir, root, task: str, out) -> dict:
    proc = run_cli(
        [
            PY, "-c", RUN_CLIP_BENCHMARK, "eval", "--model_type", "open_clip",
            "--model", f"local-dir:{model_dir / 'open_clip'}", "--pretrained", "tessera",
            "--dataset", f"wds/{root.name}", "--dataset_root", str(root), "--task", task,
            "--recall_k", "1", "5", "10", "--batch_size", "32", "--num_workers", "0", "--no_amp", "--output", str(out),
        ]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_clip_benchmark_on_our_export_equals_our_evaluation_on_its_own_layout(tmp_path, capsys):
    model_dir = save_model(_trained_like(TINY_MODEL), tmp_path / "model")
    retrieval, classification = tmp_path / "shapes_captions", tmp_path / "shape_colours"
    _benchmark_dataset(retrieval, "retrieval", n=90, shards=2)
    _benchmark_dataset(classification, "classification", n=120, shards=1, seed=1)

    theirs = _clip_benchmark(model_dir, retrieval, "zeroshot_retrieval", tmp_path / "cb_retrieval.json")
    (tmp_path / "ours").mkdir()
    args = ["--model", str(model_dir), "--data", str(retrieval), "--out", str(tmp_path / "ours")]
    rc, _, err = call_main(retrieval_main, args, capsys)
    assert rc == 0, err
    # CLIP_benchmark's file name and fields, with the model's path as its name (slashes made underscores)
    (ours_file,) = (tmp_path / "ours").glob("shapes_captions_tessera_*_en_zeroshot_retrieval.json")
    ours = json.loads(ours_file.read_text())
    assert ours["dataset"] == theirs["dataset"] == "wds/shapes_captions" and ours["task"] == theirs["task"]
    # every caption line is a query: 90 images with 1, 2 or 3 captions each
    assert ours["rows"]["image-text"] == {"image": 90, "text": 180}
    for k in (1, 5, 10):
        for name in (f"image_retrieval_recall@{k}", f"text_retrieval_recall@{k}"):
            assert ours["metrics"][name] == pytest.approx(theirs["metrics"][name], abs=1e-6), name

    theirs = _clip_benchmark(model_dir, classification, "zeroshot_classification", tmp_path / "cb_zeroshot.json")
    out = tmp_path / "ours_zeroshot.json"
    args = ["--model", str(model_dir), "--data", str(classification / "test"), "--out", str(out)]
    rc, _, err = call_main(zeroshot_main, args, capsys)
    assert rc == 0, err
    ours = json.loads(out.read_text())
    assert ours["n"] == 120 and ours["classes"] == len(COLORS)
    for name in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours["metrics"][name] == pytest.approx(theirs["metrics"][name], abs=1e-6), name


def test_a_bad_nshards_is_a_clear_error(tmp_path, capsys):
    model_dir = save_model(_trained_like(TINY_MODEL), tmp_path / "model")
    (tmp_path / "ds" / "test").mkdir(parents=True)
    (tmp_path / "ds" / "test" / "nshards.txt").write_text("two\n")
    rc, _, err = call_main(retrieval_main, ["--model", str(model_dir), "--data", str(tmp_path / "ds")], capsys)
    assert rc == 2 and "positive shard count" in err


def test_mteb_evaluates_our_model_on_a_local_task_with_our_embeddings(tmp_path, capsys):
    import mteb

    import tessera
    from tessera.eval.mteb import TesseraEncoder, zeroshot_task

    model_dir = save_model(_trained_like(TINY_MODEL), tmp_path / "model")
    data = tmp_path / "shape_colours"
    _benchmark_dataset(data, "classification", n=60, shards=1, seed=1)
    # the documented command: mteb's result JSON, and its accuracy is our acc1 with the same (single) prompt
    proc = run_cli(
        [PY, "-m", "tessera.eval.mteb", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads((tmp_path / "TesseraShards.json").read_text())["scores"]["test"][0]
    (tmp_path / "one.json").write_text(
        json.dumps({"classnames": list(COLORS), "templates": ["a photo of a {} shape."]})
    )
    args = ["--model", str(model_dir), "--data", str(data), "--classes", str(tmp_path / "one.json")]
    rc, _, err = call_main(zeroshot_main, [*args, "--out", str(tmp_path / "ours.json")], capsys)
    assert rc == 0, err
    assert scores["accuracy"] == pytest.approx(json.loads((tmp_path / "ours.json").read_text())["metrics"]["acc1"])
    # mteb's scores for every sample and class come from our similarities of the same pictures and prompts
    model = tessera.load(model_dir, device="cpu")
    prompts = [f"a photo of a {c} shape." for c in COLORS]
    task = zeroshot_task([str(data)], "image", prompts, "TesseraShards")
    mteb.evaluate(TesseraEncoder(model), task, cache=None, prediction_folder=tmp_path / "pred", show_progress_bar=False)
    (pred_file,) = (tmp_path / "pred").glob("*.json")
    pred = json.loads(pred_file.read_text())
    got = torch.tensor(pred["default"]["test"] if "default" in pred else pred["test"], dtype=torch.float32)
    task.load_data()
    want = model.similarity(images=list(task.dataset["test"]["image"]), texts=prompts)
    assert got.shape in (want.shape, want.T.shape)
    # mteb stores softmax(100 x cosine), CLIP's fixed scale, per sample
    assert torch.allclose(got if got.shape == want.shape else got.T, (100 * want).softmax(-1), atol=1e-4)
    assert want.std(0).min() > 1e-3  # the pictures' scores differ: the check sees which picture is which
    # an audio batch reaches the audio tower (mteb gives {"array", "sampling_rate"})
    audio_cfg = {
        **TINY_MODEL,
        "towers": {**TINY_MODEL["towers"], "audio": {"encoder": "ast", "width": 32, "depth": 1, "heads": 2}},
    }
    joint = tessera.eval.api.Model(_trained_like(audio_cfg))
    wave = torch.randn(16000, generator=torch.Generator().manual_seed(0)).numpy()
    batch = {"audio": [{"array": wave, "sampling_rate": 16000}]}
    encoded = TesseraEncoder(joint).encode([batch], task_metadata=None, hf_split="test", hf_subset="default")
    assert torch.allclose(torch.as_tensor(encoded), joint.embed(sounds=[(torch.as_tensor(wave), 16000)]), atol=1e-6)


def test_tessera_eval_mteb_without_the_extra_says_how_to_install_it(tmp_path):
    script = """
import sys
sys.modules["mteb"] = None  # as if the mteb extra were not installed
from tessera.train.cli import main
sys.exit(main(["eval", "mteb", "--model", "m", "--data", "d.tar"]))
"""
    proc = run_cli([PY, "-c", script])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install -e '.[mteb]'" in proc.stderr and "Traceback" not in proc.stderr
