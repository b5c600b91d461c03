"""The adapter configs of fine-tuning (`adapter.*`): LoRA, prompt vectors, or every weight. Needs no torch or peft:
reading a recipe and `--help` use these; `tessera.models.lora`, `prompts` and `adapters` apply them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tessera.config import require


@dataclass
class LoraConfig:
    towers: list[str] | None = field(default=None, metadata={"help": "towers to adapt; default: every tower"})
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA path"})
    target_modules: dict[str, list[str]] = field(
        default_factory=dict,
        metadata={
            "help": "per tower, module names to adapt (last name component, or all-linear); default: the "
            "encoder's preset"
        },
    )
    train_heads: bool = field(default=False, metadata={"help": "also train the adapted towers' projection heads"})
    train_temperatures: bool = field(
        default=False, metadata={"help": "also train every pair's temperature (and logit bias)"}
    )

    def __post_init__(self):
        require(self.rank > 0 and self.alpha > 0, "lora.rank and lora.alpha must be positive")
        require(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class PromptConfig:
    context: int = field(
        default=4,
        metadata={
            "help": "learned context tokens in the class prompts of the tower that encodes them (CoOp in open_clip's "
            "text tower; peft prompt tuning in a Hugging Face text tower); 0: none"
        },
    )
    class_specific: bool = field(
        default=False,
        metadata={
            "help": "one context per class (CoOp's CSC) instead of one shared by all classes; spliced context only"
        },
    )
    init: str | None = field(
        default=None,
        metadata={
            "help": "words whose token embeddings initialise the context, e.g. 'a photo of a' (their token count "
            "must equal context); default: random, std init_std"
        },
    )
    visual_tokens: int = field(
        default=0,
        metadata={
            "help": "VPT-shallow: prompt tokens inserted into the input of every tower that takes them (open_clip "
            "ViTs); 0: none"
        },
    )
    init_std: float = field(default=0.02, metadata={"help": "std of randomly initialised prompt vectors"})
    visual_lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "the VPT tokens' learning rate as a multiple of train.lr (they tolerate a smaller one than the "
            "context)"
        },
    )

    def __post_init__(self):
        require(self.context >= 0 and self.visual_tokens >= 0, "prompt.context and prompt.visual_tokens must be >= 0")
        require(
            self.context > 0 or self.visual_tokens > 0,
            "prompt tuning needs prompt.context > 0 (text) or prompt.visual_tokens > 0 (image)",
        )
        require(self.init is None or self.context > 0, "prompt.init initialises the text context: set prompt.context")
        require(self.init_std > 0, "prompt.init_std must be positive")
        require(self.visual_lr_scale > 0, "prompt.visual_lr_scale must be positive")


@dataclass
class AdapterConfig:
    kind: Literal["lora", "prompt", "full"] = field(
        default="lora",
        metadata={
            "help": "lora: train LoRA adapters on the base (peft); prompt: train prompt vectors (CoOp context in the "
            "class prompts, VPT tokens in a ViT, peft prompt tuning of a Hugging Face text tower); full: train "
            "every weight of the base"
        },
    )
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    export_merged: bool = field(
        default=True,
        metadata={
            "help": "also write OUTPUT_DIR/model: the base with the LoRA adapter merged in (no peft needed to run it); "
            "prompts cannot be merged into weights"
        },
    )

    @property
    def lr_scales(self) -> dict[str, float]:
        """Parameter-name substrings that take their own learning rate, as multiples of train.lr."""
        return {"visual_prompts": self.prompt.visual_lr_scale} if self.kind == "prompt" else {}
