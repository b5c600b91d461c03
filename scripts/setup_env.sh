#!/usr/bin/env bash
# Create .venv and install Tessera (editable) with the pinned dependency set.
# Sourced by demo.sh and test.sh; TESSERA_EXTRAS names pip extras (test.sh: dev).
# Rerunning is fast: pip runs again only when pyproject.toml or the extras change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${TESSERA_VENV:-$ROOT/.venv}"
EXTRAS="${TESSERA_EXTRAS:-}"
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else 1)'; then
    echo "Tessera needs Python >= 3.11; $PY is $("$PY" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.tessera-install"
HASH="$(sha256sum pyproject.toml | cut -c1-16)"
WANT="$HASH extras=[$EXTRAS]"
# installed already: this pyproject.toml with these extras (or with any extras, when none are asked for)
if [ -n "$EXTRAS" ]; then PATTERN="^$HASH extras=\[$EXTRAS\]\$"; else PATTERN="^$HASH "; fi
if [ ! -f "$STAMP" ] || ! grep -q "$PATTERN" "$STAMP"; then
    echo "[setup] installing tessera${EXTRAS:+[$EXTRAS]} into $VENV (first run downloads torch; later runs skip this)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip   # setuptools: torch pins it below 82; builds are isolated
    "$VENV/bin/python" -m pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
    echo "$WANT" >> "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
