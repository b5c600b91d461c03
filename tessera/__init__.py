"""Tessera: CLIP-style contrastive training of image, text, audio and graph towers in one embedding space.

The package's parts install as subpackages of `tessera`, from the repository's top-level folders:
`tessera.models` (models/), `tessera.data` (data/), `tessera.train` (train/) and `tessera.eval` (eval/).
This root holds what all of them build on and nothing heavy: the typed-config machinery (`tessera.config`),
the table of modalities (`tessera.modalities`) and lazily imported package names (`tessera.lazy`).
"""

from .lazy import lazy_exports

__version__ = "0.1.0"

# `tessera.load` (the Python API, `tessera.eval.api`) is imported on first use: `import tessera` stays light
__getattr__, __all__ = lazy_exports(__name__, {"tessera.eval.api": ["load"]})
