"""Prompt tuning: learnable context for class-name prompts (CoOp), visual prompt tokens (VPT-shallow), and peft's
prompt tuning for Hugging Face text towers. Only the prompts train; the base stays as it was.

    from tessera.models.prompts import PromptConfig, apply_prompts, save_prompts, load_prompts
    model = apply_prompts(load_model("runs/base/model"), PromptConfig(context=4, visual_tokens=8), classnames)
    ...train (model.prompt_learner.class_features(model, classnames) is the zero-shot classifier)...
    save_prompts(model, "runs/x/adapter")     # prompt_config.json + prompt_model.safetensors (+ text/ for peft)
    model = load_prompts(load_model("runs/base/model"), "runs/x/adapter")

What each part does, by tower:
- `context: M` on an open_clip text tower (CoOp): class c's prompt is "<BOS> v_1 ... v_M <classname>. <EOT>", the
  M vectors v learned in the token-embedding space; shared by every class, or one set per class
  (`class_specific`). They replace the embeddings of M placeholder words while the tower runs, so open_clip's own
  forward (positions, causal mask, EOT pooling) is used unchanged. They only enter the class prompts, i.e. the
  zero-shot classifier: captions encoded for retrieval are untouched. Shared context also classifies class names
  it never saw.
- `context: M` on a Hugging Face text tower: peft's prompt tuning, M virtual tokens prepended to every input of
  the tower (class prompts and captions alike); pooling skips them. Saved in peft's own format under `text/`.
- `visual_tokens: N` on an open_clip ViT image tower (VPT-shallow): N learned tokens inserted after the class
  token, after the positional embedding, seen by every layer; they are dropped again after the transformer, so the
  tower pools (class token, average, or attention pool) over the same tokens as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tessera.config import ConfigError, from_dict, require, to_dict

CONFIG_FILE = "prompt_config.json"
WEIGHTS_FILE = "prompt_model.safetensors"
HF_SUBDIR = "text"
PLACEHOLDER = "X"


@dataclass
class PromptConfig:
    context: int = field(default=4, metadata={
        "help": "learned context tokens in the text tower's class prompts (CoOp; peft prompt tuning on a Hugging "
                "Face text tower); 0: none"})
    class_specific: bool = field(default=False, metadata={
        "help": "one context per class (CoOp's CSC) instead of one shared by all classes; open_clip text towers"})
    init: str | None = field(default=None, metadata={
        "help": "words whose token embeddings initialise the context, e.g. 'a photo of a' (their token count "
                "must equal context); default: random, std init_std"})
    visual_tokens: int = field(default=0, metadata={
        "help": "VPT-shallow: prompt tokens inserted into an open_clip ViT image tower's input; 0: none"})
    init_std: float = field(default=0.02, metadata={"help": "std of randomly initialised prompt vectors"})
    visual_lr_scale: float = field(default=1.0, metadata={
        "help": "the VPT tokens' learning rate as a multiple of train.lr (they tolerate a smaller one than the "
                "text context)"})

    def __post_init__(self):
        require(self.context >= 0 and self.visual_tokens >= 0, "prompt.context and prompt.visual_tokens must be >= 0")
        require(self.context > 0 or self.visual_tokens > 0,
                "prompt tuning needs prompt.context > 0 (text) or prompt.visual_tokens > 0 (image)")
        require(self.init is None or self.context > 0, "prompt.init initialises the text context: set prompt.context")
        require(self.init_std > 0, "prompt.init_std must be positive")
        require(self.visual_lr_scale > 0, "prompt.visual_lr_scale must be positive")


def _open_clip_text(model) -> nn.Module | None:
    tower = model.towers["text"] if "text" in model.towers else None
    inner = getattr(tower, "tower", None)
    return inner if inner is not None and hasattr(inner, "token_embedding") else None


def _hf_text(model) -> nn.Module | None:
    tower = model.towers["text"] if "text" in model.towers else None
    return tower if tower is not None and model.cfg.towers["text"].encoder == "hf_text" else None


def _vit(model) -> nn.Module | None:
    tower = model.towers["image"] if "image" in model.towers else None
    inner = getattr(tower, "tower", None)
    needed = ("patch_dropout", "class_embedding", "transformer", "conv1")
    return inner if inner is not None and all(hasattr(inner, a) for a in needed) else None


def _tokenize(model, texts: list[str]) -> torch.Tensor:
    tokenize = model.towers["text"].transform(False)
    return torch.stack([tokenize(t) for t in texts])


def _context_tokens(model, cfg: PromptConfig) -> tuple[str, int]:
    """The words standing in for the context in every prompt, and how many tokens they are."""
    words = cfg.init if cfg.init is not None else " ".join([PLACEHOLDER] * cfg.context)
    ids = _tokenize(model, [words])[0]
    n = int((ids != 0).sum()) - 2   # minus <BOS> and <EOT>
    if n != cfg.context:
        raise ConfigError(f"prompt.init '{cfg.init}' is {n} tokens for the text tower's tokenizer, but prompt.context "
                          f"is {cfg.context}: make them agree")
    return words, n


class PromptLearner(nn.Module):
    """The learned prompt vectors of one model, and the hooks that put them in its towers' inputs."""

    def __init__(self, model, cfg: PromptConfig, classnames: list[str] | None = None):
        super().__init__()
        self.cfg, self.classnames = cfg, list(classnames) if classnames else None
        self._prompt_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.context_words = None
        if cfg.context:
            if _open_clip_text(model) is not None:
                self._init_text_context(model, cfg)
            elif _hf_text(model) is not None:
                require(not cfg.class_specific, "prompt.class_specific applies to open_clip text towers; a Hugging "
                                                "Face text tower takes peft's prompt tuning, whose context is shared")
                _apply_hf_prompt_tuning(model, cfg)
            else:
                raise ConfigError("prompt.context needs a text tower (open_clip_text or hf_text); the model's towers "
                                  f"are {({m: t.encoder for m, t in model.cfg.towers.items()})}")
        if cfg.visual_tokens:
            vit = _vit(model)
            if vit is None:
                image = model.cfg.towers["image"].encoder if "image" in model.towers else None
                raise ConfigError("prompt.visual_tokens (VPT) needs an open_clip ViT image tower; this model's image "
                                  f"tower is {image or 'absent'}" + (" (not a ViT)" if image else ""))
            width = vit.class_embedding.shape[-1]
            self.visual_prompts = nn.Parameter(torch.randn(cfg.visual_tokens, width) * cfg.init_std)
            # the hooks live as long as the tower: the prompts are part of the model from now on
            vit.patch_dropout.register_forward_hook(self._insert_visual)
            vit.transformer.register_forward_hook(self._drop_visual)

    # --- text: CoOp ---
    def _init_text_context(self, model, cfg: PromptConfig) -> None:
        require(not cfg.class_specific or self.classnames,
                "prompt.class_specific needs the class names (fewshot.classes or eval.classes)")
        self.context_words, n = _context_tokens(model, cfg)
        embedding = _open_clip_text(model).token_embedding
        if cfg.init is not None:
            with torch.no_grad():
                ids = _tokenize(model, [cfg.init])[0, 1:1 + n]
                start = embedding(ids.to(embedding.weight.device)).float().cpu()
        else:
            start = torch.randn(n, embedding.weight.shape[1]) * cfg.init_std
        if cfg.class_specific:
            start = start.unsqueeze(0).repeat(len(self.classnames), 1, 1)
        self.text_context = nn.Parameter(start)

    @property
    def has_text_context(self) -> bool:
        return hasattr(self, "text_context")

    def _prompts(self, model, classnames: list[str]) -> torch.Tensor:
        key = tuple(classnames)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = _tokenize(model, [f"{self.context_words} {c}." for c in classnames])
        return self._prompt_cache[key]

    def class_features(self, model, classnames: list[str], normalize: bool = True) -> torch.Tensor:
        """(C, D) text embeddings of the class prompts with the learned context in them: the zero-shot classifier."""
        if not self.has_text_context:
            raise ValueError("this prompt adapter learned no text context")
        if self.cfg.class_specific and list(classnames) != self.classnames:
            raise ValueError(f"this adapter learned one context per class for {len(self.classnames)} classes "
                             f"({self.classnames[:5]}...); it cannot classify other class names")
        ctx = self.text_context
        tokens = self._prompts(model, classnames).to(ctx.device)
        n = ctx.shape[-2]

        def splice(module, inputs, out):
            context = ctx.to(out.dtype)
            context = context.expand(out.shape[0], -1, -1) if context.dim() == 2 else context
            return torch.cat([out[:, :1], context, out[:, 1 + n:]], dim=1)

        handle = _open_clip_text(model).token_embedding.register_forward_hook(splice)
        try:
            return model.encode("text", tokens, normalize=normalize)
        finally:
            handle.remove()

    # --- image: VPT-shallow ---
    def _insert_visual(self, module, inputs, x):
        prompts = self.visual_prompts.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)

    def _drop_visual(self, module, inputs, x):
        n = self.visual_prompts.shape[0]
        return torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)


def _apply_hf_prompt_tuning(model, cfg: PromptConfig) -> None:
    """peft's prompt tuning on the tower's transformers model, initialised from word embeddings (init) or small
    random vectors."""
    import peft

    tower = model.towers["text"]
    hf = tower.model
    peft_cfg = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=cfg.context,
                                       token_dim=hf.get_input_embeddings().weight.shape[1])
    tower.model = peft.get_peft_model(hf, peft_cfg)
    weight = tower.model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        if cfg.init is not None:   # the init words' embeddings, without the tokenizer's special tokens
            tokenize = tower.transform(False)
            if tokenize.hf is not None:
                ids = torch.tensor(tokenize.hf(cfg.init, add_special_tokens=False)["input_ids"], dtype=torch.long)
            else:   # open_clip's BPE: <BOS> words <EOT> 0 ...
                ids = tokenize.bpe([cfg.init])[0]
                ids = ids[1:int((ids != 0).sum()) - 1]
            if len(ids) != cfg.context:
                raise ConfigError(f"prompt.init '{cfg.init}' is {len(ids)} tokens for the text tower's tokenizer, but "
                                  f"prompt.context is {cfg.context}: make them agree")
            weight.copy_(hf.get_input_embeddings()(ids).float())
        else:
            weight.normal_(0.0, cfg.init_std)


def apply_prompts(model, cfg: PromptConfig, classnames: list[str] | None = None):
    """`model` (a MultiTowerModel, changed in place) with learnable prompts attached as `model.prompt_learner`
    (and, for a Hugging Face text tower, peft's prompt tuning in the tower); only the prompts are trainable, and
    batch-norm statistics stay fixed."""
    from .adapters import freeze_norm_statistics

    if getattr(model, "prompt_learner", None) is not None:
        raise ConfigError("the model already carries prompts")
    model.requires_grad_(False)
    freeze_norm_statistics(model)
    model.prompt_learner = PromptLearner(model, cfg, classnames)
    return model


def prompt_parameters(model) -> dict[str, torch.Tensor]:
    """Every learned prompt tensor of `model`, by its name in the model."""
    return {n: p for n, p in model.named_parameters()
            if n.startswith("prompt_learner.") or ".prompt_encoder." in n}


def save_prompts(model, out_dir: str | Path) -> list[Path]:
    """prompt_config.json + prompt_model.safetensors (+ text/: peft's prompt-tuning adapter of a Hugging Face text
    tower); returns the files."""
    from safetensors.torch import save_file

    learner: PromptLearner = model.prompt_learner
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    own = {n: p.detach().float().cpu().contiguous() for n, p in learner.named_parameters()}
    if own:
        save_file(own, str(out_dir / WEIGHTS_FILE))
    if _hf_text(model) is not None and learner.cfg.context:
        model.towers["text"].model.save_pretrained(out_dir / HF_SUBDIR)
    doc = {"tessera_adapter": "prompt", "prompt": to_dict(learner.cfg), "classnames": learner.classnames,
           "towers": {m: t.encoder for m, t in model.cfg.towers.items()}}
    tmp = out_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out_dir / CONFIG_FILE)
    return sorted(p for p in out_dir.rglob("*") if p.suffix in (".json", ".safetensors"))


def is_prompt_adapter(adapter_dir: str | Path) -> bool:
    return (Path(adapter_dir) / CONFIG_FILE).is_file()


def load_prompts(model, adapter_dir: str | Path, trainable: bool = False):
    """`model` with the prompts saved at `adapter_dir` attached. Prompts made for another base (another tower
    kind, or another width) are a ConfigError that names the difference."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    try:
        doc = json.loads((adapter_dir / CONFIG_FILE).read_text())
        # the init words are not needed: the vectors are loaded (the placeholder words that stand in for them in the
        # prompts are replaced by the vectors, so which words they are does not change the result)
        cfg = from_dict(PromptConfig, {**doc["prompt"], "init": None}, "prompt")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"'{adapter_dir}' is not a prompt adapter directory ({exc})") from None
    towers = {m: t.encoder for m, t in model.cfg.towers.items()}
    for m, encoder in doc.get("towers", {}).items():
        if m in ("text", "image") and towers.get(m) != encoder:
            raise ConfigError(f"prompt adapter '{adapter_dir}' was made for a '{encoder}' {m} tower; this model's is "
                              f"{towers.get(m) or 'absent'}")
    model = apply_prompts(model, cfg, doc.get("classnames"))
    learner: PromptLearner = model.prompt_learner
    if (adapter_dir / WEIGHTS_FILE).is_file():
        saved = load_file(str(adapter_dir / WEIGHTS_FILE))
        own = dict(learner.named_parameters())
        if set(saved) != set(own):
            raise ConfigError(f"prompt adapter '{adapter_dir}' holds {sorted(saved)}, but its config builds "
                              f"{sorted(own)}")
        for name, value in saved.items():
            if own[name].shape != value.shape:
                raise ConfigError(f"prompt adapter '{adapter_dir}': '{name}' has shape {list(value.shape)}, this model "
                                  f"needs {list(own[name].shape)} (made for another base?)")
            with torch.no_grad():
                own[name].copy_(value)
    if _hf_text(model) is not None and cfg.context:
        import peft

        hf_dir = adapter_dir / HF_SUBDIR
        state = load_file(str(hf_dir / "adapter_model.safetensors"))
        try:
            peft.set_peft_model_state_dict(model.towers["text"].model, state)
        except RuntimeError as exc:
            raise ConfigError(f"prompt adapter '{adapter_dir}' does not fit this text tower: "
                              f"{str(exc).splitlines()[0][:300]}") from None
    for p in prompt_parameters(model).values():
        p.requires_grad_(trainable)
    return model
