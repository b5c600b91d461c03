"""What a recipe may say about the training runtime: one typed dataclass per component (`train` and its `train.ema`,
`loss`, `deepspeed`, `eval`, `export`, `log`), each validated on construction. `model` and `data` keep theirs beside
their code (`tessera.models.config`, `tessera.data.config`); a whole run's config, and the checks across components,
are in `runs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tessera.config import require


@dataclass
class EMAConfig:
    """An exponential moving average of the trainable weights (timm's ModelEmaV3, open_clip's --model-ema): updated
    after optimizer steps, checkpointed beside them, evaluated beside the trained weights and exported on request."""

    decay: float = field(
        default=0.9999,
        metadata={
            "help": "decay per optimizer step: the average spans about 1/(1-decay) steps (0.9999: ~10k, 0.999: ~1k); "
            "with train.ema.every=k each update uses decay**k, so the span does not depend on k"
        },
    )
    every: int = field(default=1, metadata={"help": "optimizer steps between updates of the average"})
    start_step: int = field(
        default=0,
        metadata={
            "help": "the average starts after this many optimizer steps; until then each update copies the weights "
            "(an early, fast-moving stretch left out)"
        },
    )

    def __post_init__(self):
        require(
            0.0 <= self.decay < 1.0,
            f"train.ema.decay must be in [0, 1), got {self.decay}: e.g. 0.9999 averages over about 10,000 steps",
        )
        require(self.every >= 1, f"train.ema.every must be >= 1 (optimizer steps between updates), got {self.every}")
        require(self.start_step >= 0, f"train.ema.start_step must be >= 0, got {self.start_step}")


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
            "help": "bf16: towers compute in bf16 under autocast, with fp32 weights (temperatures and biases too), "
            "gradients, reductions and optimizer (open_clip's amp_bf16); fp16: the same in fp16 with a dynamic loss "
            "scale (open_clip's amp; for GPUs without bf16); fp32; auto: bf16 where the device computes it "
            "natively (a GPU with bf16, a CPU with AMX or AVX512-BF16), else fp32"
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
    ema: EMAConfig | None = field(
        default=None,
        metadata={
            "help": "keep an exponential moving average of the trainable weights (off unless set, e.g. "
            "train.ema.decay=0.9999); export.weights chooses what OUTPUT_DIR/model holds"
        },
    )

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
        if self.ema is not None:
            require(
                self.ema.start_step < self.steps,
                f"train.ema.start_step ({self.ema.start_step}) must be below train.steps ({self.steps}): the average "
                "would never start",
            )


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
    kernel: Literal["auto", "triton", "torch"] = field(
        default="auto",
        metadata={
            "help": "how the tiles are computed: triton, a fused kernel that keeps the logits on chip (InfoNCE and "
            "SigLIP, with DCL and label smoothing; not label positives, Matryoshka or the higher-order losses, "
            "which run torch and say so once); torch, a GEMM per tile; auto, triton on CUDA where it covers the "
            "loss, else torch"
        },
    )
    gather_budget: float = field(
        default=1.0,
        metadata={
            "help": "GiB per rank: across ranks, the loss gathers every rank's features (and reduce-scatters their "
            "gradients) where they fit this, else passes them round the ring (0: always the ring); both exact"
        },
    )
    precision: Literal["auto", "fp32"] = field(
        default="auto",
        metadata={
            "help": "the features' dtype in the loss: auto, the towers' compute dtype on a GPU (bf16/fp16 operands, "
            "fp32 accumulation and log-sum-exps) and fp32 on CPU (whose GEMMs would round bf16 logits); fp32, "
            "fp32 everywhere (exact-fp32 tiles, no TF32 unless torch is told to allow it)"
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
    reversal_negatives: float = field(
        default=0.0,
        metadata={
            "help": "weight of the arrow-of-time term ('Test of Time'): each clip of a tower with a time axis (video) "
            "played backwards is a negative for its own caption, in the caption's softmax over the clip and its "
            "reversal (exact, per sample, beside the batch's contrastive loss); 0: off. One more forward of the "
            "video tower per batch; not with train.chunk_size"
        },
    )
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
        require(self.gather_budget >= 0, f"loss.gather_budget must be >= 0 GiB, got {self.gather_budget}")
        require(self.reversal_negatives >= 0, f"loss.reversal_negatives must be >= 0, got {self.reversal_negatives}")
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


@dataclass
class ExportConfig:
    weights: Literal["raw", "ema", "both"] = field(
        default="raw",
        metadata={
            "help": "what the export at the end holds (with train.export): raw, the trained weights in "
            "OUTPUT_DIR/model; ema, train.ema's average there instead; both, the trained weights in OUTPUT_DIR/model "
            "and the average in OUTPUT_DIR/model-ema (adapters alike: OUTPUT_DIR/adapter and adapter-ema)"
        },
    )

    def suffixes(self) -> dict[str, str]:
        """The suffix of the exported folders' names (model, adapter) for each kind of weights exported."""
        return {"raw": {"raw": ""}, "ema": {"ema": ""}, "both": {"raw": "", "ema": "-ema"}}[self.weights]


@dataclass
class WandbConfig:
    """A Weights & Biases run (log.report_to: [wandb]), as open_clip_train's --report-to wandb."""

    project: str = field(default="tessera", metadata={"help": "the W&B project"})
    name: str | None = field(default=None, metadata={"help": "the run's name; default: output_dir's last folder"})
    tags: list[str] = field(default_factory=list, metadata={"help": "the run's tags"})
    mode: Literal["online", "offline", "disabled"] = field(
        default="online",
        metadata={
            "help": "online: stream to the W&B server (needs `wandb login` or WANDB_API_KEY); offline: write the run "
            "under OUTPUT_DIR/wandb only, for `wandb sync` later; disabled: no run at all"
        },
    )
    entity: str | None = field(default=None, metadata={"help": "the W&B team or user; default: your default entity"})


@dataclass
class LogConfig:
    """Where rank 0 reports what metrics.jsonl holds (metrics.jsonl is always written)."""

    report_to: list[Literal["tensorboard", "wandb"]] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={
            "help": "the trackers beside metrics.jsonl: tensorboard (OUTPUT_DIR/tensorboard), wandb (the `wandb` "
            "extra: pip install -e '.[wandb]'; a resumed run continues the same W&B run); [] for none"
        },
    )
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        require(
            len(set(self.report_to)) == len(self.report_to), f"log.report_to names a tracker twice: {self.report_to}"
        )


@dataclass
class DistillConfig:
    """Learning from a teacher beside the contrastive loss (see `tessera.train.components.distill`)."""

    teacher: str = field(
        default="",
        metadata={
            "help": "a model directory (Tessera export, open_clip or transformers; larger, another width, or some of "
            "the student's modalities only), run without gradient; stored: the embeddings `tessera embed-shards` "
            "wrote into data.train's shards (no teacher forward); ema: the student's own train.ema average "
            "(self-distillation, as SigLIP 2's SILC)"
        },
    )
    kind: Literal["logits", "features", "both"] = field(
        default="logits",
        metadata={
            "help": "logits: the KL of the teacher's similarity matrices from the student's for every pair both "
            "have (softmax per row and column, or sigmoid per pair for SigLIP students; tiled, never batch x batch); "
            "features: each embedding toward the teacher's (through a learned linear map where the widths differ, "
            "dropped at export); both"
        },
    )
    weight: float = field(default=1.0, metadata={"help": "weight of each pair's logit KL in the total loss"})
    feature_weight: float = field(default=1.0, metadata={"help": "weight of each modality's feature loss"})
    feature_loss: Literal["cosine", "l2"] = field(
        default="cosine",
        metadata={"help": "cosine: 1 - cos(student, teacher); l2: squared distance to the teacher's unit embedding"},
    )
    temperature: float | None = field(
        default=None,
        metadata={
            "help": "temperature of the teacher's logits; default: the teacher's own learned one (stored: the one "
            "its manifest records). The student's logits use its own, which the KL trains"
        },
    )
    teacher_hash: str | None = field(
        default=None,
        metadata={
            "help": "teacher=stored: the hash `tessera embed-shards` printed; the shards' teacher.json must name "
            "it (an error before the first step otherwise). Default: whatever teacher the manifest names, logged"
        },
    )
    local_crops: tuple[float, float] | None = field(
        default=None,
        metadata={
            "help": "teacher=ema (SILC): the student also encodes a random crop of each image covering this share "
            "of it, e.g. [0.05, 0.4], pulled toward the teacher's embedding of the whole image"
        },
    )

    def __post_init__(self):
        require(self.teacher != "", "distill.teacher is required: a model directory, 'stored' or 'ema'")
        require(self.weight >= 0 and self.feature_weight >= 0, "distill.weight and feature_weight must be >= 0")
        require(
            self.temperature is None or self.temperature > 0,
            f"distill.temperature must be positive, got {self.temperature}",
        )
        if self.local_crops is not None:
            low, high = self.local_crops
            require(0 < low < high <= 1, f"distill.local_crops needs 0 < min < max <= 1, got {self.local_crops}")
            require(self.teacher == "ema", "distill.local_crops is SILC's self-distillation: it needs teacher=ema")
