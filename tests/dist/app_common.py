"""Shared by the application reliability tests: running ``main([...])`` in-process, as a subprocess or
under the DeepSpeed launcher (with ``app_inject`` fault injection), reading what runs leave behind,
and a per-session cache of reference runs that several test files compare against.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

DIST = Path(__file__).resolve().parent
ROOT = DIST.parents[1]
sys.path[:0] = [p for p in (str(DIST), str(ROOT)) if p not in sys.path]

import app_inject  # noqa: E402
from ds_common import extensions_dir, free_port, worker_env  # noqa: E402

APP = DIST / "app_run.py"
FAST = ["--model", "tiny", "--train_limit", "48", "--eval_limit", "4", "--eval_generate_limit", "0",
        "--max_length", "384", "--report_to", "none", "--logging_steps", "1"]  # fmt: skip
DS_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
          "TORCH_EXTENSIONS_DIR": extensions_dir(), "DS_BUILD_OPS": "0",
          "PYTHONWARNINGS": "ignore::FutureWarning"}  # fmt: skip


# ------------------------------------------------------------------------------------------ running
_RUNS = iter(range(1_000_000))


def _record_path(out: Path) -> Path:
    """A fresh record file per invocation (a resumed run writes to the same output folder)."""
    return out.parent / f"{out.name}.{next(_RUNS)}.rank{{rank}}.jsonl"


def in_process(out: Path, args: list[str], actions: list[dict] | None = None) -> tuple[int, list[dict]]:
    """``main(FAST + args)`` in this process with injection/recording; (exit code, records).

    One torch thread, like the subprocess runs: on a loaded 2-core machine two spinning OpenMP
    threads make a tiny run several times slower."""
    from flatlora_dist.train.run import main

    out.parent.mkdir(parents=True, exist_ok=True)
    record = _record_path(out)
    hook = app_inject.hook({"record": str(record), "actions": actions or []})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main([*FAST, "--output_dir", str(out), *args], extra_callbacks=[hook])
    finally:
        torch.set_num_threads(threads)
    return code, app_inject.read_records(str(record).format(rank=0))


def subprocess_run(out: Path, args: list[str], actions: list[dict] | None = None, world: int = 1,
                   launcher: bool = False, timeout: float = 300) -> tuple[int, list[list[dict]], str]:  # fmt: skip
    """The app in fresh processes: ``world`` ranks under the DeepSpeed launcher (``launcher``), or one
    plain process (which, with ``--ds_config``, is a 1-rank DeepSpeed run).  (exit code, records per
    rank, everything it printed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    record = _record_path(out)
    spec = {"record": str(record), "actions": actions or []}
    if launcher:
        env = dict(os.environ, **DS_ENV, APP_INJECT=json.dumps(spec))
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        cmd = [str(ROOT / ".venv" / "bin" / "deepspeed"), "--num_gpus", str(world),
               "--master_port", str(free_port()), str(APP)]  # fmt: skip
        if not Path(cmd[0]).exists():
            cmd[0:1] = [sys.executable, "-m", "deepspeed.launcher.runner"]
    else:
        assert world == 1
        env = dict(worker_env(0, 1, free_port()), **DS_ENV, APP_INJECT=json.dumps(spec))
        cmd = [sys.executable, str(APP)]
    cmd += [*FAST, "--output_dir", str(out), *args]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    records = [app_inject.read_records(str(record).format(rank=r)) for r in range(world)]
    return p.returncode, records, p.stdout + p.stderr


# ------------------------------------------------------------------------------------------ reading
def adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def per_step(*runs: list[dict]) -> dict[str, dict]:
    """What happened at each step, from one run or a chain of runs (a later run's record of a step
    replaces an earlier one's: the resumed run redid it).  Keys: ``logs`` (step -> log line),
    ``noise`` (step -> sum of squared noise in the base weights), ``data`` ((step, micro) -> hash)."""
    out: dict[str, dict] = {"logs": {}, "noise": {}, "data": {}}
    for recs in runs:
        for r in recs:
            if r["kind"] == "log" and "loss" in r["logs"]:
                out["logs"][r["step"]] = r["logs"]
            elif r["kind"] == "noise":
                out["noise"][r["step"]] = r["value"]
            elif r["kind"] == "micro":
                out["data"][(r["step"], r["micro"])] = r["data"]
    return out


def assert_same_steps(a: dict[str, dict], b: dict[str, dict], steps, rel: float = 1e-5) -> None:
    """Identical data order, noise schedule (factor), noise actually applied, LR and loss per step."""
    for s in steps:
        la, lb = a["logs"][s + 1], b["logs"][s + 1]  # a step's log line is filed under its end step
        assert la["flatlora/factor"] == lb["flatlora/factor"], (s, la, lb)
        assert la["learning_rate"] == pytest_approx(lb["learning_rate"], 1e-12), (s, la, lb)
        assert la["loss"] == pytest_approx(lb["loss"], rel), (s, la["loss"], lb["loss"])
        assert la["flatlora/mean_row_std"] == pytest_approx(lb["flatlora/mean_row_std"], rel), s
        assert a["noise"][s] == pytest_approx(b["noise"][s], rel), (s, a["noise"][s], b["noise"][s])
    keys = [k for k in b["data"] if k[0] in steps]
    assert keys and all(a["data"].get(k) == b["data"][k] for k in keys), "data order differs"


def pytest_approx(x: float, rel: float):
    import pytest

    return pytest.approx(x, rel=rel, abs=1e-12)


def lora_shapes(adapter_tensors: dict[str, torch.Tensor]) -> set[tuple[int, ...]]:
    return {tuple(t.shape) for t in adapter_tensors.values()}


def _tensors(obj: Any, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from _tensors(vars(obj), prefix)


def checkpoint_float_tensors(ckpt: Path) -> list[tuple[str, torch.Tensor]]:
    """Every floating-point tensor with more than one element stored anywhere in a checkpoint."""
    from safetensors.torch import load_file

    found = []
    for f in sorted(ckpt.rglob("*")):
        if f.suffix == ".safetensors":
            items = load_file(str(f)).items()
        elif f.suffix in (".pt", ".pth", ".bin"):
            items = _tensors(torch.load(f, map_location="cpu", weights_only=False))
        else:
            continue
        found += [(f"{f.relative_to(ckpt)}:{k}", t) for k, t in items
                  if t.is_floating_point() and t.numel() > 1]  # fmt: skip
    return found


# ------------------------------------------------------------------------------------------ cache
_TMP = Path(tempfile.mkdtemp(prefix="flatlora_app_"))
atexit.register(shutil.rmtree, _TMP, True)
_CACHE: dict[str, Any] = {}


def cached(name: str, make) -> Any:
    """One reference run per session, shared by every test file that needs it."""
    if name not in _CACHE:
        _CACHE[name] = make(_TMP / name)
    return _CACHE[name]


# ------------------------------------------------------------------------------------------ references
SINGLE = ["--max_steps", "6", "--save_steps", "2", "--per_device_train_batch_size", "2",
          "--gradient_accumulation_steps", "3"]  # fmt: skip
"""Single process: 6 optimizer steps of 3 micro-batches, checkpoints at 2, 4, 6; LoRA dropout on."""
ZERO3 = ["--ds_config", str(ROOT / "ds_configs" / "zero3.json"), "--max_steps", "6", "--save_steps", "2",
         "--per_device_train_batch_size", "2", "--lora_dropout", "0"]  # fmt: skip
"""2-rank ZeRO-3 (HF auto persistence: base weights partitioned, LoRA factors persistent).  LoRA dropout
off: each rank draws its dropout masks from its own RNG stream, so with dropout a 1-rank run of the
same global batch is a different computation (the single-process resume tests cover dropout)."""
ZERO3_NAN = [{"step": 1, "rank": 1, "do": "nan_loss"}]
"""Every ZeRO-3 run gets a NaN loss on rank 1 at step 1 (its update is skipped: step 2 in the summary)."""


def single_reference() -> dict[str, Any]:
    """Uninterrupted single-process run, with a direct save mid-window (step 1, micro-batch 2) and a
    ``should_save`` raised mid-window (step 2, micro-batch 2: an extra checkpoint-3)."""

    def make(d: Path):
        actions = [{"step": 1, "micro": 2, "do": "save_mid"}, {"step": 2, "micro": 2, "do": "should_save"}]
        code, recs = in_process(d / "run", SINGLE, actions)
        assert code == 0
        return {"out": d / "run", "records": recs}

    return cached("single_reference", make)


def zero3_reference() -> dict[str, Any]:
    """Uninterrupted 2-rank ZeRO-3 run under the DeepSpeed launcher."""

    def make(d: Path):
        code, recs, tail = subprocess_run(d / "run", ZERO3, ZERO3_NAN, world=2, launcher=True)
        assert code == 0, tail[-5000:]
        return {"out": d / "run", "records": recs, "output": tail}

    return cached("zero3_reference", make)
