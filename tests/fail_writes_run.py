"""Pretrain with rank RANK's writes under the checkpoints folder failing with ENOSPC from the save of step N on, as a
full disk on one node would make them, for the fault tests.

    python tests/fail_writes_run.py probe RANK N key=value ...   # every write: the check before the save finds it
    python tests/fail_writes_run.py save RANK N key=value ...    # every torch.save: DeepSpeed's own save fails
"""

from __future__ import annotations

import builtins
import errno
import os
import sys

import torch

from tessera.train import pretrain
from tessera.train.components import checkpoint

if __name__ == "__main__":
    where, rank, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if where not in ("probe", "save"):
        sys.exit(f"fail_writes_run.py: unknown place '{where}' (probe or save)")
    if int(os.environ.get("RANK", "0")) == rank:
        armed = [False]
        real_open, real_save = builtins.open, checkpoint.save

        def save(engine, ckpt_dir, step, *args, **kwargs):
            armed[0] = step >= n
            return real_save(engine, ckpt_dir, step, *args, **kwargs)

        def full(path) -> bool:
            return armed[0] and "/checkpoints/" in str(path)

        def failing_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax") and full(file):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            return real_open(file, mode, *args, **kwargs)

        def failing_save(obj, f, *args, **kwargs):
            if full(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return real_torch_save(obj, f, *args, **kwargs)

        checkpoint.save = save
        if where == "probe":
            builtins.open = failing_open
        else:
            real_torch_save = torch.save
            torch.save = failing_save
    sys.exit(pretrain.main(sys.argv[4:]))
