"""Prompt tuning: learnable context for class-name prompts (CoOp), visual prompt tokens (VPT-shallow), and peft's
prompt tuning for Hugging Face text towers. Only the prompts train; the base stays as it was.

    from tessera.models.prompts import PromptConfig, apply_prompts, save_prompts, load_prompts
    model = apply_prompts(load_model("runs/base/model"), PromptConfig(context=4, visual_tokens=8), classnames)
    ...train (model.prompt_learner.class_features(model, classnames) is the zero-shot classifier)...
    save_prompts(model, "runs/x/adapter")     # prompt_config.json + prompt_model.safetensors (+ peft_prompt/)
    model = load_prompts(load_model("runs/base/model"), "runs/x/adapter")

Where prompts go is declared by each tower's encoder (`Encoder.context_site`, `Encoder.token_site`); this module
never looks inside a tower. The context goes to the tower that encodes class prompts (the language modality of
`tessera.modalities`), VPT tokens to every other tower that takes them:
- `context: M`, spliced (open_clip's text tower, CoOp): class c's prompt is "<BOS> v_1 ... v_M <classname>. <EOT>",
  the M vectors v learned in the token-embedding space; shared by every class, or one set per class
  (`class_specific`). They replace the embeddings of M placeholder words while the tower runs, so the tower's own
  forward (positions, causal mask, EOT pooling) is used unchanged. They only enter the class prompts, i.e. the
  zero-shot classifier: captions encoded for retrieval are untouched. Shared context also classifies class names
  it never saw.
- `context: M`, as a prefix (a Hugging Face text tower): peft's prompt tuning, M virtual tokens prepended to every
  input of the tower (class prompts and captions alike); pooling skips them. Saved in peft's own format.
- `visual_tokens: N` (open_clip's ViT, VPT-shallow): N learned tokens inserted after the class token, after the
  positional embedding, seen by every layer; they are dropped again after the transformer, so the tower pools
  (class token, average, or attention pool) over the same tokens as before.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tessera import modalities
from tessera.config import ConfigError, from_dict, require, to_dict

from .adapter_config import PromptConfig
from .encoder import PrefixContext, SplicedContext
from .freeze import freeze_norm_statistics

CONFIG_FILE = "prompt_config.json"
WEIGHTS_FILE = "prompt_model.safetensors"
PEFT_SUBDIR = "peft_prompt"
# what the first saved format called the tensors (it kept peft's files in a folder named after the prompt tower):
# adapters written by it load as they are
LEGACY_NAMES = {"text_context": "context", "visual_prompts": "visual_prompts.image"}
PLACEHOLDER = "X"


def _encoders(model) -> dict[str, str]:
    return {m: t.encoder for m, t in model.cfg.towers.items()}


def _check_init_length(cfg: PromptConfig, ids: torch.Tensor) -> None:
    if len(ids) != cfg.context:
        raise ConfigError(
            f"prompt.init '{cfg.init}' is {len(ids)} tokens for the text tower's tokenizer, but "
            f"prompt.context is {cfg.context}: make them agree"
        )


class PromptLearner(nn.Module):
    """The learned prompt vectors of one model, and the hooks that put them in its towers' inputs."""

    def __init__(self, model, cfg: PromptConfig, classnames: list[str] | None = None):
        super().__init__()
        self.cfg, self.classnames = cfg, list(classnames) if classnames else None
        self._prompt_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.language = modalities.language(model.modalities)
        self.context_words = None
        self._spliced: SplicedContext | None = None
        self.prefix: PrefixContext | None = None
        if cfg.context:
            site = model.towers[self.language].context_site() if self.language else None
            if isinstance(site, SplicedContext):
                self._init_spliced_context(site, cfg)
            elif isinstance(site, PrefixContext):
                require(
                    not cfg.class_specific,
                    "prompt.class_specific needs spliced context (open_clip's text tower); "
                    "a Hugging Face text tower takes peft's prompt tuning, whose context "
                    "is shared",
                )
                _apply_prefix_context(site, cfg)
                self.prefix = site
            else:
                raise ConfigError(
                    "prompt.context needs a tower that encodes class prompts and says where context "
                    f"goes (open_clip_text, hf_text); the model's towers are {_encoders(model)}"
                )
        if cfg.visual_tokens:
            sites = {m: t.token_site() for m, t in model.towers.items() if m != self.language}
            sites = {m: s for m, s in sites.items() if s is not None}
            if not sites:
                raise ConfigError(
                    "prompt.visual_tokens (VPT) needs a tower that takes input tokens (an open_clip "
                    f"ViT image tower); this model's towers are {_encoders(model)}"
                )
            self.visual_prompts = nn.ParameterDict(
                {m: nn.Parameter(torch.randn(cfg.visual_tokens, s.width) * cfg.init_std) for m, s in sites.items()}
            )
            # the hooks live as long as the towers: the prompts are part of the model from now on
            for m, site in sites.items():
                site.insert_after.register_forward_hook(functools.partial(self._insert_visual, m))
                site.remove_after.register_forward_hook(functools.partial(self._drop_visual, m))

    @property
    def towers(self) -> list[str]:
        """The towers these prompts enter."""
        spliced_or_prefix = [self.language] if self.cfg.context else []
        return [*spliced_or_prefix, *getattr(self, "visual_prompts", {})]

    # --- context spliced into the class prompts: CoOp ---
    def _init_spliced_context(self, site: SplicedContext, cfg: PromptConfig) -> None:
        require(
            not cfg.class_specific or self.classnames,
            "prompt.class_specific needs the class names (fewshot.classes or eval.classes)",
        )
        self._spliced = site
        room = len(site.tokenize("")) - site.offset - 1  # the tower's context length less <BOS> and <EOT>
        if cfg.context > room:
            raise ConfigError(
                f"prompt.context is {cfg.context} tokens, but the text tower's prompts hold only {room} "
                "(and the class name needs some of them): lower prompt.context"
            )
        self.context_words = cfg.init if cfg.init is not None else " ".join([PLACEHOLDER] * cfg.context)
        ids = site.word_ids(self.context_words)
        _check_init_length(cfg, ids)
        embedding = site.embedding
        if cfg.init is not None:
            with torch.no_grad():
                start = embedding(ids.to(embedding.weight.device)).float().cpu()
        else:
            start = torch.randn(len(ids), embedding.weight.shape[1]) * cfg.init_std
        if cfg.class_specific:
            start = start.unsqueeze(0).repeat(len(self.classnames), 1, 1)
        self.context = nn.Parameter(start)

    @property
    def has_context(self) -> bool:
        """Whether the class prompts carry learned context (and so replace the templates of classes.json)."""
        return self._spliced is not None

    def _prompts(self, classnames: list[str]) -> torch.Tensor:
        key = tuple(classnames)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = torch.stack(
                [self._spliced.tokenize(f"{self.context_words} {c}.") for c in classnames]
            )
        return self._prompt_cache[key]

    def class_features(self, model, classnames: list[str], normalize: bool = True) -> torch.Tensor:
        """(C, D) embeddings of the class prompts with the learned context in them: the zero-shot classifier."""
        if not self.has_context:
            raise ValueError("this prompt adapter learned no context for class prompts")
        if self.cfg.class_specific and list(classnames) != self.classnames:
            raise ValueError(
                f"this adapter learned one context per class for {len(self.classnames)} classes "
                f"({self.classnames[:5]}...); it cannot classify other class names"
            )
        ctx = self.context
        tokens = self._prompts(classnames).to(ctx.device)
        n, start = ctx.shape[-2], self._spliced.offset

        def splice(module, inputs, out):
            context = ctx.to(out.dtype)
            context = context.expand(out.shape[0], -1, -1) if context.dim() == 2 else context
            return torch.cat([out[:, :start], context, out[:, start + n :]], dim=1)

        handle = self._spliced.embedding.register_forward_hook(splice)
        try:
            return model.encode(self.language, tokens, normalize=normalize)
        finally:
            handle.remove()

    # --- input tokens: VPT-shallow ---
    def _insert_visual(self, modality: str, module, inputs, x):
        prompts = self.visual_prompts[modality].to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)

    def _drop_visual(self, modality: str, module, inputs, x):
        n = self.visual_prompts[modality].shape[0]
        return torch.cat([x[:, :1], x[:, 1 + n :]], dim=1)


def _apply_prefix_context(site: PrefixContext, cfg: PromptConfig) -> None:
    """peft's prompt tuning on the site's transformers model, initialised from word embeddings (init) or small
    random vectors."""
    hf = getattr(site.owner, site.attribute)
    peft_cfg = peft.PromptTuningConfig(
        task_type="FEATURE_EXTRACTION",
        num_virtual_tokens=cfg.context,
        token_dim=hf.get_input_embeddings().weight.shape[1],
    )
    wrapped = peft.get_peft_model(hf, peft_cfg)
    setattr(site.owner, site.attribute, wrapped)
    weight = wrapped.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        if cfg.init is not None:  # the init words' embeddings, without the tokenizer's special tokens
            ids = site.word_ids(cfg.init)
            _check_init_length(cfg, ids)
            weight.copy_(hf.get_input_embeddings()(ids).float())
        else:
            weight.normal_(0.0, cfg.init_std)


def apply_prompts(model, cfg: PromptConfig, classnames: list[str] | None = None):
    """`model` (a MultiTowerModel, changed in place) with learnable prompts attached as `model.prompt_learner`
    (and, for a Hugging Face text tower, peft's prompt tuning in the tower); only the prompts are trainable, and
    batch-norm statistics stay fixed."""
    if getattr(model, "prompt_learner", None) is not None:
        raise ConfigError("the model already carries prompts")
    model.requires_grad_(False)
    freeze_norm_statistics(model)
    model.prompt_learner = PromptLearner(model, cfg, classnames)
    return model


def prompt_parameters(model) -> dict[str, torch.Tensor]:
    """Every learned prompt tensor of `model`, by its name in the model."""
    return {n: p for n, p in model.named_parameters() if n.startswith("prompt_learner.") or ".prompt_encoder." in n}


def save_prompts(model, out_dir: str | Path) -> list[Path]:
    """prompt_config.json + prompt_model.safetensors (+ peft_prompt/: peft's prompt-tuning adapter of a Hugging Face
    text tower); returns the files."""
    learner: PromptLearner = model.prompt_learner
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    own = {n: p.detach().float().cpu().contiguous() for n, p in learner.named_parameters()}
    if own:
        save_file(own, str(out_dir / WEIGHTS_FILE))
    if learner.prefix is not None:
        getattr(learner.prefix.owner, learner.prefix.attribute).save_pretrained(out_dir / PEFT_SUBDIR)
    encoders = _encoders(model)
    doc = {
        "tessera_adapter": "prompt",
        "prompt": to_dict(learner.cfg),
        "classnames": learner.classnames,
        "towers": {m: encoders[m] for m in learner.towers},
    }
    tmp = out_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out_dir / CONFIG_FILE)
    return sorted(p for p in out_dir.rglob("*") if p.suffix in (".json", ".safetensors"))


def is_prompt_adapter(adapter_dir: str | Path) -> bool:
    return (Path(adapter_dir) / CONFIG_FILE).is_file()


def load_prompts(model, adapter_dir: str | Path, trainable: bool = False):
    """`model` with the prompts saved at `adapter_dir` attached. Prompts made for another base (another tower
    kind, or another width) are a ConfigError that names the difference."""
    adapter_dir = Path(adapter_dir)
    try:
        doc = json.loads((adapter_dir / CONFIG_FILE).read_text())
        # the init words are not needed: the vectors are loaded (the placeholder words that stand in for them in the
        # prompts are replaced by the vectors, so which words they are does not change the result)
        cfg = from_dict(PromptConfig, {**doc["prompt"], "init": None}, "prompt")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"'{adapter_dir}' is not a prompt adapter directory ({exc})") from None
    encoders = _encoders(model)
    for m, encoder in doc.get("towers", {}).items():
        if encoders.get(m) != encoder:
            raise ConfigError(
                f"prompt adapter '{adapter_dir}' was made for a '{encoder}' {m} tower; this model's is "
                f"{encoders.get(m) or 'absent'}"
            )
    model = apply_prompts(model, cfg, doc.get("classnames"))
    learner: PromptLearner = model.prompt_learner
    if (adapter_dir / WEIGHTS_FILE).is_file():
        saved = {LEGACY_NAMES.get(k, k): v for k, v in load_file(str(adapter_dir / WEIGHTS_FILE)).items()}
        own = dict(learner.named_parameters())
        if set(saved) != set(own):
            raise ConfigError(
                f"prompt adapter '{adapter_dir}' holds {sorted(saved)}, but its config builds {sorted(own)}"
            )
        for name, value in saved.items():
            if own[name].shape != value.shape:
                raise ConfigError(
                    f"prompt adapter '{adapter_dir}': '{name}' has shape {list(value.shape)}, this model "
                    f"needs {list(own[name].shape)} (made for another base?)"
                )
            with torch.no_grad():
                own[name].copy_(value)
    if learner.prefix is not None:
        found = [adapter_dir / d / "adapter_model.safetensors" for d in (PEFT_SUBDIR, learner.language)]
        found = [path for path in found if path.is_file()]
        if not found:
            raise ConfigError(
                f"prompt adapter '{adapter_dir}' learned peft prompt tuning, but its "
                f"{PEFT_SUBDIR}/adapter_model.safetensors is missing"
            )
        state = load_file(str(found[0]))
        try:
            peft.set_peft_model_state_dict(getattr(learner.prefix.owner, learner.prefix.attribute), state)
        except RuntimeError as exc:
            raise ConfigError(
                f"prompt adapter '{adapter_dir}' does not fit this text tower: {str(exc).splitlines()[0][:300]}"
            ) from None
    for p in prompt_parameters(model).values():
        p.requires_grad_(trainable)
    return model
