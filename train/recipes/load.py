"""Recipes: YAML files of config keys (`configs/*.yaml`), plus dotted `key=value` overrides, into a typed config.

A recipe may start with `inherit: other.yaml` (relative to itself) to take another recipe's keys and override them.
(`base:` is the exported model a fine-tuning recipe starts from, never another recipe.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tessera.config import ConfigError, describe, from_dict, set_dotted, to_dict

from .runs import PretrainConfig

INHERIT = "inherit"


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path: str | Path, _seen: tuple = ()) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"'{path}' includes itself through '{INHERIT}'")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    if str(doc.get("base", "")).endswith((".yaml", ".yml")):
        raise ConfigError(
            f"{path}: 'base: {doc['base']}' names a recipe; a recipe inherits another with "
            f"'{INHERIT}: {doc['base']}' ('base' is the exported model a fine-tuning recipe starts from)"
        )
    parent = doc.pop(INHERIT, None)
    if parent is not None:
        doc = _deep_merge(read_recipe(path.parent / parent, _seen + (path.resolve(),)), doc)
    return doc


def parse_value(text: str) -> Any:
    """YAML scalar/list/mapping syntax (`true`, `3`, `[a, b]`, `{k: v}`); anything else stays a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted `key=value` in order (a key may refine one set before it: `model={...} model.embed_dim=64`);
    the same key twice is an error, not a silent last-one-wins."""
    given: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.steps=100)")
        key, _, text = item.partition("=")
        key = key.strip()
        if key in given:
            hint = (
                " (an unquoted {000000..000003} pattern is expanded by the shell into one override per shard: "
                "quote it, e.g. 'data.train=shards/train-{000000..000003}.tar')"
                if text.endswith(".tar") and given[key].endswith(".tar")
                else ""
            )
            raise ConfigError(f"override key '{key}' is given twice ('{given[key]}' and '{text}'){hint}")
        given[key] = text
        set_dotted(tree, key, parse_value(text))
    return tree


def merge_overrides(defaults: list[str], extra: list[str] | tuple[str, ...]) -> list[str]:
    """`defaults` less the keys `extra` sets again, then `extra`: for tools that build a command line on top of
    their own defaults (apply_overrides refuses a key given twice)."""
    keys = {x.partition("=")[0].strip() for x in extra}
    return [x for x in defaults if x.partition("=")[0].strip() not in keys] + list(extra)


def load_config(config_path: str | Path | None, overrides: list[str] = (), cls: type = PretrainConfig):
    tree = read_recipe(config_path) if config_path else {}
    return from_dict(cls, apply_overrides(tree, list(overrides)))


def dump_config(cfg: PretrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def help_text(cls: type = PretrainConfig) -> str:
    return "Config keys (set in the YAML recipe or as key=value overrides):\n" + "\n".join(describe(cls))
