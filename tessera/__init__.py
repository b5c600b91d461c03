"""Tessera: CLIP-style contrastive training of image, text, audio and graph towers in one embedding space.

The package's parts install as subpackages of `tessera`, from the repository's top-level folders:
`tessera.models` (models/), `tessera.data` (data/), `tessera.train` (train/) and `tessera.eval` (eval/).
This root holds what all of them build on and nothing heavy: the typed-config machinery (`tessera.config`)
and the table of modalities (`tessera.modalities`).
"""

import importlib

__version__ = "0.1.0"

__all__ = ["load"]


def __getattr__(name: str):
    """`tessera.load` (the Python API, `tessera.eval.api`), imported on first use: `import tessera` stays light."""
    if name == "load":
        return importlib.import_module("tessera.eval.api").load
    raise AttributeError(f"module 'tessera' has no attribute {name!r}")
