#!/usr/bin/env bash
# GPU checks for flatlora_dist, as one script that fits in 10 minutes:
#   1. environment (torch, CUDA device)              -> $OUT/env.json
#   2. pytest -m cuda (the CUDA-marked tests)         -> $OUT/pytest_cuda.xml
#   3. bench/noise.py: keyed noise vs torch.randn     -> $OUT/noise.json
#   4. bench/qlora_overhead.py at a Llama-7B MLP shape (4096x11008, bf16)   -> $OUT/qlora_overhead.log
#   5. perturb/restore of one 4096x11008 bf16 layer: this library vs the reference-style dense noise
#      (time, peak extra memory, bit-exact restore, fix-ups)                 -> $OUT/layer.json
#   6. bench/overhead.py --device cuda --model random: step time / memory of a random-weight model of
#      SmolLM2-135M's shape (the package with its weights cannot travel to the GPU image), 4096 tokens per step
#                                                                            -> $OUT/overhead.json
#   7. bench/fused_layer.py: one LLaMA-7B layer's perturb+restore (fused scheme) vs a copy_ of the same
#      bytes (bandwidth floor), each fused kernel alone (write, restore, row_sumsq) vs that copy_, and
#      the Flat/LoRA step ratio at 7B layer shapes                           -> $OUT/fused_layer.json
#   8. bench/launches.py: launches and host syncs of one 7B layer, fused and blocks -> $OUT/launches.json
#   9. bench/launches.py --qlora: the same layer as nf4 4-bit targets, a step and a layer call
#                                                                            -> $OUT/launches_qlora.json
#  10. bench/qlora_fused.py: QLoRA's noisy weight for one 7B layer (nf4): the one-kernel noisy_4bit vs
#      bitsandbytes' dequantize alone and vs dequantize + noisy               -> $OUT/qlora_fused.json
#  11. bench/kernel_cost.py: the same kernels' static SASS per element (sm_90, compiled here with
#      Triton's ptxas; needs no GPU), next to their timings                   -> $OUT/kernel_cost.json
#   $OUT/summary.json lists every step with its exit code and seconds; each step's output is in
#   $OUT/<step>.log.  Steps run under `timeout` within a global 570 s deadline; a failing step does
#   not stop the others; the script exits 1 if any step failed.
#
# Usage (from anywhere; it cds to the repository root):
#   OUT=/some/dir bash bench/gpu_check.sh            # on a CUDA machine
#   DEVICE=cpu OUT=/tmp/x bash bench/gpu_check.sh    # the same steps on CPU with small shapes (smoke test)
#   bash bench/gpu_check.sh --dry-run                # print the commands only
#
# It installs nothing.  It needs a Python with torch (CUDA build), transformers, peft, accelerate,
# bitsandbytes and this repository importable: set PY=/path/to/python, else .venv/bin/python when it
# exists, else python3.  On the GPU image, what it lacks travels as wheels: bench/gpu_wheels.sh DIR
# downloads them (under 64 MiB) and prints the install line to run there first.
set -u
cd "$(dirname "$0")/.." || exit 2

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench/results/gpu_check_${DEVICE}}
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEADLINE=${DEADLINE:-570}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false DEVICE OUT

if [[ "$DEVICE" == cpu ]]; then
  SHAPE=1024x2816; DTYPE=float32; QDTYPE=fp32
  NOISE_ARGS=(--numel 1048576 --repeats 2)
  QLORA_ARGS=(--shape "$SHAPE" --dtype "$QDTYPE" --seq 64 --steps 2 --warmup 1)
  OVERHEAD_ARGS=(--quick --no-dist --model random)
  LAYER_ARGS=(--scale 32 --tokens 64 --reps 2 --dtype float32)
  LAUNCH_ARGS=(--fused-scale 64 --blocks-scale 16)
  QFUSED_ARGS=(--scale 32 --reps 2)
  LAYER_ENV=(FLATLORA_KERNELS=fused TRITON_INTERPRET=1)  # the fused kernels in the Triton interpreter
else
  SHAPE=4096x11008; DTYPE=bfloat16; QDTYPE=bf16
  NOISE_ARGS=()
  QLORA_ARGS=(--shape "$SHAPE" --dtype "$QDTYPE" --seq 2048)
  OVERHEAD_ARGS=(--no-dist --rounds 5 --model random)
  LAYER_ARGS=(--scale 1 --tokens 4096 --reps 5 --dtype bfloat16)
  LAUNCH_ARGS=(--fused-scale 1 --blocks-scale 1 --dtype bfloat16)
  QFUSED_ARGS=(--scale 1 --reps 20)
  LAYER_ENV=(FLATLORA_KERNELS=fused)
fi
export SHAPE DTYPE

mkdir -p "$OUT"
START=$(date +%s)
STEPS=()
FAILED=0

# run_step NAME TIMEOUT_S CMD...: run CMD with its output in $OUT/NAME.log, record rc and seconds
run_step() {
  local name=$1 limit=$2; shift 2
  local now left rc t0
  now=$(date +%s); left=$((DEADLINE - (now - START)))
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit}s): $*"
  if (( DRY )); then STEPS+=("{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"dry_run\": true}"); return; fi
  if (( limit < 5 )); then
    echo "   skipped: global deadline reached"
    STEPS+=("{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": \"deadline\"}"); FAILED=1; return
  fi
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  (( rc != 0 )) && FAILED=1
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s; tail:"; tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
  STEPS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}")
}

run_step env 60 "$PY" -c "
import json, os, platform, torch
d = {'torch': torch.__version__, 'cuda_available': torch.cuda.is_available(), 'device': os.environ['DEVICE'],
     'python': platform.python_version(), 'cpus': os.cpu_count()}
if torch.cuda.is_available():
    d.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
             gpu_mem_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
elif os.environ['DEVICE'] == 'cuda':
    raise SystemExit('DEVICE=cuda but torch.cuda.is_available() is False (use DEVICE=cpu for a CPU smoke run)')
json.dump(d, open('$OUT/env.json', 'w'), indent=1); print(d)"

run_step pytest_cuda 180 "$PY" -m pytest -m cuda -q -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml" tests

run_step noise 90 "$PY" bench/noise.py --device "$DEVICE" "${NOISE_ARGS[@]}" --json "$OUT/noise.json"

run_step fused_layer 120 env "${LAYER_ENV[@]}" "$PY" bench/fused_layer.py --device "$DEVICE" "${LAYER_ARGS[@]}" \
  --json "$OUT/fused_layer.json"

run_step launches 120 bash -c '"$0" bench/launches.py --json --device "$1" "${@:2}" > "$OUT/launches.json"' \
  "$PY" "$DEVICE" "${LAUNCH_ARGS[@]}"

run_step launches_qlora 120 bash -c '"$0" bench/launches.py --qlora --json --device "$1" "${@:2}" > "$OUT/launches_qlora.json"' \
  "$PY" "$DEVICE" "${LAUNCH_ARGS[@]}"

run_step qlora_fused 90 "$PY" bench/qlora_fused.py --device "$DEVICE" --dtype bfloat16 "${QFUSED_ARGS[@]}" \
  --json "$OUT/qlora_fused.json"

run_step kernel_cost 150 bash -c '"$0" bench/kernel_cost.py --json --scale 64 > "$OUT/kernel_cost.json"' "$PY"

run_step qlora_overhead 150 "$PY" bench/qlora_overhead.py --device "$DEVICE" "${QLORA_ARGS[@]}"

run_step layer 90 "$PY" - <<'PYEOF'
"""Perturb + restore of one LoRA layer: flatlora_dist vs the reference-style dense noise."""
import json, os, statistics, sys, time

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, "bench")
from overhead import ReferenceFlatLoRA  # noqa: E402

from flatlora_dist import FlatLoRA, FlatLoRAConfig  # noqa: E402

dev, dtype = os.environ["DEVICE"], getattr(torch, os.environ["DTYPE"])
rows, cols = (int(v) for v in os.environ["SHAPE"].split("x"))
cuda = dev.startswith("cuda")


def sync():
    if cuda:
        torch.cuda.synchronize()


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(cols, rows, bias=False)).to(dev, dtype)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["0"]))
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.01)
w = model.base_model.model[0].base_layer.weight
orig = w.detach().clone()
flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=10**6, schedule="constant"))
ref = ReferenceFlatLoRA(model, rho=0.05, total_steps=10**6, schedule="constant")


def measure(perturb, restore, reps=5):
    tp, tr, extra = [], [], []
    for i in range(reps + 1):
        sync()
        base = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter(); perturb(i); sync(); t1 = time.perf_counter()
        restore(); sync(); t2 = time.perf_counter()
        if i:  # first call warms up
            tp.append(t1 - t0); tr.append(t2 - t1)
            extra.append(torch.cuda.max_memory_allocated() - base if cuda else None)
    return {"perturb_ms": statistics.median(tp) * 1e3, "restore_ms": statistics.median(tr) * 1e3,
            "peak_extra_bytes": extra[-1]}


res = {"shape": [rows, cols], "dtype": str(dtype), "device": dev, "weight_bytes": w.numel() * w.element_size()}
res["flat"] = measure(lambda i: flat.perturb(i), flat.restore)
res["flat"]["bitwise_restored"] = bool(torch.equal(w, orig))
res["flat"]["fixups"] = flat.stats()["fixups"]
res["flat"]["state_bytes"] = flat.stats()["state_bytes"]
res["reference"] = measure(lambda i: ref.perturb(), ref.restore)
diff = (w.float() - orig.float())
res["reference"]["changed_elements_after_restore"] = int((w != orig).sum())
res["reference"]["max_abs_drift"] = float(diff.abs().max())
with torch.no_grad():
    w.copy_(orig)
g = torch.Generator(device=dev).manual_seed(0)
sync(); t0 = time.perf_counter(); torch.randn(rows * cols, generator=g, device=dev); sync()
res["randn_ms"] = (time.perf_counter() - t0) * 1e3
json.dump(res, open(os.path.join(os.environ["OUT"], "layer.json"), "w"), indent=1)
print(json.dumps(res, indent=1))
assert res["flat"]["bitwise_restored"], "flatlora_dist did not restore the layer bitwise"
PYEOF

run_step overhead 300 "$PY" bench/overhead.py --device "$DEVICE" "${OVERHEAD_ARGS[@]}" --out "$OUT/overhead.json"

{
  echo "{\"device\": \"$DEVICE\", \"out\": \"$OUT\", \"dry_run\": $( ((DRY)) && echo true || echo false ),"
  echo " \"total_seconds\": $(( $(date +%s) - START )), \"failed\": $( ((FAILED)) && echo true || echo false ),"
  echo " \"steps\": ["
  for i in "${!STEPS[@]}"; do
    sep=","; (( i == ${#STEPS[@]} - 1 )) && sep=""
    echo "  ${STEPS[$i]}$sep"
  done
  echo "]}"
} > "$OUT/summary.json"
echo "summary: $OUT/summary.json (total $(( $(date +%s) - START ))s, failed=$FAILED)"
exit $FAILED
