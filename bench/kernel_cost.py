"""Static SASS instructions per weight element of the fused kernels, as one LLaMA-7B layer launches them,
measured without a GPU.

    .venv/bin/python bench/kernel_cost.py --json [--scale 64] [--arch 90] [--dtype bfloat16]
    .venv/bin/python bench/kernel_cost.py --variants [--arch 80,90]   # compile every variant the ops can launch

How (``--json``):

1. A child process runs, in the Triton interpreter with the GPU's grids (``FLATLORA_TILES=gpu``), one
   perturb + ``stats()`` + restore of the seven LoRA targets of a LLaMA-7B layer (``launches.layer_model``,
   every dimension divided by ``--scale``, ``--dtype`` weights, after one warm-up step as a run has) and one
   QLoRA layer call (the seven targets as nf4 4-bit, double quantization: every target's noisy weight built
   once, ``noisy_4bit``), recording every launch (``kernels.ops.RECORDER``: kernel, grid, arguments).
2. This process (no interpreter: the GPU's math) compiles each distinct (kernel, argument types,
   constexprs) ahead of time for ``sm_<arch>`` — ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
   arch, 32), options={"enable_fp_fusion": False})`` as the ops launch them, no alignment specialization —
   and counts the instructions of the cubin with Triton's own ``cuobjdump -sass`` (NOPs excluded; straight-line
   code counts exactly, untaken slow paths count in full).
3. Per kernel: the sum over its launches of instructions x programs x warps x 32 threads, divided by the
   weight elements of the layer; a loop's body (found from the backward branch in the SASS) counts once
   per trip, so ``row_sumsq`` at 1/16 of the layer costs what it executes.  Prints one JSON line ``{"dense": {"per_element": N, "kernels": {...}},
   "qlora_layer_call": {"per_element": M, "kernels": {...}}, ...}``.

``--variants`` compiles every kernel variant the ops can launch (``variants()``) for each ``--arch`` and
fails (exit 1) when one does not build: a kernel only the interpreter accepts fails here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from itertools import product
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

_DTYPES = {"int8": "i8", "uint8": "u8", "int16": "i16", "int32": "i32", "int64": "i64", "float32": "fp32",
           "float16": "fp16", "bfloat16": "bf16"}


# ---------------------------------------------------------------------------------------- recording (child)
def _arg_type(v) -> str | int:
    """The Triton signature type of a launch argument, specialized as a launch is: ints equal to 1 become
    constants, pointers aligned to 16 bytes and ints divisible by 16 get ``:16`` (``tt.divisibility``)."""
    if hasattr(v, "dtype") and hasattr(v, "data_ptr"):
        return "*" + _DTYPES[str(v.dtype).removeprefix("torch.")] + (":16" if v.data_ptr() % 16 == 0 else "")
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        if v == 1:
            return 1
        t = "i32" if -(2**31) <= v < 2**31 else ("i64" if v < 2**63 else "u64")
        return t + (":16" if v % 16 == 0 else "")
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unexpected launch argument {v!r}")


def _record(scale: int, dtype: str) -> dict:
    """Run the layer in the interpreter; return the recorded launches of each part and its elements."""
    import torch
    from launches import LLAMA7B, RANK, _Targets4bit, layer_model

    from flatlora_dist import FlatLoRA, FlatLoRAConfig, functional
    from flatlora_dist.kernels import ops

    out = {}
    model = layer_model(scale, getattr(torch, dtype))
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=10, schedule="constant", seed=1))
    flat.perturb(0)
    flat.restore()
    ops.RECORDER = []
    flat.perturb(1)
    flat.stats()
    flat.restore()
    out["dense"] = _launches(ops.RECORDER, sum(t.layout.numel for t in flat.targets))
    out["dense"]["fixups"] = flat.stats()["fixups"]

    from peft import LoraConfig, get_peft_model

    shapes = {k: (o // scale, i // scale) for k, (o, i) in LLAMA7B.items()}
    base = _Targets4bit(shapes, torch.bfloat16).to("cpu")  # quantizes
    q = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(shapes)))
    qflat = FlatLoRA(q, FlatLoRAConfig(sigma=0.05, total_steps=10, schedule="constant", seed=1))
    qflat.perturb(1)
    ops.RECORDER = []
    for t in qflat.targets:
        functional.noisy_weight(qflat.backend_of(t), t, qflat.noise_key(t), torch.bfloat16)
    qflat.restore()
    out["qlora_layer_call"] = _launches(ops.RECORDER, sum(t.layout.numel for t in qflat.targets))
    ops.RECORDER = None
    return out


def _trips(a: dict) -> int:
    """Trips of a kernel's loop for one launch's arguments (only ``row_sumsq_kernel`` has one)."""
    if "BK" in a:
        return max(1, -(-(a["i_hi"] - a["i_lo"]) // a["BK"]))
    return 1


def _launches(rec: list, elements: int) -> dict:
    launches = []
    for kernel, grid, args, meta in rec:
        sig = dict(zip(kernel.arg_names, [_arg_type(a) for a in args] + [("constexpr", v) for v in meta.values()]))
        launches.append({"kernel": kernel.__name__, "grid": grid, "signature": sig,
                         "trips": _trips(dict(zip(kernel.arg_names, list(args) + list(meta.values()))))})
    return {"elements": elements, "launches": launches}


# ---------------------------------------------------------------------------------------- compiling
def sass_count(kernel_name: str, signature: dict, arch: int) -> tuple[int, int, int]:
    """``(instructions, warps, loop body)`` of one variant compiled for ``sm_<arch>`` (NOPs excluded; the
    loop body: instructions between a backward branch and its target, 0 without one)."""
    import triton
    import triton.backends.nvidia as nv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flatlora_dist.kernels import triton_kernels as K

    fn = getattr(K, kernel_name)
    types, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):  # in the kernel's order
        t = signature[name]
        if isinstance(t, (list, tuple)):  # ("constexpr", value)
            types[name], consts[name] = "constexpr", t[1]
        elif isinstance(t, int):  # an int specialized to its value
            types[name], consts[name] = "constexpr", t
        else:
            types[name], _, div = t.partition(":")
            if div:
                attrs[(i,)] = [["tt.divisibility", int(div)]]
    c = triton.compile(ASTSource(fn=fn, signature=types, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False})
    tool = Path(nv.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ins = []  # (address, text) of every instruction but NOPs
    for ln in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", ln)
        if m and "NOP" not in m.group(2):
            ins.append((int(m.group(1), 16), m.group(2)))
    body = 0
    for at, text in ins:
        b = re.search(r"\bBRA\s+(?:`\()?0x([0-9a-f]+)", text)
        if b and int(b.group(1), 16) < at:  # a loop's back edge (not the final self-loop: target == at)
            body = max(body, sum(1 for a, _ in ins if int(b.group(1), 16) <= a <= at))
    return len(ins), c.metadata.num_warps, body


def _key(launch: dict) -> str:
    return json.dumps([launch["kernel"], launch["signature"]], sort_keys=True)


def _compile_all(keys: list[str], arch: int, jobs: int) -> dict[str, tuple[int, int, int]]:
    """``sass_count`` of every distinct variant (in ``jobs`` processes)."""
    args = [(json.loads(k)[0], json.loads(k)[1], arch) for k in keys]
    if jobs <= 1:
        return {k: sass_count(*a) for k, a in zip(keys, args)}
    with ProcessPoolExecutor(jobs) as pool:
        return dict(zip(keys, pool.map(_count_star, args)))


def _count_star(a: tuple) -> tuple[int, int, int]:
    return sass_count(*a)


def cost(part: dict, counts: dict[str, tuple[int, int, int]]) -> dict:
    """Per kernel and in total: instructions executed per thread x threads launched / weight elements, with
    a loop's body counted once per trip (``row_sumsq``: ``ceil((i_hi - i_lo) / BK)``); straight-line code
    counts exactly, untaken branches in full."""
    per = defaultdict(float)
    launches = defaultdict(int)
    ins = {}
    for ln in part["launches"]:
        n, warps, body = counts[_key(ln)]
        n += body * (ln["trips"] - 1)
        per[ln["kernel"]] += n * ln["grid"] * warps * 32 / part["elements"]
        launches[ln["kernel"]] += 1
        ins[ln["kernel"]] = max(ins.get(ln["kernel"], 0), n)
    return {"per_element": round(sum(per.values()), 1), "kernels": {k: round(v, 1) for k, v in per.items()},
            "launches": dict(launches), "max_static_instructions": ins, "elements": part["elements"]}


def measure(scale: int, arch: int, dtype: str, jobs: int = 1, recorder: str = sys.executable) -> dict:
    """Record in a child interpreter process (``recorder``: its Python), compile here; the JSON summary."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "FLATLORA_TILES": "gpu", "FLATLORA_KERNELS": "fused",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = f"import json, kernel_cost; print(json.dumps(kernel_cost._record({scale}, {dtype!r})))"
    p = subprocess.run([recorder, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT / "bench")
    if p.returncode:
        raise RuntimeError(f"recording failed:\n{p.stderr[-4000:]}")
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    keys = sorted({_key(ln) for part in rec.values() for ln in part["launches"]})
    counts = _compile_all(keys, arch, jobs)
    out = {part: cost(rec[part], counts) for part in ("dense", "qlora_layer_call")}
    out["dense"]["fixups"] = rec["dense"]["fixups"]
    import triton

    out.update(arch=f"sm_{arch}", scale=scale, dtype=dtype, variants=len(keys), triton=triton.__version__)
    return out


# ---------------------------------------------------------------------------------------- every variant
def variants() -> list[tuple[str, dict]]:
    """Every (kernel, signature) the ops can launch: each constexpr combination with the argument types the
    wrappers pass (ints at their widest; ``row_sumsq`` at ranks up to 64; no alignment specialization),
    and each kernel with all its integer arguments specialized to the constant 1."""
    from flatlora_dist.kernels.ops import GPU_TILES

    c = lambda v: ("constexpr", v)  # noqa: E731
    dt = {0: "*i32", 1: "*i16", 2: "*i16"}
    blk = c(GPU_TILES.block)
    out = [("noise_kernel", dict(out_ptr="*fp32", n="i32", c0="i64", s3="i32", seed="i64", QUAD=c(q), BLOCK=blk))
           for q in (False, True)]
    for kind, axis, quad in product((0, 1, 2), (0, 1), (False, True)):
        b = dt[kind]
        place = dict(cols="i32", inv_cols="fp32", seed="i64")
        meta = dict(OUT_AXIS=c(axis), KIND=c(kind), QUAD=c(quad), BLOCK=blk)
        for it in ("*i32", "*i64"):
            out.append(("write_kernel", dict(
                w_ptr=b, std_ptr="*fp32", go_ptr="*i64", ctr_ptr="*i64", done_ptr="*i8", idx_ptr=it, xor_ptr="*i16",
                fidx_ptr=it, fval_ptr=b, n="i32", start="i64", c0="i64", s3="i32", row_s="i32", col_s="i32", **place,
                skip_lo="i32",
                skip_hi="i32", cap_n="i32", cap_w="i32", redo="i32", **meta)))
        out.append(("restore_kernel", dict(w_ptr=b, std_ptr="*fp32", n="i32", c0="i64", s3="i32", row_s="i32",
                                           col_s="i32", **place, **meta)))
        out.append(("noisy_kernel", dict(w_ptr=b, out_ptr=b, std_ptr="*fp32", n="i32", **place, **meta)))
    for kind, it in product((0, 1, 2), ("*i32", "*i64")):
        out.append(("fixup_kernel", dict(w_ptr=dt[kind], idx_ptr=it, xor_ptr="*i16", fidx_ptr=it, fval_ptr=dt[kind],
                                         n_narrow="i32", n_wide="i32", start="i64", stop="i64", KIND=c(kind),
                                         BLOCK=c(GPU_TILES.fixup_block))))
    for kind, (has_ab, rp) in product((0, 1, 2), ((False, 16), (True, 16), (True, 32), (True, 64))):
        out.append(("row_sumsq_kernel", dict(
            w_ptr=dt[kind], a_ptr="*fp32", b_ptr="*fp32", acc_ptr="*fp32", s="fp32", n="i32", off0="i32",
            n_out="i32", n_in="i32", o_lo="i32", i_lo="i32", i_hi="i32", r="i32", so="i32", si="i32",
            KIND=c(kind), HAS_AB=c(has_ab), RP=c(rp), BM=c(GPU_TILES.norm_bm), BK=c(GPU_TILES.norm_bk))))
    for nested, qkind, kind, noise, quad in product((False, True), (0, 1, 2), (0, 1, 2), (False, True),
                                                    (False, True)):
        out.append(("noisy_4bit_kernel", dict(
            data_ptr="*u8", absmax_ptr="*u8" if nested else "*fp32", absmax2_ptr="*fp32", code_ptr="*fp32",
            code2_ptr="*fp32", offset_ptr="*fp32", std_ptr="*fp32", out_ptr=dt[kind], n="i32", cols="i32",
            inv_cols="fp32", seed="i64", bs_shift="i32", bs2_shift="i32", NESTED=c(nested), QKIND=c(qkind),
            KIND=c(kind), NOISE=c(noise), QUAD=c(quad), BLOCK=blk)))
    firsts = {}
    for k, sig in out:  # each kernel once more with every integer equal to 1 (a launch makes those constants)
        firsts.setdefault(k, {n: 1 if t in ("i32", "i64") else t for n, t in sig.items()})
    return out + list(firsts.items())


def compile_variants(archs: list[int], jobs: int) -> dict:
    """Compile ``variants()`` for every arch; ``{"arch": {"built": n, "failed": [...]}}``."""
    res = {}
    for arch in archs:
        failed = []
        args = [(k, s, arch) for k, s in variants()]
        with ProcessPoolExecutor(max(jobs, 1)) as pool:
            futs = [pool.submit(_count_star, a) for a in args]
            for (k, s, _), f in zip(args, futs):
                try:
                    f.result()
                except Exception as e:  # noqa: BLE001 - reported, and the exit code says it
                    failed.append(f"{k} {json.dumps(s)}: {type(e).__name__}: {str(e)[:300]}")
        res[f"sm_{arch}"] = {"built": len(args) - len(failed), "failed": failed}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument("--scale", type=int, default=64, help="divide the 7B shapes by this")
    ap.add_argument("--arch", default="90", help="compute capability (comma-separated for --variants)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    ap.add_argument("--variants", action="store_true", help="compile every variant the ops can launch")
    ap.add_argument("--record-python", default=sys.executable,
                    help="the Python that records the launches (with peft and bitsandbytes; default: this one)")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the kernels are compiled for the GPU here")
    archs = [int(a) for a in args.arch.split(",")]
    if args.variants:
        res = compile_variants(archs, args.jobs)
        print(json.dumps(res))
        sys.exit(1 if any(r["failed"] for r in res.values()) else 0)
    res = measure(args.scale, archs[0], args.dtype, args.jobs, args.record_python)
    if not args.json:
        for part in ("dense", "qlora_layer_call"):
            print(f"{part}: {res[part]['per_element']} SASS instructions per element "
                  f"({', '.join(f'{k} {v}' for k, v in res[part]['kernels'].items())})")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
