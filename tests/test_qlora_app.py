"""QLoRA through the application: `launch/train.py --load_in_4bit` trains a tiny 4-bit Llama with Flat-LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flatlora_dist.train.run import main

ZERO3 = str(Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json")


@pytest.mark.slow
def test_load_in_4bit_run_trains_and_keeps_the_quantized_base(tmp_path):
    out = tmp_path / "q"
    code = main(["--model", "tiny", "--load_in_4bit", "--max_steps", "10", "--learning_rate", "3e-3",
                 "--output_dir", str(out), "--train_limit", "16", "--eval_limit", "8", "--eval_generate_limit", "0",
                 "--max_length", "512", "--report_to", "none", "--flat_schedule", "constant", "--sigma", "0.05"])  # fmt: skip
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["flatlora"]["backends"] == "bnb" and s["flatlora"]["mean_row_std"] > 0
    assert s["metrics_after"]["eval_loss"] < s["metrics_before"]["eval_loss"] - 0.05
    assert s["base_weights_unchanged"], "packed 4-bit storage, absmax and quant state must be untouched"


def test_load_in_4bit_with_zero3_is_refused_at_start(tmp_path, capsys):
    code = main(["--model", "tiny", "--load_in_4bit", "--ds_config", ZERO3,
                 "--output_dir", str(tmp_path / "x")])  # fmt: skip
    assert code == 2
    assert "--load_in_4bit with ZeRO-3 or FSDP" in capsys.readouterr().err


def test_load_in_4bit_under_an_accelerate_fsdp_config_is_refused_at_start(tmp_path, capsys, monkeypatch):
    """`accelerate launch --config_file launch/accelerate/fsdp2.yaml` exports FSDP_* instead of passing
    --fsdp: the 4-bit refusal must see it too, before the model is loaded or the folder touched."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    out = tmp_path / "x"
    code = main(["--model", "tiny", "--load_in_4bit", "--output_dir", str(out)])
    assert code == 2
    assert "--load_in_4bit with ZeRO-3 or FSDP" in capsys.readouterr().err
    assert not out.exists()
