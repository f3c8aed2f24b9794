#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs on the GPU image that the image lacks, downloaded into one folder
# that travels with the run (the GPU machine reaches no package index; a run carries at most 64 MiB).
#
# The image (the device tool's KINDS.md): Python 3.12, torch 2.11.0+cu130, triton 3.6.0, transformers
# 5.17.0, accelerate 1.15.0, peft, safetensors, numpy, einops, psutil, msgpack, ninja, py-cpuinfo, tqdm;
# no deepspeed, no bitsandbytes.  So: bitsandbytes, a deepspeed wheel built here with DS_BUILD_OPS=0
# (PyPI has only its sdist, whose build imports torch), and deepspeed's pydantic/hjson dependencies.
# Versions are the newest lock's (requirements/newest.txt), the set CI tested.
#
# Usage: bash bench/gpu_wheels.sh DIR     (DIR inside the work tree, carried by the run's `carry`)
# then, on the GPU machine, before bench/gpu_check.sh, the line this script prints last:
#   python3 -m pip install --no-index --no-deps DIR/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: bash bench/gpu_wheels.sh DIR}
LOCK=requirements/newest.txt
PY=${PY:-.venv/bin/python}
LIMIT_MIB=64

pin() {  # pin NAME: NAME==VERSION as the lock has it (names compared case- and -/_-insensitively)
  local want; want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  local line
  line=$(sed -E 's/^([^=]+)==/\1 /' "$LOCK" | awk -v w="$want" '{n=tolower($1); gsub("_","-",n); if (n==w) print $1"=="$2}')
  [[ -n "$line" ]] || { echo "error: $1 is not in $LOCK" >&2; exit 2; }
  echo "$line"
}

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
PURE=(hjson annotated-types typing-inspection typing-extensions pydantic)
BINARY=(pydantic-core bitsandbytes)
pins=(); for p in "${PURE[@]}" "${BINARY[@]}"; do pins+=("$(pin "$p")"); done
"$PY" -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
  --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" "${pins[@]}"
# deepspeed: build the wheel here, without its C++/CUDA ops (they JIT-build where needed; the bench uses none)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "$(pin deepspeed)"

ls -l "$DIR"/*.whl
count=$(ls "$DIR"/*.whl | wc -l)
expected=$(( ${#PURE[@]} + ${#BINARY[@]} + 1 ))
(( count == expected )) || { echo "error: $count wheels in $DIR, expected $expected" >&2; exit 1; }
size=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
echo "total: $(( size / 1024 / 1024 )) MiB of $LIMIT_MIB MiB"
(( size <= LIMIT_MIB * 1024 * 1024 )) || { echo "error: over the ${LIMIT_MIB} MiB a run carries" >&2; exit 1; }
echo "on the GPU machine: python3 -m pip install --no-index --no-deps $DIR/*.whl"
