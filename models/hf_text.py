"""A Hugging Face `transformers` text encoder, from a local directory or an in-code config.

Nothing is fetched from the hub: `path` must be a local directory (loaded with `local_files_only`), or
`config` describes a fresh model (`{"model_type": "bert", "hidden_size": 256, ...}`). Without a
Hugging Face tokenizer, open_clip's offline BPE tokenizer is used (vocabulary 49408, pad id 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import AutoTokenizer

from tessera.config import ConfigError, require, to_dict

from .encoder import Encoder, PrefixContext
from .hf_common import build_hf_model, hf_lora_targets, require_local_source, set_hf_grad_checkpointing

BPE_VOCAB = 49408


@dataclass
class HFTextConfig:
    path: str | None = field(default=None, metadata={"help": "local HF model directory (config.json, weights)"})
    config: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "in-code HF config, e.g. {model_type: bert, ...}"}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "local HF tokenizer dir; default: path if it has one, else open_clip's BPE tokenizer"},
    )
    max_length: int = field(default=77, metadata={"help": "tokens per caption (padded/truncated)"})
    pooling: Literal["mean", "cls"] = field(default="mean", metadata={"help": "how token states become one"})
    load_weights: bool = field(default=True, metadata={"help": "load weights from path (false: random init)"})

    def __post_init__(self):
        require_local_source("hf_text", self.path, self.config, "bert, roberta")
        if self.tokenizer is not None:
            require(Path(self.tokenizer).is_dir(), f"hf_text.tokenizer '{self.tokenizer}' is not a local directory")
        require(self.max_length > 0, "hf_text.max_length must be positive")

    def tokenizer_dir(self) -> str | None:
        if self.tokenizer:
            return self.tokenizer
        if self.path and any(
            Path(self.path, f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
        ):
            return self.path
        return None


class HFTokenize:
    """Caption -> {input_ids, attention_mask} of length max_length (picklable for workers)."""

    def __init__(self, cfg: HFTextConfig):
        self.max_length = cfg.max_length
        tok_dir = cfg.tokenizer_dir()
        if tok_dir:
            self.hf = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
            self.bpe = None
        else:
            self.hf = None
            self.bpe = SimpleTokenizer(context_length=cfg.max_length)

    def __call__(self, text: str) -> dict[str, torch.Tensor]:
        if self.hf is not None:
            enc = self.hf(text, max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt")
            return {"input_ids": enc["input_ids"][0], "attention_mask": enc["attention_mask"][0]}
        ids = self.bpe([text])[0]
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def word_ids(self, words: str) -> torch.Tensor:
        """The words' token ids, without the tokenizer's special tokens and padding."""
        if self.hf is not None:
            return torch.tensor(self.hf(words, add_special_tokens=False)["input_ids"], dtype=torch.long)
        ids = self.bpe([words])[0]  # open_clip's BPE: <BOS> words <EOT> 0 ...
        return ids[1 : int((ids != 0).sum()) - 1]


class HFTextEncoder(Encoder):
    """A `transformers` text model's last hidden states, pooled over the real tokens -> (B, hidden_size)."""

    context_kind = "prefix"
    config_cls = HFTextConfig

    def __init__(self, cfg: HFTextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        config = dict(cfg.config)
        if cfg.path is None and cfg.tokenizer_dir() is None:  # open_clip's BPE tokenizer: its vocabulary
            config.setdefault("vocab_size", BPE_VOCAB)
            config.setdefault("pad_token_id", 0)
        self.model, hf_cfg = build_hf_model(cfg.path, config, cfg.load_weights)
        if cfg.tokenizer_dir() is None and getattr(hf_cfg, "vocab_size", BPE_VOCAB) < BPE_VOCAB:
            raise ConfigError(
                f"hf_text: vocab_size {hf_cfg.vocab_size} is smaller than open_clip's BPE vocabulary "
                f"({BPE_VOCAB}); give a tokenizer directory or a larger vocab_size"
            )
        self.output_dim = int(getattr(hf_cfg, "hidden_size", None) or hf_cfg.d_model)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = inputs["attention_mask"]
        hidden = self.model(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
        hidden = hidden[:, hidden.shape[1] - mask.shape[1] :]  # without virtual tokens that prompt tuning prepends
        if self.cfg.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def transform(self, is_train: bool):
        return HFTokenize(self.cfg)

    def export_params(self, out_dir: Path) -> dict[str, Any]:
        sub = Path(out_dir) / "hf_text"
        self.model.config.save_pretrained(sub)
        tok_dir = self.cfg.tokenizer_dir()
        if tok_dir:
            AutoTokenizer.from_pretrained(tok_dir, local_files_only=True).save_pretrained(sub)
        return {**to_dict(self.cfg), "path": "./hf_text", "config": {}, "tokenizer": None, "load_weights": False}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_hf_grad_checkpointing(self.model, enable)

    def lora_targets(self) -> list[str]:
        return hf_lora_targets(self.model)

    def context_site(self) -> PrefixContext:
        """peft prompt tuning: virtual tokens in front of every input (class prompts and captions alike); the
        pooling skips them."""
        return PrefixContext(self, "model", self.transform(False).word_ids)
