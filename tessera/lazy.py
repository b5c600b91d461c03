"""Packages that re-export their modules' names without importing those modules until a name is used (PEP 562).

`tessera.data` and `tessera.models` name their public classes and functions at the package level (and `tessera`
its `load`); importing the package for one light module (a config dataclass, say) must not import torch, DeepSpeed
or open_clip with it. That is what lets `--help` answer at once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, modules: dict[str, list[str]]) -> tuple[Callable[[str], Any], list[str]]:
    """The `__getattr__` and `__all__` of `package`, which re-exports `modules` ({".loader": [names], ...}: each
    module relative to the package, with the public names it defines). A name is imported on first use and then
    kept in the package's namespace."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__, sorted(where)
