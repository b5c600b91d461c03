"""DeepSpeed, imported the way Tessera runs it: quiet on CPU, and compiling nothing at run time.

Every Tessera module imports DeepSpeed from here (`from .deepspeed_setup import deepspeed`), so these settings
hold before DeepSpeed's first line runs:
- On a machine without a GPU the accelerator is CPU, named up front (`DS_ACCELERATOR=cpu` unless the user set
  one), so DeepSpeed does not warn at import that it "was unable to detect" a GPU.
- DeepSpeed builds its shared-memory collectives (`deepspeed_shm_comm`, C++ compiled with the system compiler at
  the first run, about a minute on 2 cores) for every CPU process group, yet only its inference all-reduce uses
  them: training never does. Without a C++ compiler that build fails and no run can start. Tessera leaves the op
  out, so a fresh install trains at once, on a machine with no compiler too.
- DeepSpeed's INFO and WARNING records stay out of the console unless TESSERA_DEEPSPEED_LOG asks for them
  (`TESSERA_DEEPSPEED_LOG=info`); errors always show.
"""

from __future__ import annotations

import importlib
import os

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"

import deepspeed  # noqa: E402  (after the accelerator is named: DeepSpeed picks it at import)

LOG_LEVEL = os.environ.get("TESSERA_DEEPSPEED_LOG", "error").upper()


def _no_shared_memory_op():
    """Stands in for `deepspeed.comm.torch.build_shm_op`: no JIT-built shared-memory op (see the module doc)."""
    return None


# by module path: `deepspeed.comm.torch` as an attribute is the torch library, which deepspeed.comm re-exports
importlib.import_module("deepspeed.comm.torch").build_shm_op = _no_shared_memory_op
# the level of DeepSpeed's logger and of its handler (which writes to stdout)
deepspeed.utils.logging.set_log_level_from_string(LOG_LEVEL if LOG_LEVEL in ("DEBUG", "INFO", "WARNING") else "ERROR")

__all__ = ["deepspeed"]
