"""The front door (issue 17): bad input through ``launch/train.py``, as a new user types it.

Each case runs the real entry point in a subprocess and must end with exit code 2, exactly one line
starting with ``error:`` (naming the problem), no ``Traceback`` anywhere, and the output folder exactly
as it was (sha256 of every name and file below it, or "absent"): absent, holding an unrelated file, or
holding a previous run that ``--overwrite`` was asked to replace.  Cases caught by the preflight never
load a model; the ``--lora_target_modules`` and tokenization cases load ``--model tiny``.  The cases
run two at a time (the CI machine has 2 cores) from one module fixture.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # dozens of launch/train.py subprocesses: the full suite, not the fast tier

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
QUICK = ["--model", "tiny", "--max_steps", "3", "--report_to", "none", "--eval_generate_limit", "0",
         "--eval_limit", "4", "--train_limit", "8"]  # fmt: skip


@dataclass
class Case:
    """``args`` (``{tmp}`` is replaced by the case's folder) run against an output folder that is
    ``absent``, holds an unrelated ``file``, or holds a previous ``run`` (then ``--overwrite`` is
    passed); ``expect`` is a piece of the one error line."""

    name: str
    args: list[str]
    expect: str
    folder: str = "absent"
    output_dir: str | None = None  # default: {tmp}/out


def _flash_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


CASES = [
    # settings: names, types, ranges (TrainConfig.validate; the Flat-LoRA rules are FlatLoRAConfig's)
    Case("unknown key", ["--bogus_key", "1"], "unknown key 'bogus_key'"),
    Case("misspelled key", ["--lerning_rate", "1e-4"], "did you mean 'learning_rate'", "file"),
    Case("not an int", ["--max_steps", "two"], "'max_steps' expects int"),
    Case("batch size 0", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be > 0", "run"),
    Case("flat_schedule linear", ["--flat_schedule", "linear"], "--flat_schedule must be one of", "file"),
    Case("flat_seed -1", ["--flat_seed", "-1"], "--flat_seed must be an integer >= 0"),
    Case("sigma inf", ["--sigma", "inf"], "--sigma must be a finite number", "run"),
    Case("sigma nan", ["--sigma", "nan"], "--sigma must be a finite number"),
    Case("sigma negative", ["--sigma", "-0.1"], "--sigma must be a finite number >= 0", "file"),
    Case("flat_mode", ["--flat_mode", "fast"], "--flat_mode must be one of"),
    Case("learning_rate nan", ["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    Case("lora_dropout 1", ["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)", "file"),
    Case("warmup_ratio 1.5", ["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1)"),
    Case("no steps, no epochs", ["--max_steps", "0", "--num_train_epochs", "0"], "--num_train_epochs > 0"),
    Case("bf16 and fp16", ["--bf16", "--fp16"], "--bf16 and --fp16 are exclusive"),
    Case("overwrite and resume", ["--overwrite", "--resume"], "contradict each other", "file"),
    Case("max_length 1", ["--max_length", "1"], "--max_length must be >= 2"),
    Case("empty target list", ["--lora_target_modules", ","], "--lora_target_modules is empty"),
    Case("data_format sharegpt, alpaca file", ["--data", "{tmp}/ok.jsonl", "--data_format", "sharegpt"],
         "looks like alpaca (keys: 'instruction', 'output'): use --data_format alpaca or auto", "run"),  # fmt: skip
    Case("data_format openai", ["--data", "{tmp}/ok.jsonl", "--data_format", "openai"], "--data_format must be one of"),
    Case("val_size leaves nothing to train", ["--data", "{tmp}/ok.jsonl", "--val_size", "4"],
         "--val_size 4 leaves no record to train on (4 of 4", "file"),  # fmt: skip
    Case("data_format chat, alpaca file", ["--data", "{tmp}/ok.jsonl", "--data_format", "chat"],
         "--data_format chat, but", "file"),  # fmt: skip
    Case("fsdp3", ["--fsdp", "fsdp3"], "--fsdp must be 'fsdp1', 'fsdp2' or 'hsdp'"),
    Case("report_to wandb", ["--report_to", "wandb"], "pip install wandb"),
    Case("eval_steps without eval data", ["--data", "{tmp}/ok.jsonl", "--eval_steps", "2"], "needs held-out data"),
    # config files
    Case("config not found", ["--config", "{tmp}/nope.yaml"], "config file not found"),
    Case("bad YAML", ["--config", "{tmp}/bad.yaml"], "is not valid YAML", "file"),
    Case("YAML list", ["--config", "{tmp}/list.yaml"], "expected a mapping of settings"),
    Case("YAML unknown key", ["--config", "{tmp}/typo.yaml"], "unknown key 'sigmma'; did you mean 'sigma'"),
    # files the run reads
    Case("data not found", ["--data", "{tmp}/missing.jsonl"], "--data file not found"),
    Case("bad JSONL", ["--data", "{tmp}/bad.jsonl"], "bad.jsonl:2: malformed JSON", "run"),
    Case("record missing output", ["--data", "{tmp}/nooutput.jsonl"], "nooutput.jsonl:1: record missing", "file"),
    Case("JSON object holding the records", ["--data", "{tmp}/wrapped.json"], "holding the records under 'data'", "run"),
    Case("ds_config not found", ["--ds_config", "{tmp}/ds.json"], "DeepSpeed config not found"),
    Case("ds_config bad JSON", ["--ds_config", "{tmp}/bad_ds.json"], "invalid JSON at line 2"),
    Case("model folder missing", ["--model", "{tmp}/no_model"], "does not exist", "file"),
    Case("model config.json not JSON", ["--model", "{tmp}/model_badjson"], "config.json is not valid JSON", "run"),
    Case("model without safetensors", ["--model", "{tmp}/model_nosafetensors"], "no *.safetensors"),
    # combinations
    Case("4-bit with FSDP", ["--load_in_4bit", "--fsdp", "fsdp2"], "--load_in_4bit with ZeRO-3 or FSDP", "file"),
    Case("4-bit with ZeRO-3", ["--load_in_4bit", "--ds_config", str(REPO / "ds_configs" / "zero3.json")],
         "--load_in_4bit with ZeRO-3 or FSDP"),  # fmt: skip
    Case("merge with FSDP", ["--merge", "--fsdp", "fsdp2"], "--merge writes a merged model from a single process"),
    Case("task poetry", ["--task", "poetry"], "--task must be 'math' or 'sentiment'"),
    # output folder
    Case("output_dir under a file", [], "is a file, not a folder", output_dir="{tmp}/a_file/out"),
    Case("output_dir is a file", [], "exists and is not a folder", output_dir="{tmp}/a_file"),
    Case("output_dir unwritable", [], "cannot create files in", output_dir="{unwritable}/out"),
    Case("output_dir holds a run", ["--max_steps", "3"], "already holds a run; pass --resume", "run_no_overwrite"),
    Case("resume with changed settings", ["--resume", "--lora_r", "4"], "--resume with changed settings", "resumable"),
    # names only transformers knows (preflight imports transformers, loads no model)
    Case("scheduler cosine_annealing", ["--lr_scheduler_type", "cosine_annealing"], "not a transformers scheduler"),
    Case("scheduler needing kwargs", ["--lr_scheduler_type", "cosine_with_min_lr"], "needs scheduler settings", "file"),
    Case("plateau without eval", ["--lr_scheduler_type", "reduce_lr_on_plateau"], "set --eval_steps N"),
    Case("attention flash3", ["--attn_implementation", "flash3"], "is not one transformers accepts", "run"),
    # needs the model (tiny) or its tokenizer: checked after loading, before the folder is touched
    Case("target foo_proj", ["--lora_target_modules", "foo_proj"], "its linear layers are: down_proj", "run"),
    Case("target partly wrong", ["--lora_target_modules", "q_proj,nonexistent_proj"],
         "nonexistent_proj match(es) no module", "file"),  # fmt: skip
    Case("target not a layer", ["--lora_target_modules", "mlp"], "LoRA cannot wrap"),
    Case("empty after filtering", ["--data", "{tmp}/long.jsonl", "--max_length", "16"],
         "empty dataset after filtering", "run"),  # fmt: skip
]
if not _flash_usable():
    CASES.append(Case("flash_attention_2 here", ["--attn_implementation", "flash_attention_2"],
                      "needs CUDA and its flash-attention package", "file"))  # fmt: skip


def _write_inputs(tmp: Path) -> None:
    """The files the cases name (each case has its own copy, so concurrent runs cannot interfere)."""
    ok = [{"instruction": f"Add {i} and 1.", "output": f"{i + 1}"} for i in range(4)]
    (tmp / "ok.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ok))
    (tmp / "bad.jsonl").write_text(json.dumps(ok[0]) + '\n{"instruction": "x", "output": \n')
    (tmp / "nooutput.jsonl").write_text('{"instruction": "x"}\n')
    (tmp / "wrapped.json").write_text(json.dumps({"version": 1, "data": ok}, indent=2))
    (tmp / "long.jsonl").write_text(json.dumps({"instruction": "x " * 200, "output": "y"}) + "\n")
    (tmp / "bad.yaml").write_text("sigma: [0.05,\n")
    (tmp / "list.yaml").write_text("- sigma\n- 0.05\n")
    (tmp / "typo.yaml").write_text("sigmma: 0.1\n")
    (tmp / "bad_ds.json").write_text('{\n  "zero_optimization": {"stage": 3,}\n}\n')
    (tmp / "a_file").write_text("not a folder\n")
    for name, config in (("model_badjson", "{not json"), ("model_nosafetensors", '{"model_type": "llama"}')):
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(config)
    (tmp / "model_badjson" / "model.safetensors").write_bytes(b"\0" * 8)


def _fill_folder(out: Path, kind: str) -> list[str]:
    """Put the case's output folder in its starting state; extra arguments that state needs."""
    if kind == "absent":
        return []
    out.mkdir(parents=True)
    if kind == "file":
        (out / "notes.txt").write_text("the user's own file\n")
        return []
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"previous adapter")
    (out / "summary.json").write_text('{"previous": true}\n')
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "COMPLETE").write_text("step 2\n")
    if kind == "resumable":
        (out / "summary.json").unlink()
        (out / "run_config.json").write_text(json.dumps({"lora_r": 8, "model": "tiny"}))
        return []
    return [] if kind == "run_no_overwrite" else ["--overwrite"]


def folder_hash(folder: Path) -> str:
    """sha256 over every path below ``folder`` and every file's bytes; "absent" if there is no folder."""
    if not folder.exists():
        return "absent"
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _unwritable(tmp: Path) -> Path:
    """A folder this process cannot create files in: /proc for root (permission bits do not stop root),
    else a folder without write permission."""
    if os.geteuid() == 0:
        return Path("/proc")
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return locked


def _run_case(case: Case, tmp: Path) -> dict:
    tmp.mkdir(parents=True)
    _write_inputs(tmp)
    out = Path((case.output_dir or "{tmp}/out").format(tmp=tmp, unwritable=_unwritable(tmp)))
    extra = _fill_folder(out, case.folder)
    before = folder_hash(out)
    args = [a.format(tmp=tmp) for a in case.args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, str(TRAIN), *QUICK, "--output_dir", str(out), *extra, *args],
                       capture_output=True, text=True, env=env, cwd=tmp, timeout=300)  # fmt: skip
    return {"code": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "before": before, "after": folder_hash(out)}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("front_door")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.name: pool.submit(_run_case, c, base / f"case{i}") for i, c in enumerate(CASES)}
        return {name: f.result() for name, f in futures.items()}


def test_table_has_at_least_30_inputs():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_one_error_line_exit_2_folder_unchanged(results, case):
    r = results[case.name]
    both = r["stdout"] + r["stderr"]
    errors = [line for line in both.splitlines() if line.startswith("error:")]
    assert r["code"] == 2, both[-3000:]
    assert len(errors) == 1, both[-3000:]
    assert case.expect in errors[0], errors[0]
    assert "Traceback" not in both, both[-3000:]
    assert r["after"] == r["before"], f"output folder changed ({case.folder})"
