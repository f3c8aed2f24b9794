#!/usr/bin/env bash
# Build the axolotl integration venv: axolotl 0.21.0 with its own pinned stack, this project (editable,
# [hf,trl]) and pytest, every version pinned by requirements/axolotl.txt (a pip freeze of a working venv).
#
#   tests/integrations/axolotl/install.sh [VENV_DIR]     # default: $FLATLORA_VENV_AXOLOTL or .venv-axolotl
#   FLATLORA_INTEGRATION=axolotl VENV_DIR/bin/python -m pytest tests/integrations/axolotl
#
# axolotl 0.21 needs Python 3.12 ($FLATLORA_PYTHON312, else python3.12 on PATH, else pyenv's 3.12.1).
# Installs with uv (parallel downloads, ~4x faster than pip here; bootstrapped into the venv by pip);
# FLATLORA_INSTALLER=pip uses pip alone.  PyPI's torch wheel is the CUDA build (~4 GB of the ~7 GB);
# the test runs on CPU.  A venv already built from the same lock and pyproject.toml is left as it is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
VENV="${1:-${FLATLORA_VENV_AXOLOTL:-$ROOT/.venv-axolotl}}"
LOCK="$ROOT/requirements/axolotl.txt"
UV_VERSION=0.13.10

find_python() {
    local p
    for p in "${FLATLORA_PYTHON312:-}" "$(command -v python3.12 || true)" /root/.pyenv/versions/3.12.1/bin/python3.12; do
        if [[ -n "$p" && -x "$p" ]] && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    echo "install.sh: axolotl 0.21 needs Python 3.12; set FLATLORA_PYTHON312=/path/to/python3.12" >&2
    exit 1
}

[[ -f "$LOCK" ]] || { echo "install.sh: $LOCK is missing (the committed lock)" >&2; exit 1; }
[[ -x "$VENV/bin/python" ]] || "$(find_python)" -m venv "$VENV"
PY="$VENV/bin/python"
STAMP="$VENV/.flatlora-axolotl-installed"
WANT="$(cat "$LOCK" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "install.sh: $VENV is up to date with $LOCK"
    exit 0
fi

# The lock pins every package (axolotl, pytest and all their dependencies); the project is resolved
# against it, so a project floor that excludes axolotl's pins fails here instead of drifting.
if [[ "${FLATLORA_INSTALLER:-uv}" == uv ]]; then
    "$PY" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
    "$VENV/bin/uv" pip install --python "$PY" -c "$LOCK" -r "$LOCK" -e "$ROOT[hf,trl]"
else
    "$PY" -m pip install -q --disable-pip-version-check -c "$LOCK" -r "$LOCK" -e "$ROOT[hf,trl]"
fi
"$PY" -c 'import importlib.metadata as m; print("install.sh: axolotl", m.version("axolotl"), "flatlora_dist", m.version("flatlora_dist"))'
echo "$WANT" > "$STAMP"
