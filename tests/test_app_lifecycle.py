"""A run's life around its training steps (issue 17): nothing half-done before the first step, nothing
redone after the last, epochs when ``--max_steps 0``, strict ``summary.json``, SIGTERM in the final
evaluation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_front_door import folder_hash

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from ds_common import extensions_dir  # noqa: E402

from flatlora_dist.train import trainer as trainer_mod  # noqa: E402
from flatlora_dist.train.report import write_json_atomic  # noqa: E402
from flatlora_dist.train.run import main  # noqa: E402

pytestmark = pytest.mark.slow  # whole (tiny) runs of the app, in and out of process

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--model", "tiny", "--report_to", "none", "--eval_generate_limit", "0", "--eval_limit", "4",
         "--train_limit", "10", "--per_device_train_batch_size", "2"]  # fmt: skip


def previous_run(out: Path) -> None:
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "COMPLETE").write_text("step 2\n")
    (out / "adapter").mkdir()
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"previous adapter")
    (out / "summary.json").write_text('{"previous": true}\n')
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.old").write_bytes(b"old events")


@pytest.mark.parametrize("state", ["absent", "absent, parent too", "previous run, --overwrite",
                                   "incomplete checkpoint, --resume"])
def test_failure_before_the_first_step_leaves_the_folder_as_found(tmp_path, monkeypatch, state):
    """An unexpected error after the folder was prepared (here: in the before-training fingerprint, once the
    Trainer has started TensorBoard) undoes everything: no run_config.json, no tensorboard/, the replaced
    run and the set-aside checkpoint back in place, a folder this run created removed."""
    out = tmp_path / "parent" / "run" if state == "absent, parent too" else tmp_path / "run"
    extra = ["--report_to", "tensorboard"]
    if state.startswith("previous"):
        previous_run(out)
        extra.append("--overwrite")
    elif state.startswith("incomplete"):
        (out / "checkpoint-1").mkdir(parents=True)
        (out / "checkpoint-1" / "partial.bin").write_bytes(b"\0" * 10)
        extra.append("--resume")
    before, parent_before = folder_hash(out), folder_hash(out.parent)

    def failing(model):
        assert (out / "run_config.json").is_file() and (out / "tensorboard").is_dir()
        raise RuntimeError("injected failure before the first step")

    monkeypatch.setattr(trainer_mod, "base_fingerprint", failing)
    with pytest.raises(RuntimeError, match="injected"):
        main([*QUICK, "--max_steps", "2", "--output_dir", str(out), *extra])
    assert folder_hash(out) == before and folder_hash(out.parent) == parent_before


def test_resume_of_a_finished_run_says_so_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*QUICK, "--max_steps", "2", "--save_steps", "1", "--output_dir", str(out)]) == 0
    before = folder_hash(out)
    capsys.readouterr()
    assert main([*QUICK, "--max_steps", "2", "--save_steps", "1", "--output_dir", str(out), "--resume"]) == 0
    printed = capsys.readouterr()
    assert "nothing to do" in printed.out and "finished run" in printed.out and "Traceback" not in printed.err
    assert folder_hash(out) == before, "summary.json and checkpoints untouched"


def test_summary_json_is_strict_json(tmp_path):
    """Non-finite numbers become null at any depth; the file parses without NaN/Infinity extensions."""
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": (2.5, "x"), "e": 3})

    def refuse(constant: str):
        raise AssertionError(f"non-strict JSON constant {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"a": None, "b": [1.0, None, {"c": None}],
                                                                   "d": [2.5, "x"], "e": 3}  # fmt: skip


def expected_epoch_steps(items: int, ranks: int, batch: int, accumulation: int, epochs: int) -> int:
    """Optimizer steps of ``epochs`` epochs: each rank gets ceil(items / ranks) examples (the sampler
    pads), in batches of ``batch``; a window of ``accumulation`` batches, a short last one included."""
    batches = math.ceil(math.ceil(items / ranks) / batch)
    return epochs * math.ceil(batches / accumulation)


def assert_epoch_run(summary: dict, ranks: int, epochs: int = 2) -> None:
    """``steps`` is the real number of optimizer steps of the epochs, and Flat-LoRA's cosine ramp was
    stretched over exactly that many (its factor at the last step is 0.5 (1 - cos(pi (T-1) / T)))."""
    steps = expected_epoch_steps(summary["data"]["train"]["items"], ranks, 2, 2, epochs)
    assert summary["steps"] == steps >= 2
    flat = summary["flatlora"]
    assert flat["step"] == steps - 1
    assert flat["factor"] == pytest.approx(0.5 * (1 - math.cos(math.pi * (steps - 1) / steps)), rel=1e-9)


EPOCHS = ["--max_steps", "0", "--num_train_epochs", "2", "--gradient_accumulation_steps", "2", "--lora_dropout", "0"]


def test_max_steps_0_trains_num_train_epochs(tmp_path):
    out = tmp_path / "run"
    assert main([*QUICK, *EPOCHS, "--output_dir", str(out)]) == 0
    assert_epoch_run(json.loads((out / "summary.json").read_text()), ranks=1)


def _two_ranks(cmd_head: list[str], out: Path, args: list[str], env_extra: dict[str, str]) -> dict:
    """Run the app on 2 ranks under the launcher ``cmd_head`` (``{port}``: a free port), generating for
    the accuracy metrics; its summary."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), **env_extra)
    sys.path.insert(0, str(REPO / "tests" / "dist"))
    from ds_common import free_port

    cmd = [*cmd_head[:1], *[a.format(port=free_port()) for a in cmd_head[1:]], str(REPO / "launch" / "train.py"),
           *QUICK, "--eval_generate_limit", "2", "--max_new_tokens", "4", *args, "--output_dir", str(out)]  # fmt: skip
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    # sharded: accuracy before and after comes from rank 0's unsharded copy (generation on)
    assert "math_accuracy" in summary["metrics_before"] and "math_accuracy" in summary["metrics_after"]
    return summary


@pytest.mark.slow
def test_max_steps_0_same_under_deepspeed_zero3(tmp_path):
    head = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "{port}"]
    env = {"DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0",
           "TORCH_EXTENSIONS_DIR": extensions_dir()}  # fmt: skip
    summary = _two_ranks(head, tmp_path / "ds", [*EPOCHS, "--ds_config", str(REPO / "ds_configs" / "zero3.json")], env)
    assert summary["backend"] == "deepspeed" and summary["world_size"] == 2
    assert_epoch_run(summary, ranks=2)


@pytest.mark.slow
def test_max_steps_0_same_under_fsdp2(tmp_path):
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "{port}"]
    summary = _two_ranks(head, tmp_path / "fsdp", [*EPOCHS, "--fsdp", "fsdp2"], {})
    assert summary["backend"] == "fsdp2" and summary["world_size"] == 2
    assert_epoch_run(summary, ranks=2)


def test_sigterm_during_the_final_evaluation_stops_it_and_keeps_the_adapter(tmp_path):
    """The signal is sent once the app prints "final evaluation:" (after training, with the adapter saved);
    that evaluation has 32 held-out batches of 1 and generation after them, so it is still running when
    the signal lands: the run stops between two batches, exits 143, and leaves the complete adapter and a
    summary.json saying the final evaluation was stopped (so --resume says the run is finished)."""
    out = tmp_path / "run"
    args = ["--model", "tiny", "--report_to", "none", "--max_steps", "2", "--train_limit", "8", "--eval_limit", "32",
            "--per_device_eval_batch_size", "1", "--eval_generate_limit", "16", "--max_new_tokens", "64"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), *args, "--output_dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("final evaluation:"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    log = "".join(seen) + rest
    assert proc.returncode == 143, log[-4000:]
    assert "stopped: SIGTERM during the final evaluation" in log and "Traceback" not in log, log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_evaluation"] == "stopped by SIGTERM" and summary["metrics_after"] is None
    assert summary["steps"] == 2 and summary["metrics_before"]["eval_loss"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    code = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args, "--output_dir", str(out),
                           "--resume"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert code.returncode == 0 and "nothing to do" in code.stdout
