"""Beyond the plain objective: each option against its baseline at equal compute, in one run.

Matryoshka (loss.matryoshka), two parts:
- `loss`: forward + backward time of the loss at every prefix from shared tiles (losses/matryoshka.py), against the
  plain loss at full width and against the obvious alternative, one plain loss per prefix on truncated features.
  One process, median of --repeats, fp32, B x D features.
- `train`: the demo recipe (configs/demo.yaml, embed_dim 128) trained twice for --steps on the demo data, plainly
  and with loss.matryoshka=[16, 32, 64], then both evaluated at 1/8, 1/4, 1/2 and all of the width (each prefix
  renormalised): retrieval R@1 both ways and zero-shot shape classification, from one embedding pass per model.

Hard-negative batches (data.batch_plan, B3), part `batches`: the demo recipe at a small batch (--plan-batch 32) for
--plan-steps with random batches, and from scratch with a batch plan, without and with a --mix fraction of random
batches. The plan is `tessera plan-batches` on a teacher, the demo recipe as it is (batch 128) for --teacher-steps,
with communities of plan_batch / per_batch samples and a duplicate guard (--max-similarity: the demo repeats each of
its 480 combinations ~17 times, and those copies are false negatives). Each evaluated as above at full width, and
trained once per --plan-seeds seed (the table gives the means and each seed's t2i R@1).

Three modalities, part `tuples`: configs/demo-triple.yaml (pictures, sounds, captions; the joint demo data) for
--tuple-steps five ways: the text-anchored pairs, the same with loss.weights and loss.temperature_range on the
sound-caption pair, all pairs, and the anchored pairs plus Symile's or GRAM's tuple term. Each evaluated on the
joint held-out set: R@1 for every pair both ways, and image + audio -> text under each joint scoring rule.

    python scripts/bench_beyond.py                        # every part, about 2 h on 2 cores
    python scripts/bench_beyond.py --only loss --batch 8192
    python scripts/bench_beyond.py --only train --steps 600
    python scripts/bench_beyond.py --only batches --plan-batch 32 --plan-steps 600 --plan-seeds 0,1,2
    python scripts/bench_beyond.py --only tuples --tuple-steps 600   # about 50 min

Writes runs/bench_beyond/results.json (a part run alone keeps the others' results), results.md (the tables),
matryoshka.png (R@1 against width) and tuples.png (R@1 per objective). Run it alone: two torch processes side by
side slow each other down several times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
EMBED_DIM = 128  # configs/demo.yaml
PREFIXES = (16, 32, 64)  # of the demo's 128: 1/8, 1/4, 1/2
TRAIN_SHARDS = ("train-txt-{000000..000003}.tar", "train-json-{000000..000003}.tar")
JOINT_RULES = ("sum", "mip", "volume")
BATCH_METRICS = ("text_to_image_R@1", "image_to_text_R@1", "zeroshot_acc1")
DIRECTIONS = ("image_to_text", "text_to_image", "audio_to_text", "text_to_audio", "image_to_audio", "audio_to_image")


def time_loss(batch: int, dim: int, repeats: int) -> dict:
    from tessera.losses import contrastive_loss, matryoshka_losses
    from tessera.models import truncate_embeddings

    dims = (dim // 8, dim // 4, dim // 2, dim)
    g = torch.Generator().manual_seed(0)
    a0 = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    b0 = F.normalize(torch.randn(batch, dim, generator=g) + a0, dim=-1)
    scale0 = torch.tensor(14.3)

    def plain(a, b, s):
        return contrastive_loss(a, b, s)

    def shared(a, b, s):
        return matryoshka_losses(a, b, s, dims=dims).mean()

    def per_prefix(a, b, s):
        cut = truncate_embeddings
        return torch.stack([contrastive_loss(cut(a, d), cut(b, d), s) for d in dims]).mean()

    out = {}
    for name, fn in (("plain", plain), ("matryoshka", shared), ("per_prefix", per_prefix)):
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            a, b, s = (t.clone().requires_grad_(True) for t in (a0, b0, scale0))
            t0 = time.perf_counter()
            fn(a, b, s).backward()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times[1:])
    return {"batch": batch, "dim": dim, "dims": list(dims), "seconds": out}


def demo_data(out: Path) -> Path:
    data = out / "data"
    if not (data / "classes.json").is_file():
        subprocess.run([sys.executable, "-m", "tessera.data.demo", "--out", str(data)], check=True, cwd=ROOT)
    return data


def train_demo(out: Path, name: str, steps: int, *overrides: str, recipe: str = "demo.yaml", train=None) -> dict:
    """A demo recipe trained for `steps` into out/name on the demo data (`train`: its data.train, by default the
    image-text sources), fp32, no checkpoints, no evaluation; and its timing."""
    data = demo_data(out)
    train = train or [(TRAIN_SHARDS[0], 0.6, None), (TRAIN_SHARDS[1], 0.4, None)]
    sources = ", ".join(
        f"{{shards: '{data}/{shards}', weight: {weight}" + (f", modalities: [{', '.join(m)}]}}" if m else "}")
        for shards, weight, m in train
    )
    run = out / name
    args = [
        sys.executable,
        "-m",
        "tessera.train.pretrain",
        "--config",
        f"configs/{recipe}",
        f"output_dir={run}",
        f"data.train=[{sources}]",
        "data.val=[]",  # evaluated below, the same way for every run
        f"eval.classes={data / 'classes.json'}",  # the recipe's names runs/demo/data
        f"train.steps={steps}",
        "train.precision=fp32",
        "train.ckpt_every=-1",
        *overrides,
    ]
    t0 = time.time()
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return {"seconds": time.time() - t0, "model": str(run / "model")}


def compare_tuples(out: Path, steps: int) -> dict:
    """configs/demo-triple.yaml (pictures, sounds, captions) five ways: pairwise with text the anchor (plain, and with
    the sound-caption pair weighted up and its temperature bounded), all pairs, and the anchor pairs plus Symile's
    or GRAM's term on the pictures-sounds source. Each evaluated on the joint held-out set: retrieval for every
    pair, and image + audio -> text under each scoring rule."""
    from tessera.data import SourceConfig
    from tessera.eval.joint import evaluate_joint_query
    from tessera.eval.retrieval import evaluate_pairs
    from tessera.models import load_model

    data = demo_data(out)
    if not (data / "val-joint-000000.tar").is_file():
        subprocess.run([sys.executable, "-m", "tessera.data.demo_joint", "--out", str(data)], check=True, cwd=ROOT)
    train = [
        (TRAIN_SHARDS[0], 0.35, ("image", "text")),
        ("sounds-{000000..000003}.tar", 0.35, ("audio", "text")),
        ("pictures-sounds-000000.tar", 0.3, ("image", "audio", "text")),
    ]
    val = [SourceConfig(str(data / "val-joint-000000.tar"), modalities=["image", "text", "audio"])]
    pairwise = ["model.tuples=[]", "loss.higher_order=none"]
    variants = {
        "anchor": pairwise,
        # loss.weights and loss.temperature_range: the sound-caption pair counts double, its temperature in [0.03, 0.2]
        "anchor, weighted": [
            *pairwise,
            "loss.weights={audio-text: 2.0}",
            "loss.temperature_range={audio-text: [0.03, 0.2]}",
        ],
        "all_pairs": ["model.pairing=all_pairs", *pairwise],
        "symile": [],
        "gram": ["model.tuples=[[text, image, audio]]", "loss.higher_order=gram"],
    }
    runs = {}
    for name, overrides in variants.items():
        run = train_demo(
            out, f"tuples-{name.replace(', ', '-')}", steps, *overrides, recipe="demo-triple.yaml", train=train
        )
        model = load_model(run["model"])
        pairs = evaluate_pairs(model, val, [("image", "text"), ("audio", "text"), ("image", "audio")], 256)
        joint = evaluate_joint_query(model, val, ("image", "audio"), "text", 256, rules=JOINT_RULES)
        run["retrieval"] = {k: v for k, v in pairs["metrics"].items() if k.endswith("_R@1")}
        run["joint"] = {rule: m["image+audio_to_text_R@1"] for rule, m in joint["metrics"].items()}
        run["n"] = joint["n"]
        runs[name] = run
    return {"steps": steps, "runs": runs}


def compare_matryoshka(out: Path, steps: int) -> dict:
    runs = {
        "plain": train_demo(out, "plain", steps),
        "matryoshka": train_demo(out, "matryoshka", steps, f"loss.matryoshka={list(PREFIXES)}"),
    }
    for r in runs.values():
        r.update(evaluate(Path(r.pop("model")), demo_data(out)))
    return {"steps": steps, **runs}


def compare_batches(
    out: Path, steps: int, batch: int, teacher_steps: int, plan_args: list[str], mix: float, seeds: list[int]
) -> dict:
    """Random batches against a batch plan (B3) at equal steps and batch size, every run from scratch, once per seed
    in `seeds`. The plan comes from a teacher: the demo recipe as it is (batch 128) for `teacher_steps`, reported
    apart."""
    data = demo_data(out)
    teacher = train_demo(out, "batches-teacher", teacher_steps)
    teacher.update(evaluate(Path(teacher["model"]), data, widths=())[str(EMBED_DIM)])
    plan = out / "batch-plan.json"
    t0 = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tessera.tools.plan_batches",
            "--model",
            teacher["model"],
            *(arg for shards in TRAIN_SHARDS for arg in ("--data", str(data / shards))),
            "--out",
            str(plan),
            "--batch-size",
            str(batch),
            *plan_args,
        ],
        check=True,
        cwd=ROOT,
    )
    plan_seconds = time.time() - t0
    variants = {
        "random": [],
        "plan": [f"data.batch_plan={plan}", "data.batch_plan_random=0"],
        f"plan+{mix:g} random": [f"data.batch_plan={plan}", f"data.batch_plan_random={mix}"],
    }
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in seeds:  # the run's seed: initialisation, augmentation, and the order the plan's batches come in
        for name, overrides in variants.items():
            tag = name.replace(" ", "-") + (f"-seed{seed}" if seed else "")
            run = train_demo(out, f"batches-{tag}", steps, f"train.batch_size={batch}", f"seed={seed}", *overrides)
            run.update(evaluate(Path(run["model"]), data, widths=())[str(EMBED_DIM)], seed=seed)
            runs[name].append(run)
    doc = json.loads(plan.read_text())
    return {
        "steps": steps,
        "batch": batch,
        "teacher_steps": teacher_steps,
        "teacher": teacher,
        "plan_args": plan_args,
        "per_batch": doc["per_batch"],
        "plan_seconds": plan_seconds,
        "plan": doc["summary"],
        "runs": runs,
    }


def evaluate(model_dir: Path, data: Path, widths=PREFIXES) -> dict:
    from tessera.data import SourceConfig
    from tessera.eval.retrieval import evaluate_pairs
    from tessera.eval.zeroshot import evaluate_zeroshot, read_classes
    from tessera.models import load_model

    model = load_model(model_dir)
    val = [SourceConfig(str(data / "val-000000.tar"))]
    retrieval = evaluate_pairs(model, val, model.pairs, 256, widths=widths)
    names, templates = read_classes(data / "classes.json")
    zeroshot = evaluate_zeroshot(model, val, "image", names, templates, 256, widths=widths)
    full = str(model.cfg.embed_dim)
    by_width = {**retrieval.get("widths", {}), full: retrieval["metrics"]}
    acc = {**zeroshot.get("widths", {}), full: zeroshot["metrics"]}
    return {
        str(w): {
            "text_to_image_R@1": by_width[str(w)]["text_to_image_R@1"],
            "image_to_text_R@1": by_width[str(w)]["image_to_text_R@1"],
            "zeroshot_acc1": acc[str(w)]["acc1"],
        }
        for w in (*widths, int(full))
    }


def tables(results: dict) -> str:
    lines = []
    if "loss" in results:
        r = results["loss"]
        s = r["seconds"]
        lines += [
            f"## Matryoshka loss, forward + backward (B={r['batch']}, D={r['dim']}, prefixes {r['dims']}, fp32)",
            "",
            "| loss | time / plain |",
            "|---|---|",
            "| plain, full width | 1.00x |",
            f"| Matryoshka, shared tiles | {s['matryoshka'] / s['plain']:.2f}x |",
            f"| one plain loss per prefix | {s['per_prefix'] / s['plain']:.2f}x |",
            "",
        ]
    if "train" in results:
        r = results["train"]
        plain, mrl = r["plain"], r["matryoshka"]
        widths = [w for w in plain if w.isdigit()]
        lines += [
            f"## Demo recipe, {r['steps']} steps: plain vs loss.matryoshka={list(PREFIXES)}",
            "",
            "| width | t2i R@1 plain | t2i R@1 MRL | i2t R@1 plain | i2t R@1 MRL | zero-shot plain | zero-shot MRL |",
            "|---|---|---|---|---|---|---|",
        ]
        for w in widths:
            p, m = plain[w], mrl[w]
            lines.append(
                f"| {w} | {p['text_to_image_R@1']:.1%} | {m['text_to_image_R@1']:.1%} | {p['image_to_text_R@1']:.1%} "
                f"| {m['image_to_text_R@1']:.1%} | {p['zeroshot_acc1']:.1%} | {m['zeroshot_acc1']:.1%} |"
            )
        lines += ["", f"Training time, Matryoshka / plain: {mrl['seconds'] / plain['seconds']:.2f}x", ""]
    if "batches" in results:
        r = results["batches"]
        seeds = [run["seed"] for run in r["runs"]["random"]]
        base = statistics.mean(run["seconds"] for run in r["runs"]["random"])
        lines += [
            f"## Demo recipe, batch {r['batch']}, {r['steps']} steps: random batches vs a batch plan "
            f"({r['per_batch']} communities of {r['plan']['community_size']} a batch; {' '.join(r['plan_args'])}); "
            f"mean over seeds {seeds}",
            "",
            "| batches | t2i R@1 | i2t R@1 | zero-shot | t2i R@1 per seed | training time / random |",
            "|---|---|---|---|---|---|",
        ]
        for name, seeded in r["runs"].items():
            mean = {k: statistics.mean(run[k] for run in seeded) for k in (*BATCH_METRICS, "seconds")}
            per_seed = " / ".join(f"{run['text_to_image_R@1']:.1%}" for run in seeded)
            lines.append(
                f"| {name} | {mean['text_to_image_R@1']:.1%} | {mean['image_to_text_R@1']:.1%} | "
                f"{mean['zeroshot_acc1']:.1%} | {per_seed} | {mean['seconds'] / base:.2f}x |"
            )
        t = r["teacher"]
        lines += [
            "",
            f"The teacher (batch 128, {r['teacher_steps']} steps: t2i R@1 {t['text_to_image_R@1']:.1%}) took "
            f"{t['seconds'] / base:.2f}x a student's time, the plan (embedding {r['plan']['samples']} "
            f"samples, k-NN, communities) {r['plan_seconds'] / base:.2f}x. Under the teacher, two samples "
            f"of a community have a mean cosine similarity of {r['plan']['cohesion']:.3f}, two of a random group "
            f"{r['plan']['random_cohesion']:.3f}; {r['plan']['packed_last']} samples were packed last by the "
            "duplicate guard.",
            "",
        ]
    if "tuples" in results:
        r = results["tuples"]
        any_run = next(iter(r["runs"].values()))
        lines += [
            f"## Three modalities (configs/demo-triple.yaml), {r['steps']} steps: R@1 on the joint held-out set "
            f"({any_run['n']} samples)",
            "",
            "| objective | "
            + " | ".join(d.replace("_to_", "→") for d in DIRECTIONS)
            + " | "
            + " | ".join(f"image+audio→text ({rule})" for rule in JOINT_RULES)
            + " | time / anchor |",
            "|---" * (len(DIRECTIONS) + len(JOINT_RULES) + 2) + "|",
        ]
        for name, run in r["runs"].items():
            cells = [f"{run['retrieval'][f'{d}_R@1']:.1%}" for d in DIRECTIONS]
            cells += [f"{run['joint'][rule]:.1%}" for rule in JOINT_RULES]
            cells.append(f"{run['seconds'] / r['runs']['anchor']['seconds']:.2f}x")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results["train"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, style in (("plain", "o--"), ("matryoshka", "s-")):
        widths = [w for w in r[name] if w.isdigit()]
        ax.plot([int(w) for w in widths], [r[name][w]["text_to_image_R@1"] for w in widths], style, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding width used (prefix, renormalised)")
    ax.set_ylabel("text-to-image R@1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_tuples(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["tuples"]["runs"]
    columns = [(d.replace("_to_", "→"), lambda run, d=d: run["retrieval"][f"{d}_R@1"]) for d in DIRECTIONS]
    columns += [(f"img+aud→txt\n({rule})", lambda run, rule=rule: run["joint"][rule]) for rule in JOINT_RULES]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(runs)
    for i, (name, run) in enumerate(runs.items()):
        ax.bar([c + i * width for c in range(len(columns))], [get(run) for _, get in columns], width, label=name)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(columns))], [label for label, _ in columns], fontsize=7)
    ax.set_ylabel("R@1, joint held-out set")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("loss", "train", "batches", "tuples"), help="run one part")
    p.add_argument("--tuple-steps", type=int, default=600, help="tuples part: steps of each run")
    p.add_argument("--batch", type=int, default=4096, help="loss part: global batch")
    p.add_argument("--dim", type=int, default=512, help="loss part: embedding width")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=300, help="train part: steps of each run")
    p.add_argument("--plan-steps", type=int, default=600, help="batches part: steps of each run")
    p.add_argument("--plan-batch", type=int, default=32, help="batches part: the batch size of every run")
    p.add_argument("--teacher-steps", type=int, default=300, help="batches part: steps of the teacher (batch 128)")
    p.add_argument("--per-batch", type=int, default=4, help="batches part: communities per batch")
    p.add_argument("--neighbors", type=int, default=30, help="batches part: the plan's k-NN")
    p.add_argument("--skip-nearest", type=int, default=24, help="batches part: nearest neighbours left out")
    p.add_argument("--max-similarity", type=float, default=0.9, help="batches part: the plan's duplicate guard")
    p.add_argument("--mix", type=float, default=0.2, help="batches part: data.batch_plan_random of the mixed run")
    p.add_argument(
        "--plan-seeds", default="0", help="batches part: comma-separated seeds, each variant trained once per seed"
    )
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_beyond")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    results: dict = json.loads(saved.read_text()) if saved.is_file() else {}  # a part run alone keeps the others
    if args.only in (None, "loss"):
        results["loss"] = time_loss(args.batch, args.dim, args.repeats)
    if args.only in (None, "train"):
        results["train"] = compare_matryoshka(args.out, args.steps)
        plot(results, args.out / "matryoshka.png")
    if args.only in (None, "batches"):
        plan_args = [
            f"--per-batch={args.per_batch}",
            f"--neighbors={args.neighbors}",
            f"--skip-nearest={args.skip_nearest}",
            f"--max-similarity={args.max_similarity}",
        ]
        results["batches"] = compare_batches(
            args.out,
            args.plan_steps,
            args.plan_batch,
            args.teacher_steps,
            plan_args,
            args.mix,
            [int(seed) for seed in args.plan_seeds.split(",")],
        )
    if args.only in (None, "tuples"):
        results["tuples"] = compare_tuples(args.out, args.tuple_steps)
        plot_tuples(results, args.out / "tuples.png")
    text = tables(results)
    print(text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = [name for part, name in (("train", "matryoshka.png"), ("tuples", "tuples.png")) if part in results]
    print(f"wrote {args.out / 'results.json'}, results.md" + "".join(f", {name}" for name in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
