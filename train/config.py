"""The run configuration: one typed dataclass per component. A run config is a tree of them, built from a YAML
recipe plus dotted `key=value` overrides (`tessera.train.recipes`):

    python -m tessera.train.pretrain --config configs/demo.yaml train.steps=200 data.num_workers=1

`PretrainConfig` is pretraining's; `FinetuneConfig` adds the exported model it starts from (`base`), the adapter and
the fine-tuning task. Each names its task (`task`, see `tessera.train.tasks`).
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


@dataclass
class TrainConfig:
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=256, metadata={"help": "samples per rank per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    chunk_size: int = field(
        default=0,
        metadata={
            "help": "samples each tower encodes at once; 0: the whole batch in one autograd graph. Below "
            "batch_size, an exact two-pass step (GradCache) trains on batch_size negatives per rank while holding "
            "one chunk's activations: the same gradients as one graph over the same chunks. The loader then "
            "collates chunks, and images are held as uint8 until their chunk runs"
        },
    )
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=0.0, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.2, metadata={"help": "AdamW decay (never on norms, biases, temperatures)"})
    betas: tuple[float, float] = field(default=(0.9, 0.98), metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-6, metadata={"help": "AdamW epsilon"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto",
        metadata={
            "help": "bf16: towers compute in bf16 under autocast, with fp32 weights, gradients, reductions and "
            "optimizer; fp16 (GPU): DeepSpeed's fp16 with loss scaling; fp32; auto: bf16 where the device computes "
            "it natively (a GPU with bf16, a CPU with AMX or AVX512-BF16), else fp32"
        },
    )
    max_nonfinite_steps: int = field(
        default=5,
        metadata={
            "help": "a step whose loss or gradient is not finite is skipped (no update), counted and logged; this "
            "many in a row stop the run"
        },
    )
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    compile: bool = field(
        default=False,
        metadata={
            "help": "torch.compile each tower (TorchInductor; on a CPU it needs a C++ compiler). The first step "
            "carries the compile time, logged apart as first_step_s; new input shapes recompile, logged"
        },
    )
    compile_recompiles: int = field(
        default=8, metadata={"help": "train.compile: recompiles per tower before it runs new shapes eagerly"}
    )
    lock: list[str] = field(default_factory=list, metadata={"help": "towers to freeze, e.g. [image] for LiT"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics.jsonl lines"})
    ckpt_every: int = field(default=0, metadata={"help": "steps between checkpoints (0: only at the end; -1: none)"})
    keep_ckpts: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    export: bool = field(default=True, metadata={"help": "write OUTPUT_DIR/model at the end"})

    def __post_init__(self):
        require(self.steps > 0, "train.steps must be positive")
        require(self.batch_size > 0, "train.batch_size must be positive")
        require(self.grad_accum > 0, "train.grad_accum must be positive")
        require(self.max_nonfinite_steps > 0, "train.max_nonfinite_steps must be positive")
        require(self.chunk_size >= 0, f"train.chunk_size must be >= 0, got {self.chunk_size}")
        require(
            self.chunk_size == 0 or self.batch_size % self.chunk_size == 0,
            f"train.batch_size ({self.batch_size}) must be a multiple of train.chunk_size ({self.chunk_size})",
        )
        require(self.lr > 0 and 0 <= self.min_lr <= self.lr, "need train.lr > 0 and 0 <= train.min_lr <= train.lr")
        require(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        require(self.weight_decay >= 0 and self.grad_clip >= 0, "train.weight_decay and grad_clip must be >= 0")
        require(self.log_every > 0, "train.log_every must be positive")
        require(self.compile_recompiles >= 1, "train.compile_recompiles must be >= 1")
        require(self.ckpt_every >= -1 and self.keep_ckpts >= 1, "need train.ckpt_every >= -1, train.keep_ckpts >= 1")


@dataclass
class LossConfig:
    kind: Literal["infonce", "siglip"] = field(
        default="infonce",
        metadata={
            "help": "infonce: CLIP's symmetric softmax loss; siglip: the sigmoid loss "
            "(needs model.init_logit_bias, SigLIP: -10)"
        },
    )
    tile_size: int | None = field(
        default=None,
        metadata={
            "help": "edge of the logit tiles the loss computes at a time: memory ~ tile^2, never batch^2 "
            "(default: 1024 on CPU, 8192 on a GPU)"
        },
    )
    impl: Literal["tiled", "full"] = field(
        default="tiled",
        metadata={
            "help": "tiled: exact, memory linear in the batch, ring across ranks; full: gather and build the whole "
            "batch x batch matrix (the reference)"
        },
    )
    dcl: bool = field(
        default=False,
        metadata={"help": "InfoNCE: leave the positive out of the denominator (decoupled contrastive learning)"},
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "InfoNCE: label smoothing in [0, 1)"})
    positives: Literal["pair", "label"] = field(
        default="pair",
        metadata={
            "help": "pair: a sample's own partner is its one positive; label: samples whose `cls` ids match are "
            "positives for each other (SupCon's L_out for InfoNCE, +1 targets for SigLIP)"
        },
    )

    weights: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "per-pair loss weights by pair name, e.g. {audio-text: 0.5} (either order; default 1): the "
            "total loss is the weighted sum of the pairs' losses, so a joint run can balance them"
        },
    )
    temperature_range: dict[str, tuple[float, float]] = field(
        default_factory=dict,
        metadata={
            "help": "per-pair [floor, cap] on the temperature, e.g. {audio-text: [0.02, 0.2]}: the loss clamps the "
            "pair's logit scale to [1/cap, 1/floor] (and model.max_logit_scale still caps every pair)"
        },
    )
    higher_order: Literal["none", "symile", "gram"] = field(
        default="none",
        metadata={
            "help": "the loss of each model.tuples tuple, added for batches that carry all its modalities: symile "
            "(the multilinear inner product, O(N) shuffled negatives); gram (the volume the tuple's embeddings span, "
            "the tuple's first modality as the anchor); none. Both tiled"
        },
    )
    higher_order_weight: float = field(default=1.0, metadata={"help": "weight of each tuple's loss in the total"})
    matryoshka: list[int] = field(
        default_factory=list,
        metadata={
            "help": "prefix widths of the embedding to train as well, e.g. [64, 128, 256] (the full width is always "
            "one): the loss is the weighted sum of the loss at each prefix, every prefix renormalised, all of them "
            "from the same logit tiles (about the cost of one)"
        },
    )
    matryoshka_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "loss.matryoshka: one weight per prefix, the full width last; default: equal weights summing to "
            "1 (the loss stays on the plain loss's scale)"
        },
    )

    def __post_init__(self):
        require(self.tile_size is None or self.tile_size > 0, f"loss.tile_size must be positive, got {self.tile_size}")
        for pair, w in self.weights.items():
            require(w >= 0, f"loss.weights.{pair} must be >= 0, got {w}")
        for pair, (floor, cap) in self.temperature_range.items():
            require(0 < floor < cap, f"loss.temperature_range.{pair} needs 0 < floor < cap, got [{floor}, {cap}]")
        require(self.higher_order_weight >= 0, f"loss.higher_order_weight must be >= 0, got {self.higher_order_weight}")
        widths = self.matryoshka
        require(
            all(w > 0 for w in widths) and all(x < y for x, y in zip(widths, widths[1:])),
            f"loss.matryoshka must list increasing positive widths, got {widths}",
        )
        if self.matryoshka_weights is not None:
            require(widths, "loss.matryoshka_weights is set but loss.matryoshka lists no widths")
            require(
                all(w >= 0 for w in self.matryoshka_weights) and sum(self.matryoshka_weights) > 0,
                f"loss.matryoshka_weights must be non-negative and not all zero, got {self.matryoshka_weights}",
            )
        require(
            0.0 <= self.label_smoothing < 1.0, f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}"
        )
        if self.kind == "siglip":
            require(not self.dcl and not self.label_smoothing, "loss.dcl and loss.label_smoothing are InfoNCE options")
        require(not (self.dcl and self.label_smoothing), "loss.dcl and loss.label_smoothing: choose one")

    def per_pair(self, option: str, a: str, b: str, default=None):
        """The value `option` (weights, temperature_range) gives the pair a-b, named in either order."""
        values = getattr(self, option)
        return values.get(f"{a}-{b}", values.get(f"{b}-{a}", default))

    def nested_widths(self, width: int) -> list[int]:
        """The Matryoshka prefix widths ending at the full `width` ([width] alone without loss.matryoshka)."""
        return [w for w in self.matryoshka if w != width] + [width]

    def nested_weights(self, width: int) -> list[float]:
        n = len(self.nested_widths(width))
        return list(self.matryoshka_weights) if self.matryoshka_weights is not None else [1.0 / n] * n


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = field(default=0, metadata={"help": "ZeRO stage"})
    config: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "raw DeepSpeed config entries merged over Tessera's"}
    )


@dataclass
class EvalConfig:
    every: int = field(default=0, metadata={"help": "steps between evaluations on data.val (0: only at the end)"})
    batch_size: int = field(default=256, metadata={"help": "evaluation batch size"})
    pairs: list[tuple[str, str]] | None = field(
        default=None, metadata={"help": "modality pairs to evaluate; default: the model's"}
    )
    classes: str | None = field(
        default=None,
        metadata={
            "help": "classes.json ({classnames, templates}): also classify data.val zero-shot by its `cls` labels"
        },
    )
    classify: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "the modality (or list of modalities) eval.classes classifies, each from the data.val sources "
            "that carry it and `cls`; default: every tower but the one that encodes the class prompts"
        },
    )

    def __post_init__(self):
        require(self.every >= 0 and self.batch_size > 0, "need eval.every >= 0 and eval.batch_size > 0")
        if isinstance(self.classify, str):
            self.classify = [self.classify]
        require(self.classify is None or len(self.classify) > 0, "eval.classify is empty")


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
