#!/usr/bin/env bash
# Install Tessera with its dev, chem, docs and wandb extras into .venv, check the code with ruff (lint and format),
# then run the whole test suite (slow and multi-process tests included; the docs site's strict build among them).
# Extra arguments go to pytest.
#   bash scripts/test.sh --cpu-kinds [ARGS]   instead reruns the learning tests under ATen's kernels for this CPU and
#                                             under AVX2, at 1 and 2 threads, and prints each result beside its bound
#                                             (scripts/learning_margins.py; ARGS go to it, e.g. --seeds 0,1)
set -euo pipefail
export TESSERA_EXTRAS=dev,chem,docs,wandb
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
if [ "${1:-}" = "--cpu-kinds" ]; then
    exec python scripts/learning_margins.py "${@:2}"
fi
ruff check .
ruff format --check .
# One worker per core (PYTEST_XDIST_AUTO_NUM_WORKERS=N sets how many; pass -n0 for one process, as --pdb needs),
# whole test files to a worker, in the order tests/conftest.py gives them (the slowest files first).
exec python -m pytest -n auto --dist loadfile --no-loadscope-reorder "${@:--q}"
