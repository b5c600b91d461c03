"""Pretrain with one rank SIGKILLed (no cleanup, as the kernel's OOM killer or a lost node would), for the elastic
tests. The kill happens only on torchrun's first attempt (TORCHELASTIC_RESTART_COUNT unset or 0), so restarted
workers train normally.

    python tests/kill_run.py step RANK N key=value ...   # at rank RANK's N-th loss computation (mid-step)
    python tests/kill_run.py save RANK N key=value ...   # inside the checkpoint of step N: every file written,
                                                         # COMPLETE and latest not yet
"""

from __future__ import annotations

import os
import signal
import sys

from tessera.train import pretrain
from tessera.train.components import checkpoint, objectives


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    where, rank, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if int(os.environ.get("RANK", "0")) == rank and first_attempt:
        if where == "step":
            calls = [0]
            loss = objectives.ContrastiveObjective.loss

            def counted(self, out, batch):
                calls[0] += 1
                if calls[0] == n:
                    _die()
                return loss(self, out, batch)

            objectives.ContrastiveObjective.loss = counted
        elif where == "save":
            fsync_tree = checkpoint.fsync_tree

            def synced(path):
                if path.name == checkpoint.tag_for(n):
                    _die()
                return fsync_tree(path)

            checkpoint.fsync_tree = synced
        else:
            sys.exit(f"kill_run.py: unknown place '{where}' (step or save)")
    sys.exit(pretrain.main(sys.argv[4:]))
