"""Evaluation during and after training: retrieval on data.val for the model's pairs, zero-shot classification by
class prompts when eval.classes is set, as metrics.jsonl lines and, at the end, OUTPUT_DIR/eval. With train.ema the
weights' moving average is evaluated beside the trained weights: `eval_ema` lines, and OUTPUT_DIR/eval/ema."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tessera.config import ConfigError
from tessera.data import ShardError
from tessera.data.loader import resolve_sources
from tessera.eval.common import NoSamples
from tessera.eval.retrieval import evaluate_pairs, summary_table, write_report
from tessera.eval.zeroshot import evaluate_zeroshot, plot_confusion, read_classes

from ..distributed.groups import DistInfo
from ..recipes.runs import PretrainConfig
from .ema import WeightEMA
from .metrics import MetricsLogger

log = logging.getLogger(__name__)


def check_eval(cfg: PretrainConfig, modalities: list[str]) -> None:
    """What evaluation will need, checked before the first step rather than after training: data.val's shards
    exist and carry only modalities the model has, and the pairs and classified modalities are the model's."""
    if not cfg.data.val:
        return
    try:
        resolve_sources(cfg.data.val, modalities)
    except ShardError as exc:
        raise ShardError(f"data.val: {exc}") from None
    wanted = {m for pair in cfg.eval.pairs or [] for m in pair}
    if cfg.eval.classes:
        wanted |= set(cfg.eval.classify or [])
    missing = sorted(wanted - set(modalities))
    if missing:
        raise ConfigError(
            f"eval: {', '.join(missing)} named in eval.pairs or eval.classify, but the model has "
            f"towers for {', '.join(modalities)} only"
        )


def evaluate_weights(
    cfg: PretrainConfig, model, ema: WeightEMA | None, dist: DistInfo, step: int, logger: MetricsLogger
) -> dict[str, dict]:
    """`evaluate` with the trained weights ("raw") and, with `ema`, with the moving average swapped in ("ema");
    the results by weights (empty without data.val). Every rank runs it."""
    if not cfg.data.val:
        return {}
    results = {"raw": evaluate(cfg, model, dist, step, logger)}
    if ema is not None:
        with ema.swapped():
            results["ema"] = evaluate(cfg, model, dist, step, logger, weights="ema")
    return results


def evaluate(
    cfg: PretrainConfig, model, dist: DistInfo, step: int, logger: MetricsLogger, weights: str = "raw"
) -> dict | None:
    """Retrieval (and zero-shot classification) on data.val. Every rank runs it (so ZeRO-3 can gather parameters);
    rank 0 reports. `weights` names what the model holds: its metrics.jsonl line is `kind: eval` for the trained
    weights ("raw"), else `eval_<weights>`, and says which in its `weights` field."""
    if not cfg.data.val:
        return None
    trained = cfg.model.pair_list()
    pairs = cfg.eval.pairs or trained
    if dist.is_main:
        shown = "" if weights == "raw" else f" with the {weights} weights"
        log.info("step %d: evaluating retrieval%s on %s", step, shown, ", ".join(map(str, cfg.data.val)))
    # a pair or a modality the held-out data does not carry is left out with a warning: the run has trained and
    # exported by now, and the rest of the evaluation still reports
    # a Matryoshka model is evaluated at every prefix it trains, from the same embeddings
    widths = cfg.loss.nested_widths(cfg.model.embed_dim)[:-1] if cfg.loss.matryoshka else []
    result = evaluate_pairs(
        model, cfg.data.val, pairs, cfg.eval.batch_size, dist.device, skip_missing=True, widths=widths
    )
    # pairs evaluated that the loss never aligned: their retrieval is emergent, through the shared space
    result["emergent"] = [
        f"{a}-{b}" for a, b in pairs if (a, b) not in trained and (b, a) not in trained and f"{a}-{b}" in result["n"]
    ]
    record = {
        "weights": weights,
        "metrics": result["metrics"],
        "chance": result["chance"],
        "diagnostics": result["diagnostics"],
        "n": result["n"],
        **({"widths": result["widths"]} if widths else {}),
    }
    if cfg.eval.classes:
        classnames, templates = read_classes(cfg.eval.classes)
        result["zeroshot"] = {}
        for m in cfg.eval.classify:
            try:
                result["zeroshot"][m] = evaluate_zeroshot(
                    model, cfg.data.val, m, classnames, templates, cfg.eval.batch_size, dist.device, widths=widths
                )
            except NoSamples as exc:
                log.warning("zero-shot classification of %s left out: %s", m, exc)
        record["zeroshot"] = {
            m: {k: z[k] for k in ("metrics", "chance", "widths") if k in z} for m, z in result["zeroshot"].items()
        }
    logger.log(step, record, kind="eval" if weights == "raw" else f"eval_{weights}")
    return result


def report(cfg: PretrainConfig, out_dir: Path, step: int, result: dict[str, Any], weights: str = "raw") -> list[Path]:
    """OUTPUT_DIR/eval (OUTPUT_DIR/eval/ema for the moving average's `weights`): retrieval.json + its R@K plot +
    retrieval.md, and zeroshot_<modality>.json + its confusion matrix (linked from retrieval.md) when eval.classes is
    set; the tables go to stdout. Returns the plots written."""
    eval_dir = out_dir / "eval" if weights == "raw" else out_dir / "eval" / weights
    suffix = cfg.export.suffixes().get(weights)  # where these weights were exported, if they were
    doc = {
        "dataset": [s.shards for s in cfg.data.val],
        "model": str(out_dir / f"model{suffix}") if suffix is not None else f"{out_dir} ({weights}, not exported)",
        "weights": weights,
        "task": "zeroshot_retrieval",
        "step": step,
        **result,
    }
    zeroshot = doc.pop("zeroshot", None) or {}
    extra = []
    plots = []
    if zeroshot:
        classnames, _ = read_classes(cfg.eval.classes)
        eval_dir.mkdir(parents=True, exist_ok=True)
    for m, z in zeroshot.items():
        (eval_dir / f"zeroshot_{m}.json").write_text(
            json.dumps(
                {
                    "dataset": doc["dataset"],
                    "model": doc["model"],
                    "task": "zeroshot_classification",
                    "modality": m,
                    "step": step,
                    **z,
                },
                indent=2,
            )
        )
        plots.append(eval_dir / f"zeroshot_{m}_confusion.png")
        plot_confusion(z["confusion"], classnames, plots[-1])
        metrics, chance = z["metrics"], z["chance"]
        extra += [
            f"## Zero-shot {m} classification ({z['classes']} classes, {z['n']} samples)",
            "",
            "| metric | value | chance |",
            "|---|---|---|",
            *[f"| {k} | {metrics[k]:.1%} | {chance[k]:.1%} |" for k in metrics],
            "",
            f"Confusion matrix: ![confusion](zeroshot_{m}_confusion.png); every number: "
            f"[zeroshot_{m}.json](zeroshot_{m}.json)",
            "",
        ]
    plots[:0] = [p for p in write_report(doc, eval_dir / "retrieval.json", extra) if p.suffix == ".png"]
    shown = "" if weights == "raw" else f" ({weights} weights)"
    print(f"\nzero-shot retrieval on held-out data after {step} steps{shown}:\n{summary_table(result)}", flush=True)
    if result.get("emergent"):
        print(
            f"never paired in training (emergent retrieval through the shared space): {', '.join(result['emergent'])}",
            flush=True,
        )
    for m, z in zeroshot.items():
        print(
            f"zero-shot {m} classification{shown} ({z['classes']} classes, {z['n']} samples): "
            f"acc1 {z['metrics']['acc1']:.1%} (chance {z['chance']['acc1']:.1%}), "
            f"acc5 {z['metrics']['acc5']:.1%} (chance {z['chance']['acc5']:.1%})"
            + "".join(f"; @{w}: acc1 {x['acc1']:.1%}" for w, x in z.get("widths", {}).items()),
            flush=True,
        )
    return plots
