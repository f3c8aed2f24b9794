"""The app's own guards, without training: ``--resume`` refuses to continue with other noise than the
checkpoint's, and the base-weight fingerprint that ``summary.json`` reports sees a single flipped bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from flatlora_dist.checkpoint import base_fingerprint
from flatlora_dist.hf import STATE_FILE
from flatlora_dist.kernels import scheme_for
from flatlora_dist.train.config import parse_args
from flatlora_dist.train.outputs import COMPLETE_MARKER
from flatlora_dist.train.preflight import check_output_dir, check_resume_noise
from flatlora_dist.train.run import main
from flatlora_dist.train.runtime import RunError


def saved_run(tmp_path: Path, state: dict | None = None) -> Path:
    """An output folder holding one complete checkpoint whose Flat-LoRA state is ``state``."""
    out = tmp_path / "run"
    ckpt = out / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / COMPLETE_MARKER).write_text("step 2\n")
    state = state or {}
    config = {"sigma": 0.05, "total_steps": 4, "schedule": "cosine", "seed": 42, "mode": "auto",
              "skip_nonfinite": True, **state.get("config", {})}  # fmt: skip
    saved = {"version": 1, "config": config, "last_step": 1, "noise_scheme": state.get("noise_scheme", scheme_for("cpu"))}
    (ckpt / STATE_FILE).write_text(json.dumps(saved))
    return out


def args(out: Path, *extra: str) -> list[str]:
    return ["--model", "tiny", "--max_steps", "4", "--output_dir", str(out), "--resume", *extra]


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "saved,extra,named",
    [
        ({}, ["--sigma", "0.1"], "sigma: 0.05 -> 0.1"),
        ({}, ["--sigma", "0"], "sigma: 0.05 -> 0.0"),
        ({}, ["--flat_seed", "7"], "flat_seed: 42 -> 7"),
        ({}, ["--seed", "43"], "flat_seed: 42 -> 43"),  # the noise seed defaults to --seed
        ({"config": {"seed": 7}}, ["--seed", "7", "--flat_seed", "8"], "flat_seed: 7 -> 8"),
        ({}, ["--flat_schedule", "constant"], "flat_schedule: 'cosine' -> 'constant'"),
        ({"noise_scheme": "fused"}, [], "noise scheme: 'fused' -> 'blocks'"),
    ],
    ids=["sigma", "sigma_0", "flat_seed", "seed", "flat_seed_over_seed", "schedule", "scheme"],
)
def test_resume_with_other_noise_is_refused_before_anything_loads(tmp_path, capsys, monkeypatch, saved, extra, named):
    out = saved_run(tmp_path, saved)
    before = snapshot(out)

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded before the resume check")

    monkeypatch.setattr("flatlora_dist.train.model.load_model", no_model)
    code = main(args(out, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: --resume would draw other Flat-LoRA noise than checkpoint-2")
    assert named in err[-1], err[-1]
    assert snapshot(out) == before


def test_resume_with_the_same_noise_passes_the_check(tmp_path):
    out = saved_run(tmp_path, {"config": {"seed": 5}})
    for extra in (["--flat_seed", "5"], ["--seed", "5"], ["--flat_seed", "5", "--seed", "9", "--learning_rate", "1"]):
        assert check_output_dir(parse_args(args(out, *extra))) == out / "checkpoint-2"


def test_the_state_the_callback_writes_is_what_the_check_reads(tmp_path):
    from types import SimpleNamespace

    from flatlora_dist.hf import FlatLoRACallback

    out = tmp_path / "run"
    cfg = parse_args(args(out, "--flat_seed", "3", "--sigma", "0.2"))
    cb = FlatLoRACallback(cfg.flat_config())
    cb.on_train_begin(None, SimpleNamespace(max_steps=4), None, model=tiny_llama())
    (out / "checkpoint-2").mkdir(parents=True)
    cb.on_save(SimpleNamespace(output_dir=str(out)), SimpleNamespace(global_step=2, is_world_process_zero=True), None)
    state = json.loads((out / "checkpoint-2" / STATE_FILE).read_text())
    assert state["noise_scheme"] == cb.flat.scheme and state["config"]["seed"] == 3
    check_resume_noise(out / "checkpoint-2", cfg)
    with pytest.raises(RunError, match="flat_seed: 3 -> 4"):
        check_resume_noise(out / "checkpoint-2", parse_args(args(out, "--flat_seed", "4", "--sigma", "0.2")))


def test_unreadable_state_file_is_named(tmp_path, capsys):
    out = saved_run(tmp_path)
    (out / "checkpoint-2" / STATE_FILE).write_text('{"version": 1}')
    assert main(args(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and STATE_FILE in err and "not a Flat-LoRA state file" in err


def test_fingerprint_changes_when_one_base_bit_flips():
    model = tiny_llama()
    before = base_fingerprint(model)
    assert before == base_fingerprint(model)
    w = model.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight
    bits = w.data.view(-1).view(torch.int32)
    k = bits.numel() // 2 + 3
    with torch.no_grad():
        bits[k] ^= 1  # the lowest mantissa bit of one element in the middle of a weight
        assert base_fingerprint(model) != before
        bits[k] ^= 1
        assert base_fingerprint(model) == before
        lora = next(p for n, p in model.named_parameters() if "lora_B" in n)
        lora.view(-1).view(torch.int32)[0] ^= 1
    assert base_fingerprint(model) == before, "trainable parameters are not part of the base fingerprint"


def test_rank0_evaluation_switches_zero3_off_and_back_through_public_calls():
    """The sharded run's rank-0 evaluation loads and generates unsharded, then registers again the very
    DeepSpeed config ``TrainingArguments`` keeps (``args.hf_deepspeed_config``); without DeepSpeed it
    registers nothing."""
    from types import SimpleNamespace

    from transformers.integrations import deepspeed as hf_ds

    from flatlora_dist.train.evaluate import unsharded_loading

    args = SimpleNamespace(hf_deepspeed_config=hf_ds.HfDeepSpeedConfig({"zero_optimization": {"stage": 3}}))
    try:
        assert hf_ds.is_deepspeed_zero3_enabled()
        with unsharded_loading(args):
            assert not hf_ds.is_deepspeed_zero3_enabled()
        assert hf_ds.is_deepspeed_zero3_enabled() and hf_ds.deepspeed_config() is args.hf_deepspeed_config.config
        with pytest.raises(KeyError), unsharded_loading(args):
            raise KeyError("evaluation failed")
        assert hf_ds.is_deepspeed_zero3_enabled()
        with unsharded_loading(SimpleNamespace()):
            pass
        assert not hf_ds.is_deepspeed_zero3_enabled()
    finally:
        hf_ds.unset_hf_deepspeed_config()
