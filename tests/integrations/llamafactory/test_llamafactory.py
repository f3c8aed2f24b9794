"""LLaMA-Factory 0.9.5 with Flat-LoRA, through its own config format and our ``train`` command.

Run in the venv ``install.sh`` builds (LLaMA-Factory's pinned stack), never by the main suite:
``FLATLORA_INTEGRATION=llamafactory VENV/bin/python -m pytest tests/integrations/llamafactory``.

The training test writes a tiny random Llama with the project's byte-level tokenizer and a tiny alpaca
dataset (no downloads), runs ``flatlora-llamafactory train cfg.yaml gradient_accumulation_steps=2`` on
CPU for a few steps with LLaMA-Factory's defaults (gradient checkpointing on) and TensorBoard reporting,
and checks, from ``FLATLORA_TRACE`` and the tool's own outputs: noise in every forward (recomputations
included) of every step, one draw per step and a new one each step, the base bitwise unchanged,
``flatlora/*`` in LLaMA-Factory's ``trainer_state.json`` and in TensorBoard, and a saved adapter.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from string import Template

import pytest

pytest.importorskip(
    "llamafactory", reason="needs the LLaMA-Factory venv (tests/integrations/llamafactory/install.sh)"
)

from flatlora_dist.integrations import llamafactory as lf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))
from common import check_noise_trace, check_tensorboard  # noqa: E402

HERE = Path(__file__).resolve().parent
STEPS = 3
GA = 2
CHECKPOINTING_FORWARDS = 2
"""Each micro-batch runs every decoder layer's forward twice: once, then again when gradient checkpointing
(LLaMA-Factory's default) recomputes it for the backward."""


def command() -> list[str]:
    """The ``flatlora-llamafactory`` console script of this venv (pyproject's ``[project.scripts]``)."""
    script = Path(sys.executable).parent / "flatlora-llamafactory"
    assert script.is_file(), (
        f"{script} missing: reinstall the project (tests/integrations/llamafactory/install.sh)"
    )
    return [str(script)]


def write_model(folder: Path) -> Path:
    """The project's tiny random Llama (2 layers, hidden 64) and its byte-level tokenizer, saved."""
    from flatlora_dist.train.model import build_tiny_llama

    model, tok = build_tiny_llama(seed=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_dataset(folder: Path, n: int = 16) -> Path:
    """A tiny alpaca dataset ``tiny_alpaca`` with its ``dataset_info.json`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(n)]
    (folder / "tiny_alpaca.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"tiny_alpaca": {"file_name": "tiny_alpaca.json"}}))
    return folder


def write_config(tmp: Path, **fill: str) -> Path:
    """``cfg.yaml.tmpl`` filled in for a run under ``tmp``."""
    text = Template((HERE / "cfg.yaml.tmpl").read_text()).substitute(
        model=tmp / "model", dataset_dir=tmp / "data", output=tmp / "out", steps=STEPS, **fill
    )
    cfg = tmp / "cfg.yaml"
    cfg.write_text(text)
    return cfg


def run_env(tmp: Path) -> dict[str, str]:
    """Offline, CPU-only, caches under ``tmp``, the noise trace on."""
    env = dict(os.environ)
    env.update(
        FLATLORA_TRACE=str(tmp / "trace.jsonl"),
        CUDA_VISIBLE_DEVICES="",
        HF_HOME=str(tmp / "hf"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="2",
    )
    env.pop("FORCE_TORCHRUN", None)
    return env


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny Flat-LoRA training run through the command line; its folder (output in ``out``)."""
    tmp = tmp_path_factory.mktemp("llamafactory")
    write_model(tmp / "model")
    write_dataset(tmp / "data")
    cfg = write_config(tmp)
    proc = subprocess.run(
        [*command(), "train", str(cfg), f"gradient_accumulation_steps={GA}"],
        env=run_env(tmp), cwd=tmp, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return tmp


def test_noise_in_every_forward_of_every_step(trained):
    """Every forward of a step (GA micro-batches, each run again by checkpointing) saw the same noisy
    weight, a new draw each step, and the base is bitwise the loaded one after training."""
    summary = check_noise_trace(
        trained / "trace.jsonl", steps=STEPS, micro_batches=GA * CHECKPOINTING_FORWARDS
    )
    assert summary["runs"] == 1


def test_flatlora_stats_in_llamafactory_logs(trained):
    """``flatlora/*`` stats reached the Trainer's log history LLaMA-Factory saves, once per logged step."""
    state = json.loads((trained / "out" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert len(logged) == STEPS, state["log_history"]
    for entry in logged:
        assert entry["flatlora/factor"] == 1.0, entry  # constant schedule
        assert entry["flatlora/mean_row_std"] > 0, entry
    assert (trained / "out" / "trainer_log.jsonl").is_file()  # LLaMA-Factory's own log ran alongside


def test_flatlora_stats_in_tensorboard(trained):
    """The callback ran ahead of the TensorBoard reporter, so ``flatlora/*`` scalars were written."""
    check_tensorboard(trained / "out", steps_logged=STEPS)


def test_adapter_saved(trained):
    """A PEFT LoRA adapter (the only thing trained) was saved, with its flatlora_state.json checkpoint."""
    out = trained / "out"
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (out / f"checkpoint-{STEPS}" / "flatlora_state.json").is_file()


@pytest.mark.slow  # two more ranks' worth of imports and training: ~1-2.5 min on 2 loaded cores
def test_two_ranks_through_the_torchrun_relaunch(tmp_path_factory, trained):
    """``FORCE_TORCHRUN=1 NPROC_PER_NODE=2``: the command relaunches itself under torchrun (as
    ``llamafactory-cli train`` does on several GPUs), here two CPU ranks (gloo DDP); each rank's forwards
    see noise at every step, a new draw each step, the base unchanged, and both ranks the same weights."""
    from flatlora_dist.trace import read

    tmp = tmp_path_factory.mktemp("llamafactory_ddp")
    shutil.copytree(trained / "model", tmp / "model")
    shutil.copytree(trained / "data", tmp / "data")
    cfg = write_config(tmp)
    env = run_env(tmp) | {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*command(), "train", str(cfg), f"gradient_accumulation_steps={GA}"],
        env=env, cwd=tmp, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "world size: 2" in proc.stdout + proc.stderr
    seen = []
    for rank in (0, 1):
        path = tmp / f"trace.jsonl.rank{rank}"
        check_noise_trace(path, steps=STEPS, micro_batches=GA * CHECKPOINTING_FORWARDS)
        seen.append({(r["step"], r["module"], r["digest"]) for r in read(path) if r["event"] == "forward"})
    assert seen[0] == seen[1]


# ----------------------------------------------------------------------------- refused configs
@pytest.fixture
def config_file(tmp_path) -> Path:
    """A filled-in config (nothing it names needs to exist: these configs are refused before loading)."""
    return write_config(tmp_path)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("flatlora_sigmaa=0.1", "unknown Flat-LoRA key(s) ['flatlora_sigmaa']"),
        ("flatlora_sigma=-1", "flatlora_sigma: FlatLoRAConfig.sigma must be a finite number >= 0"),
        ("flatlora_sigma=abc", "flatlora_sigma: expected a number, got 'abc'"),
        ("flatlora_schedule=linear", "flatlora_schedule: FlatLoRAConfig.schedule must be one of"),
        (
            "flatlora_total_steps=0",
            "flatlora_total_steps: FlatLoRAConfig.total_steps must be a positive integer",
        ),
        ("flatlora_skip_nonfinite_steps=3", "flatlora_skip_nonfinite_steps: expected true or false"),
        (
            "finetuning_type=full",
            "finetuning_type: 'full': Flat-LoRA trains a LoRA adapter; set finetuning_type: lora",
        ),
        ("use_dora=true", "use_dora: true: DoRA's weight is not W + s*B*A"),
        ("stage=ppo", "stage: 'ppo'"),
    ],
)
def test_bad_config_is_one_clear_error(config_file, capsys, override, needle):
    """A refused key or value exits 2 with one line naming it, before any model is loaded."""
    assert lf.main(["train", str(config_file), override]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err


def test_bad_command_line(tmp_path, capsys):
    """A missing or unreadable file, or a command other than train: one error, exit 2."""
    assert lf.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("stage: [sft\n")
    assert lf.main(["train", str(tmp_path / "broken.yaml")]) == 2
    assert "cannot read the config" in capsys.readouterr().err
    assert lf.main(["export", "cfg.yaml"]) == 2
    assert "usage: flatlora-llamafactory train" in capsys.readouterr().err


def test_split_config_maps_every_key(config_file):
    """Every flatlora_* key reaches FlatLoRAConfig or the callback; LLaMA-Factory sees none of them;
    YAML 1.1's string '5e-2' is read as a number, as HF's parser reads learning rates."""
    cfg = lf.read_config(str(config_file), ["flatlora_sigma=5e-2", "flatlora_total_steps=9", "flatlora_mode=inplace",
                                            "flatlora_skip_nonfinite=false", "flatlora_skip_nonfinite_steps=false"])  # fmt: skip
    args, flat, kwargs = lf.split_config(cfg)
    assert not [k for k in args if k.startswith("flatlora_")]
    assert (flat.sigma, flat.schedule, flat.seed, flat.total_steps, flat.mode, flat.skip_nonfinite) == (
        0.05, "constant", 7, 9, "inplace", False)  # fmt: skip
    assert kwargs == {"skip_nonfinite_steps": False}
    assert args["stage"] == "sft" and args["lora_target"] == "all"


def imported_modules(source: Path) -> list[str]:
    """Every module an ``import`` in ``source`` names (relative ones with their leading dots), and
    ``module.name`` for each ``from module import name``."""
    found = []
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found += [module] + [
                f"{module.rstrip('.')}.{a.name}" if node.module else module + a.name for a in node.names
            ]
    return found


def test_core_package_does_not_import_the_integration():
    """No module of the core package imports ``flatlora_dist.integrations`` or LLaMA-Factory (read from
    the sources: a subprocess importing torch would cost half a minute on a loaded CI core)."""
    package = Path(lf.__file__).resolve().parents[1]
    offenders = []
    for source in package.rglob("*.py"):
        if "integrations" in source.relative_to(package).parts:
            continue
        for name in imported_modules(source):
            ours = name.startswith(("flatlora_dist.integrations", "llamafactory")) or (
                name.startswith(".") and "integrations" in name.lstrip(".").split(".")
            )
            if ours:
                offenders.append(f"{source.relative_to(package)}: {name}")
    assert not offenders, offenders


def test_torchrun_command_reruns_this_module(monkeypatch):
    """Several devices: the relaunch runs this module (not llamafactory-cli's launcher) under torchrun."""
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    monkeypatch.setenv("MASTER_PORT", "29555")
    cmd = lf.torchrun_command(["train", "cfg.yaml", "a=1"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "8"
    assert cmd[-5:] == ["-m", "flatlora_dist.integrations.llamafactory", "train", "cfg.yaml", "a=1"]
