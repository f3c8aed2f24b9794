#!/usr/bin/env bash
# usage: tests/integrations/llamafactory/install.sh VENV_DIR
#
# A venv with LLaMA-Factory 0.9.5's own pinned stack (requirements/llamafactory.txt: torch 2.11.0,
# transformers 5.6.0, peft 0.18.1, accelerate 1.11.0, trl 0.24.0, datasets 4.0.0, ...) and this project
# editable, for tests/integrations/llamafactory.  Python 3.11 (LLaMA-Factory needs >= 3.11); another
# interpreter: PYTHON=python3.12 install.sh VENV_DIR.
#
# The lock is installed as is (--no-deps: no resolution, exactly its versions), then the project without
# its deps (the lock holds them), then a dependency check proves the set consistent.  The installer is uv
# (pinned below, from PyPI into the venv: parallel downloads, no bytecode compiling; 1.5-2.5 min here
# against pip's 5-6 min); INSTALLER=pip, or uv failing to install, falls back to pip (--no-compile).
# A venv this script finished (stamp file) is kept while the lock and pyproject.toml are unchanged, else
# rebuilt from scratch.  torch 2.11.0 on PyPI is the CUDA build (nvidia-* wheels, ~4 GB; the venv is
# ~5.6 GB); it runs on CPU.  torchvision 0.26.0 and torchaudio 2.11.0 match it and load (no workaround,
# unlike torch 2.13 with their newer releases).
set -euo pipefail

VENV=${1:?usage: $0 VENV_DIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
LOCK=$ROOT/requirements/llamafactory.txt
PYTHON=${PYTHON:-python3.11}
INSTALLER=${INSTALLER:-uv}
UV_VERSION=0.13.10
STAMP=$VENV/.flatlora-llamafactory

want=$(cat "$LOCK" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP ]]; then  # a venv this script finished: keep it if current, else rebuild it from scratch
    if [[ $(cat "$STAMP") == "$want" && -x $VENV/bin/python ]]; then
        echo "install.sh: $VENV is up to date with $LOCK"
        exit 0
    fi
    echo "install.sh: $LOCK or pyproject.toml changed since $VENV was built: rebuilding it"
    rm -rf "$VENV"
fi
if ! command -v "$PYTHON" >/dev/null; then
    echo "install.sh: $PYTHON not found; LLaMA-Factory 0.9.5 needs Python >= 3.11 (set PYTHON=...)" >&2
    exit 1
fi

start=$SECONDS
rm -f "$STAMP"
"$PYTHON" -m venv "$VENV"
PY=$VENV/bin/python
if [[ $INSTALLER == uv ]] && "$PY" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"; then
    install() { "$VENV/bin/uv" pip install --python "$PY" -q --no-deps "$@"; }
    check() { "$VENV/bin/uv" pip check --python "$PY"; }
else
    install() { "$PY" -m pip install -q --disable-pip-version-check --no-compile --no-deps "$@"; }
    check() { "$PY" -m pip check; }
fi
lap() { echo "install.sh: $1 at $((SECONDS - start)) s"; }
lap "venv and installer ready"
install -r "$LOCK"
lap "lock installed"
install -e "$ROOT[hf]"
check
"$PY" -c "import torch, torchvision, torchaudio, llamafactory.train.tuner, flatlora_dist.hf"
lap "project installed, checked and imported"
echo "$want" > "$STAMP"
echo "install.sh: $VENV ready in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))"
