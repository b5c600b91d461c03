"""The text tower: open_clip's causal text transformer from any open_clip model config, with open_clip's offline
BPE tokenizer (see `open_clip_common` for names, overrides and checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIPTextCfg, _build_text_tower
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

from tessera.config import require

from .encoder import Encoder, SplicedContext
from .open_clip_common import (
    TRANSFORMER_TARGETS,
    check_overrides,
    load_pretrained,
    named_config,
    pretrained_temperature,
    quick_gelu,
)

__all__ = ["OpenClipTextConfig", "OpenClipTextEncoder", "Tokenize"]

TOKENIZER_DIR = "text_tokenizer"  # where an export keeps a Hugging Face tokenizer


@dataclass
class OpenClipTextConfig:
    model: str = field(default="ViT-B-32", metadata={"help": "open_clip model config name (architecture only)"})
    overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "CLIPTextCfg fields merged over the named config"}
    )
    output_dim: int | None = field(default=None, metadata={"help": "tower projection width; default embed_dim"})
    quick_gelu: bool | None = field(default=None, metadata={"help": "default: the named config's"})
    pretrained: str | None = field(default=None, metadata={"help": "local open_clip checkpoint to load"})

    def __post_init__(self):
        named_config(self.model)
        check_overrides(self.overrides, CLIPTextCfg, "text tower")
        text_cfg = self.text_cfg()
        require(
            not text_cfg.get("hf_model_name"),
            f"'{self.model}' uses a Hugging Face text model; use encoder 'hf_text' with a local path instead",
        )
        tok = text_cfg.get("hf_tokenizer_name")
        require(
            not tok or Path(tok).is_dir(),
            f"'{self.model}' uses the Hugging Face tokenizer '{tok}', which would be downloaded; set "
            "overrides.hf_tokenizer_name to a local directory, or null for open_clip's BPE tokenizer",
        )

    def text_cfg(self) -> dict[str, Any]:
        return {**named_config(self.model)["text_cfg"], **self.overrides}


class Tokenize:
    """Caption -> LongTensor(context_length) with open_clip's tokenizer (picklable for workers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]

    def word_ids(self, words: str) -> torch.Tensor:
        """The words' token ids, without <BOS>, <EOT> and padding (id 0)."""
        ids = self(words)
        return ids[1 : int((ids != 0).sum()) - 1]


class OpenClipTextEncoder(Encoder):
    """open_clip's causal text transformer, with its offline BPE tokenizer -> (B, output_dim)."""

    context_kind = "spliced"
    config_cls = OpenClipTextConfig

    def __init__(self, cfg: OpenClipTextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.output_dim = cfg.output_dim or embed_dim
        text_cfg = cfg.text_cfg()
        self.tower = _build_text_tower(self.output_dim, text_cfg, quick_gelu=quick_gelu(cfg))
        self.context_length = text_cfg.get("context_length", 77)
        if cfg.pretrained:
            bare = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
            load_pretrained(self.tower, cfg.pretrained, prefixes=("text.",), keep_bare=bare)

    def build_tokenizer(self):
        text_cfg = self.cfg.text_cfg()
        if self.hf_tokenizer_dir():
            return HFTokenizer(
                self.hf_tokenizer_dir(),
                context_length=self.context_length,
                **(text_cfg.get("tokenizer_kwargs") or {}),
            )
        return SimpleTokenizer(context_length=self.context_length)

    def hf_tokenizer_dir(self) -> str | None:
        """The local directory of the Hugging Face tokenizer this tower reads, if it reads one."""
        return self.cfg.text_cfg().get("hf_tokenizer_name") or None

    def export_params(self, out_dir: Path) -> dict[str, Any]:
        """The config, with a Hugging Face tokenizer copied into the export (`text_tokenizer/`): an export must
        not depend on the folder a model was imported from."""
        params = super().export_params(out_dir)
        if self.hf_tokenizer_dir():
            self.build_tokenizer().save_pretrained(Path(out_dir) / TOKENIZER_DIR)
            params["overrides"] = {**params["overrides"], "hf_tokenizer_name": f"./{TOKENIZER_DIR}"}
        return params

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower(tokens)

    def transform(self, is_train: bool) -> Tokenize:
        return Tokenize(self.build_tokenizer())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_grad_checkpointing(enable)

    def clip_checkpoint(self) -> str | None:
        return self.cfg.pretrained

    def clip_temperature(self) -> dict[str, torch.Tensor]:
        return pretrained_temperature(self.cfg.pretrained) if self.cfg.pretrained else {}

    def lora_targets(self) -> list[str]:
        return TRANSFORMER_TARGETS

    def context_site(self) -> SplicedContext:
        """CoOp: the context replaces the placeholder words' embeddings right after <BOS>; open_clip's own forward
        (positions, causal mask, pooling at <EOT>) runs unchanged."""
        tokenize = self.transform(False)
        return SplicedContext(self.tower.token_embedding, tokenize, tokenize.word_ids, offset=1)
