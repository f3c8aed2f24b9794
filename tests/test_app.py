"""launch/train.py end to end on the tiny model: summary, fingerprints, adapters, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatlora_dist.train.run import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--train_limit", "48", "--eval_limit", "8", "--eval_generate_limit", "2",
        "--max_new_tokens", "4", "--per_device_train_batch_size", "4", "--max_length", "384",
        "--report_to", "none", "--logging_steps", "1"]  # fmt: skip


def run_app(tmp_path: Path, *extra: str, out: str = "run") -> tuple[int, Path]:
    out_dir = tmp_path / out
    code = main([*FAST, "--output_dir", str(out_dir), *extra])
    return code, out_dir


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow  # a full training run of the app
@pytest.mark.parametrize("sigma", ["0.05", "0"])
def test_train_writes_summary_with_unchanged_base(tmp_path, sigma):
    code, out = run_app(tmp_path, "--max_steps", "4", "--sigma", sigma)
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 4 and s["sigma"] == float(sigma)
    assert s["base_fingerprint_before"] and s["base_fingerprint_before"] == s["base_fingerprint_after"]
    assert s["base_weights_unchanged"] is True
    assert "eval_loss" in s["metrics_before"] and "eval_loss" in s["metrics_after"]
    assert s["tokens_per_second"] > 0 and s["peak_memory_mb_per_rank"][0] > 0
    if sigma == "0":
        assert s["flatlora"] is None
    else:
        assert s["flatlora"]["layers"] == 14 and s["flatlora"]["factor"] > 0
    assert (out / "curves.png").stat().st_size > 1000
    tensors = adapter_tensors(out)
    assert tensors and all(t.numel() > 0 for t in tensors.values())


@pytest.mark.slow  # a full training run of the app
def test_flat_lora_changes_training_but_not_the_base(tmp_path):
    _, plain = run_app(tmp_path, "--max_steps", "4", "--sigma", "0", "--flat_schedule", "constant", out="plain")
    _, flat = run_app(tmp_path, "--max_steps", "4", "--sigma", "0.5", "--flat_schedule", "constant", out="flat")
    a, b = adapter_tensors(plain), adapter_tensors(flat)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a), "noise must reach the gradients"
    sa = json.loads((plain / "summary.json").read_text())
    sb = json.loads((flat / "summary.json").read_text())
    assert sa["base_fingerprint_before"] == sb["base_fingerprint_after"]


@pytest.mark.slow  # a full training run of the app
def test_output_dir_holding_a_run_is_refused(tmp_path, capsys):
    code, out = run_app(tmp_path, "--max_steps", "1")
    assert code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _ = run_app(tmp_path, "--max_steps", "1")
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    code, _ = run_app(tmp_path, "--max_steps", "1", "--overwrite")
    assert code == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "/nonexistent/train.jsonl"], "not found"),
        (["--ds_config", "/nonexistent/ds.json"], "DeepSpeed config not found"),
        (["--model", "/nonexistent/model"], "nonexistent"),
        (["--lerning_rate", "1e-4"], "did you mean 'learning_rate'"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size"),
        (["--max_steps", "two"], "expects int"),
        (["--task", "poetry"], "task"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, capsys, args, message):
    code, out = run_app(tmp_path, "--max_steps", "1", *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and message in err[-1] and err[-1].startswith("error: ")
    assert not (out / "summary.json").exists()


def test_malformed_ds_config_names_the_line(tmp_path, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 3,}\n}\n')
    code, _ = run_app(tmp_path, "--max_steps", "1", "--ds_config", str(bad))
    assert code == 2 and "line 2" in capsys.readouterr().err


@pytest.mark.slow  # a full training run of the app
def test_yaml_config_with_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 3\nsigma: 0.1\nlora_r: 2\n")
    code, out = run_app(tmp_path, "--config", str(cfg), "--max_steps", "2")
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 2 and s["sigma"] == 0.1
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["lora_r"] == 2


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--model", "tiny", "--bogus_key", "1",
                        "--output_dir", str(tmp_path / "x")], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "unknown key 'bogus_key'" in p.stderr
