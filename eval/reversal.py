"""The arrow of time: does a model tell a clip from the same clip played backwards? For each held-out sample that
carries the timed modality (a video) and a caption, its own caption scores the clip as it is and the clip reversed;
the reversal accuracy is how often the clip as it is scores higher (ties count half: a tower blind to the frames'
order, such as the frame average, ties on every clip, exactly). Chance is 50%. This is the "Test of Time" (Bagad et
al., CVPR 2023) check, on any exported model and any shards whose captions say how things move.

    tessera eval reversal --model runs/demo-video/transformer/model --data "runs/demo/data/val-motion-000000.tar"

The reversed clip is the evaluation's frames in reverse order: evaluation samples frames symmetrically over the clip
(one at the middle of each equal segment), so these are the frames it would sample from the clip played backwards
(all of them for an even number of frames; with an odd number, the middle one may sit a frame apart). The caption is
each sample's first.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from tessera import modalities as registry
from tessera.config import ConfigError
from tessera.data import SampleStats, eval_batches, parse_sources, to_device

from . import commands, common

CHANCE = 0.5
TIE = 1e-6  # cosine similarities this close count as a tie


def timed_modality(model) -> str | None:
    """The model's first tower whose batches have a time axis (a video tower), or None."""
    return next((m for m in model.modalities if getattr(model.towers[m], "time_axis", None) is not None), None)


@torch.no_grad()
def reversal_test(
    model,
    sources,
    modality: str,
    batch_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """The reversal accuracy of `modality` (a tower with a time axis) against the language tower's captions, over
    every sample of `sources` that carries both."""
    axis = getattr(model.towers[modality], "time_axis", None) if modality in model.towers else None
    if axis is None:
        timed = timed_modality(model)
        raise ConfigError(
            f"'{modality}' has no time axis to reverse: "
            + (f"try --modality {timed}" if timed else f"none of the model's towers ({model.modalities}) has one")
        )
    language = registry.language(model.modalities)
    if language is None:
        raise ConfigError(f"the reversal test scores captions; the model has no language tower ({model.modalities})")
    stats = SampleStats()
    margins = []
    with common.eval_mode(model):
        batches = eval_batches(
            common.sources_with(sources, [modality, language]),
            model.transforms(False, compact=True),
            model.collators(),
            [modality, language],
            batch_size,
            num_workers,
            stats,
        )
        for batch in batches:
            batch = to_device(batch, device, dtype)
            text = model.encode(language, batch[language]).float()
            forward = model.encode(modality, batch[modality]).float()
            backward = model.encode(modality, batch[modality].flip(axis)).float()
            margins.append(((forward - backward) * text).sum(-1).cpu())
    if not margins:
        raise common.NoSamples(f"no sample in {[s.shards for s in sources]} carries {modality} and {language}")
    margin = torch.cat(margins)
    tie = margin.abs() <= TIE
    return {
        "metrics": {
            "reversal": float((margin > TIE).float().mean() + 0.5 * tie.float().mean()),
            "ties": float(tie.float().mean()),
            "mean_margin": float(margin.mean()),
        },
        "chance": {"reversal": CHANCE},
        "n": int(margin.numel()),
        "data": stats.to_dict(),
    }


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`tessera eval reversal` with its command line read (`tessera.eval.commands`)."""
    model, device = common.load(args)
    modality = args.modality or timed_modality(model)
    if modality is None:
        parser.exit(2, f"error: none of the model's towers ({model.modalities}) has a time axis to reverse\n")
    try:
        result = reversal_test(
            model, parse_sources(args.data, "--data"), modality, args.batch_size, device, None, args.workers
        )
    except (ConfigError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    m = result["metrics"]
    print(
        f"reversal ({modality}, {result['n']} samples): {100 * m['reversal']:.1f}% of clips beat their own reversal "
        f"with their caption (chance {100 * CHANCE:.0f}%; ties {100 * m['ties']:.1f}%)"
    )
    if args.out:
        doc = {**common.benchmark_fields(args.data, args.model, "reversal"), "modality": modality, **result}
        print(f"wrote {common.write_json(common.output_path(args.out, doc), doc)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(*commands.parse("reversal", argv))


if __name__ == "__main__":
    sys.exit(main())
