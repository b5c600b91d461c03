"""The run configuration: a tree of the components' typed dataclasses, built from a YAML recipe plus dotted
`key=value` overrides (`load`):

    python -m tessera.train.pretrain --config configs/demo.yaml train.steps=200 data.num_workers=1

`PretrainConfig` is pretraining's; `FinetuneConfig` adds the exported model it starts from (`base`), the adapter and
the fine-tuning task. Each names its task (`task`, see `tasks`). The checks here are the ones across components.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from tessera import modalities
from tessera.config import ConfigError, from_fields, require
from tessera.data import DataConfig
from tessera.models import ModelConfig, read_model_config
from tessera.models.adapter_config import AdapterConfig

from .config import DeepSpeedConfig, DistillConfig, EvalConfig, ExportConfig, LogConfig, LossConfig, TrainConfig


def classified(model: ModelConfig) -> list[str]:
    """The towers classification takes by default: every one but the tower that encodes the class prompts."""
    language = modalities.language(list(model.towers))
    return [m for m in model.towers if m != language]


@dataclass
class PretrainConfig:
    task: ClassVar[str] = "pretrain"

    output_dir: str = field(default="runs/default", metadata={"help": "run directory"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order and augmentation"})
    resume: str | None = field(
        default=None, metadata={"help": "'latest', a checkpoint tag, or a tag directory to resume from"}
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distill: DistillConfig | None = field(
        default=None,
        metadata={"help": "learn from a teacher beside the contrastive loss (off unless set: distill.teacher=DIR)"},
    )

    def __post_init__(self):
        # measured (DeepSpeed 0.19.8, torch 2.11): compiled towers under ZeRO-3 compute the first step's loss exactly,
        # but their gradient norm is 5.1 where the eager run's is 30.0 (the towers' gradients miss ZeRO-3's reduction
        # hooks), so the second step drifts by 5%; parameters kept gathered (a persistence threshold of 1e9) change
        # nothing. DeepSpeed's own engine.compile() of the whole model fails at the first step instead (the logit
        # scale, used outside the model's forward, stays partitioned). DeepCompile, DeepSpeed's ZeRO-3 compiler
        # pass, builds a native op for CUDA.
        require(
            not (self.train.compile and self.deepspeed.zero_stage == 3),
            "train.compile does not train exactly under deepspeed.zero_stage=3 yet; use stage 0, 1 or 2 with it",
        )
        require(
            self.export.weights == "raw" or self.train.ema is not None,
            f"export.weights={self.export.weights} exports the weights' moving average, but train.ema is not set: "
            "set train.ema.decay (e.g. train.ema.decay=0.9999), or export.weights=raw",
        )
        if self.distill is not None and self.distill.teacher == "ema":
            require(
                self.train.ema is not None,
                "distill.teacher=ema distils from the weights' average: set train.ema, e.g. train.ema.decay=0.999",
            )
            require(
                self.deepspeed.zero_stage < 3,
                "distill.teacher=ema runs the average as a model of its own, which ZeRO-3's partitions are not: use "
                "deepspeed.zero_stage 0-2",
            )
        towers = list(self.model.towers)
        for m in self.train.lock:
            require(m in towers, f"train.lock: no tower '{m}' (towers: {towers})")
        require(len(self.train.lock) < len(towers), "train.lock freezes every tower; nothing would train")
        pairs = self.model.pair_list()
        for src in self.data.train:
            carried = src.modalities or towers
            require(
                any(a in carried and b in carried for a, b in pairs),
                f"data.train source '{src.name}' carries {'+'.join(carried)}, which covers none of the pairs the "
                f"loss aligns ({', '.join(f'{a}-{b}' for a, b in pairs)}): give it a modality of one of them, "
                "or change model.pairing / model.pairs",
            )
        for a, b in self.eval.pairs or []:
            require(a in towers and b in towers, f"eval.pairs: ({a}, {b}) needs both towers")
        if self.eval.classify is None:
            self.eval = dataclasses.replace(self.eval, classify=classified(self.model))
        if self.eval.classes is not None:
            language = modalities.language(towers)
            for m in self.eval.classify:
                require(
                    m in towers and language is not None,
                    f"eval.classes: classifying '{m}' by text prompts needs both towers (the model has {towers})",
                )
        require(
            self.loss.higher_order == "none" or self.model.tuples,
            f"loss.higher_order={self.loss.higher_order} scores the model's tuples: set model.tuples, e.g. "
            "[[image, audio, text]]",
        )
        require(
            self.loss.higher_order != "none" or not self.model.tuples or self.task != "pretrain",
            f"model.tuples={self.model.tuples} but loss.higher_order=none: their temperatures would never train; "
            "set loss.higher_order=symile",
        )
        if self.loss.reversal_negatives:
            require(
                not self.train.chunk_size,
                "loss.reversal_negatives runs the reversed clips in the step's one graph: not with train.chunk_size "
                "(the two-pass step) yet",
            )
            require(
                any(modalities.encoder_class(t.encoder).time_axis is not None for t in self.model.towers.values()),
                "loss.reversal_negatives reverses the clips of a tower with a time axis (a video tower): the model "
                f"has none ({', '.join(f'{m}: {t.encoder}' for m, t in self.model.towers.items())})",
            )
        require(
            not (self.model.tuples and self.loss.matryoshka),
            "loss.matryoshka applies to the pairs' losses; with model.tuples the prefixes would not cover the "
            "higher-order loss: choose one",
        )
        names = [f"{a}-{b}" for a, b in self.model.pair_list()]
        for option in ("weights", "temperature_range"):
            for pair in getattr(self.loss, option):
                a, _, b = pair.partition("-")
                require(
                    pair in names or f"{b}-{a}" in names,
                    f"loss.{option}.{pair}: the model aligns no such pair; its pairs are {', '.join(names)}",
                )
        width = self.model.embed_dim
        nested = self.loss.nested_widths(width)
        require(
            all(w <= width for w in self.loss.matryoshka),
            f"loss.matryoshka widths must not exceed model.embed_dim ({width}), got {self.loss.matryoshka}",
        )
        require(
            self.loss.matryoshka_weights is None or len(self.loss.matryoshka_weights) == len(nested),
            f"loss.matryoshka_weights needs one weight per width, the full {width} included: {len(nested)} of them "
            f"for {nested}, got {self.loss.matryoshka_weights}",
        )
        has_bias = self.model.init_logit_bias is not None
        require(
            has_bias or self.loss.kind != "siglip",
            "loss.kind=siglip needs a logit bias: set model.init_logit_bias=-10 (and, as SigLIP does, "
            "model.init_temperature=0.1)",
        )
        require(
            not has_bias or self.loss.kind == "siglip",
            f"model.init_logit_bias is set but loss.kind={self.loss.kind} has no use for a bias: it would never train",
        )


@dataclass
class FewShotConfig:
    k: int = field(default=4, metadata={"help": "labelled samples per class, chosen deterministically by seed"})
    modality: str | None = field(
        default=None,
        metadata={
            "help": "the modality to classify; default: the base's first tower that does not encode the class prompts"
        },
    )
    classes: str | None = field(
        default=None, metadata={"help": "classes.json ({classnames, templates}) for the prompts; default: eval.classes"}
    )
    seed: int = field(default=0, metadata={"help": "seeds the choice of shots"})

    def __post_init__(self):
        require(self.k >= 1, f"fewshot.k must be >= 1, got {self.k}")


@dataclass
class FinetuneConfig(PretrainConfig):
    """A run whose model is an exported one (`base`), with an adapter on it, training one of the fine-tuning tasks."""

    base: str | None = field(default=None, metadata={"help": "the exported model to fine-tune (RUN_DIR/model)"})
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    task: Literal["contrastive", "fewshot"] = field(
        default="contrastive",
        metadata={
            "help": "contrastive: the pretraining loss on paired shards; fewshot: classification of fewshot.modality "
            "from k `cls`-labelled shots per class of data.train, against the text tower's class prompts"
        },
    )
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> FinetuneConfig:
        """`model` comes from `base` (its config.yaml); a recipe may not set it."""
        data = dict(data or {})
        require(
            data.get("base"),
            "fine-tuning needs base=RUN_DIR/model (on the command line or in the recipe), "
            "the exported model to start from",
        )
        require("model" not in data, "fine-tuning takes its model from base=...: remove the 'model' section")
        try:
            data["model"] = read_model_config(data["base"])
        except (FileNotFoundError, OSError) as exc:
            raise ConfigError(f"base: '{data['base']}' is not an exported model directory ({exc})") from None
        return from_fields(cls, data, where)

    def __post_init__(self):
        super().__post_init__()
        towers = list(self.model.towers)
        language = modalities.language(towers)
        if self.task == "fewshot":
            require(
                self.distill is None,
                "distill distils a contrastive student; task=fewshot trains a classifier (use task=contrastive)",
            )
            if self.fewshot.modality is None:
                self.fewshot = dataclasses.replace(self.fewshot, modality=next(iter(classified(self.model)), None))
            require(
                not self.train.chunk_size,
                "train.chunk_size (the two-pass step) is for contrastive losses; task=fewshot trains its few shots in "
                "one graph",
            )
            require(
                self.fewshot.classes is not None or self.eval.classes is not None,
                "task=fewshot needs class prompts: set fewshot.classes (or eval.classes) to a classes.json",
            )
            require(
                self.fewshot.modality in towers and language is not None,
                f"task=fewshot classifies '{self.fewshot.modality}' by text prompts; the base has {towers}",
            )
        if self.adapter.kind == "prompt" and self.adapter.prompt.context and self.task != "fewshot" and language:
            require(
                self.model.towers[language].encoder_cls.context_kind != "spliced",
                "adapter.prompt.context learns the context of class-name prompts (CoOp), which only task=fewshot "
                "trains; for contrastive fine-tuning use prompt.visual_tokens (VPT) or LoRA",
            )
        require(
            self.adapter.kind == "full" or self.deepspeed.zero_stage < 3,
            f"{self.adapter.kind} fine-tuning runs with deepspeed.zero_stage 0-2 (the adapter is small; stage 3 "
            "would only partition the frozen base)",
        )

    @property
    def classes(self) -> str | None:
        """The classes.json of the class prompts fine-tuning learns."""
        return self.fewshot.classes or self.eval.classes
