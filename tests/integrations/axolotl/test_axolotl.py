"""The axolotl plugin against the real tool (axolotl 0.21, its own pinned stack; no downloads).

Run inside the venv ``tests/integrations/axolotl/install.sh`` builds:
``FLATLORA_INTEGRATION=axolotl VENV/bin/python -m pytest tests/integrations/axolotl``.

``test_train_cli`` trains a tiny random Llama for a few steps with ``axolotl train cfg.yml`` (axolotl's own
CLI, CPU, gradient accumulation 2) and checks, from the ``FLATLORA_TRACE`` record and the run's logs: noise
in every forward of every step, a new draw each step, the base bitwise unchanged, ``flatlora/*`` in the
Trainer's log history, axolotl's console output and TensorBoard.  The other tests load configs through
axolotl's own ``load_cfg`` (plugin registration and pydantic validation, no training).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from string import Template
from typing import Any

import pytest
import yaml

from flatlora_dist.config import FlatLoRAConfig

sys.path.insert(0, str(Path(__file__).parents[1]))
from common import check_noise_trace, check_tensorboard  # noqa: E402

OFFLINE = {
    "AXOLOTL_DO_NOT_TRACK": "1",  # axolotl's telemetry (posthog) retries for minutes without a network
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
"""For this process (the ``load_cfg`` tests) and the ``axolotl`` one; set before axolotl is imported."""
os.environ.update(OFFLINE)
pytest.importorskip("axolotl", reason="needs the axolotl venv (tests/integrations/axolotl/install.sh)")

HERE = Path(__file__).parent
STEPS = 3
MICRO_BATCHES = 2  # gradient_accumulation_steps with micro_batch_size 1: forwards per module and step


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the project's byte-level tokenizer, and a 16-row alpaca JSONL."""
    from flatlora_dist.train.model import build_tiny_llama

    root = tmp_path_factory.mktemp("axolotl")
    model, tok = build_tiny_llama(seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = [
        {"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(16)
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def render(root: Path, out: Path) -> dict[str, Any]:
    """The YAML template filled in for a run writing into ``out``, as a dict."""
    text = Template((HERE / "cfg.yml.tmpl").read_text()).substitute(
        model=root / "model",
        data=root / "data.jsonl",
        prepared=out / "prepared",
        steps=STEPS,
        output=out / "run",
    )
    return yaml.safe_load(text)


def tool_env(trace: Path, home: Path) -> dict[str, str]:
    """The environment of the ``axolotl`` process: the venv's bin on PATH, offline, CPU, no telemetry."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # set by tests/conftest.py for CPU
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        FLATLORA_TRACE=str(trace),
        HF_HOME=str(home),
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="2",
        **OFFLINE,
    )
    return env


def test_train_cli(fixture_dir: Path, tmp_path: Path) -> None:
    cfg_path = tmp_path / "cfg.yml"
    cfg_path.write_text(yaml.safe_dump(render(fixture_dir, tmp_path)))
    trace = tmp_path / "trace.jsonl"
    proc = subprocess.run(["axolotl", "train", str(cfg_path)], cwd=tmp_path, env=tool_env(trace, tmp_path / "hf"),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "Flat-LoRA attached" in output, output[-6000:]

    check_noise_trace(trace, steps=STEPS, micro_batches=MICRO_BATCHES)

    ckpt = tmp_path / "run" / f"checkpoint-{STEPS}"
    history = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h]
    assert len(logged) == STEPS and all(
        "flatlora/factor" in h and h["flatlora/factor"] == 1.0 for h in logged
    ), logged
    assert (ckpt / "flatlora_state.json").is_file()
    assert "'flatlora/factor'" in output or '"flatlora/factor"' in output, (
        "flatlora/* not in axolotl's log output"
    )
    check_tensorboard(tmp_path / "run", steps_logged=STEPS)


# ------------------------------------------------------------------ config checks through axolotl's load_cfg
def load(fixture_dir: Path, tmp_path: Path, **overrides: Any):
    """axolotl's ``load_cfg`` (plugin registration + validation) on the template with ``overrides``
    (a ``None`` value removes the key)."""
    from axolotl.cli.config import load_cfg
    from axolotl.utils.dict import DictDefault

    cfg = render(fixture_dir, tmp_path)
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return load_cfg(DictDefault(cfg))


def test_keys_map_every_config_field() -> None:
    from flatlora_dist.integrations.axolotl import CONFIG_KEYS, FlatLoRAArgs

    assert set(CONFIG_KEYS.values()) == {f.name for f in fields(FlatLoRAConfig)}
    assert set(FlatLoRAArgs.model_fields) == set(CONFIG_KEYS) | {"flatlora_skip_nonfinite_steps"}


def test_config_values_reach_flat_config(fixture_dir: Path, tmp_path: Path) -> None:
    from flatlora_dist.integrations.axolotl import flat_config

    cfg = load(fixture_dir, tmp_path, flatlora_sigma=0.1, flatlora_total_steps=50, flatlora_mode="functional")
    assert flat_config(cfg) == FlatLoRAConfig(
        sigma=0.1, total_steps=50, schedule="constant", seed=7, mode="functional"
    )


@pytest.mark.parametrize(
    "key,value",
    [("flatlora_sigma", -0.1), ("flatlora_sigma", True), ("flatlora_schedule", "linear"), ("flatlora_mode", "fast"),
     ("flatlora_total_steps", 0), ("flatlora_seed", -1)],
)  # fmt: skip
def test_bad_value_names_its_key(fixture_dir: Path, tmp_path: Path, key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=key):
        load(fixture_dir, tmp_path, **{key: value})


@pytest.mark.parametrize("adapter", [None, "llama-adapter"])
def test_refuses_other_adapters(fixture_dir: Path, tmp_path: Path, adapter: str | None) -> None:
    with pytest.raises(ValueError, match="set `adapter: lora`"):
        load(fixture_dir, tmp_path, adapter=adapter)


def test_refuses_dora(fixture_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`peft_use_dora: false`"):
        load(fixture_dir, tmp_path, peft_use_dora=True)


def test_refuses_fused_kernels(fixture_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`lora_qkv_kernel: false`"):
        load(fixture_dir, tmp_path, lora_qkv_kernel=True)


def test_unset_fused_kernels_switched_off(fixture_dir: Path, tmp_path: Path) -> None:
    cfg = load(fixture_dir, tmp_path, lora_mlp_kernel=None, lora_qkv_kernel=None, lora_o_kernel=None)
    assert (cfg.lora_mlp_kernel, cfg.lora_qkv_kernel, cfg.lora_o_kernel) == (False, False, False)
