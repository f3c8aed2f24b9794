"""Issue 25, a run's life as a user lives it: Ctrl-C, ``--resume``, loggers and the metrics log.

Each row runs the real entry point (``launch/train.py``) in subprocesses, with ``--model tiny``:

- Ctrl-C after a checkpoint stops cleanly (exit 130, a complete checkpoint, the exact command to continue,
  no traceback); that printed command, run as printed, says which checkpoint it continues from and ends
  with the uninterrupted run's adapter (bitwise), its per-step losses and its before-training metrics;
- the same under ``torchrun --nproc_per_node 2 ... --fsdp fsdp2`` with the SIGINT sent to the launcher's
  process group (what a terminal does): both ranks stop at the same step with a complete checkpoint, the
  launcher's command with ``--resume`` ends with an uninterrupted 2-rank run's adapter and losses (bitwise);
- two Ctrl-C in quick succession abort at once (exit 130, no waiting for the step), and the next
  ``--resume`` continues from the last complete checkpoint with every other one set aside;
- ``--report_to`` with a logger whose package is missing is one error line naming the package to
  install; ``--report_to tensorboard`` writes its events and ``metrics.jsonl`` (the same numbers).

The two runs of a row that are independent run at the same time (the CI machine has 2 cores).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # whole (tiny) runs of the app in subprocesses

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
QUICK = ["--model", "tiny", "--report_to", "none", "--eval_generate_limit", "0", "--eval_limit", "4",
         "--per_device_train_batch_size", "2", "--logging_steps", "1"]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    return dict(env, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))


def start(args: list[str], log: Path) -> subprocess.Popen:
    """``launch/train.py args`` in the background, everything it prints going to ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, str(TRAIN), *args], stdout=f, stderr=subprocess.STDOUT,
                                env=_env(), cwd=log.parent)  # fmt: skip


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env or _env(), cwd=cwd, capture_output=True, text=True, timeout=300)


def train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, str(TRAIN), *args], cwd)


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def losses(out: Path) -> dict[int, float]:
    """Step -> training loss, from ``metrics.jsonl`` (asserting each step is logged once)."""
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def wait_until(check, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"the run ended first ({proc.returncode}):\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.05)


def complete(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*") if (p / "COMPLETE").is_file()),
                  key=lambda n: int(n.rsplit("-", 1)[1]))  # fmt: skip


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------- Ctrl-C, resume
STEPS = [*QUICK, "--train_limit", "16", "--max_steps", "30", "--save_steps", "2"]


def test_ctrl_c_stops_cleanly_and_the_printed_resume_command_ends_as_uninterrupted(tmp_path):
    ref_out, out, log = tmp_path / "ref", tmp_path / "run", tmp_path / "run.log"
    args = [*STEPS, "--output_dir", str(out)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        reference = pool.submit(train, [*STEPS, "--output_dir", str(ref_out)], tmp_path)
        proc = start(args, log)
        wait_until(lambda: max(losses(out), default=0) >= 3, proc, log)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        assert reference.result().returncode == 0, reference.result().stderr[-4000:]
    printed = log.read_text()
    assert proc.returncode == 130, printed[-4000:]
    assert "Traceback" not in printed and "KeyboardInterrupt" not in printed, printed[-4000:]
    stop = next(line for line in printed.splitlines() if line.startswith("stopped: SIGINT (Ctrl-C) at step "))
    step = int(stop.split(" at step ")[1].split("/")[0])
    assert 3 <= step < 30 and f"{out / f'checkpoint-{step}'} is complete" in stop
    assert complete(out)[-1] == f"checkpoint-{step}"
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()
    assert sorted(losses(out)) == list(range(1, step + 1)), "every step up to the stop, logged once"

    hint = next(line for line in printed.splitlines() if line.startswith("continue with: "))
    command = shlex.split(hint.removeprefix("continue with: "))
    assert command == [sys.executable, str(TRAIN), *args, "--resume"]
    resumed = run(command, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resume: continuing from {out / f'checkpoint-{step}'} (step {step})" in resumed.stderr

    summary, reference_summary = (json.loads((o / "summary.json").read_text()) for o in (out, ref_out))
    first_run_before = json.loads((out / f"checkpoint-{step}" / "run_state.json").read_text())["metrics_before"]
    assert summary["metrics_before"] == first_run_before == reference_summary["metrics_before"]
    assert summary["metrics_before"]["eval_loss"] > 0
    assert summary["resumed_from"] == str(out / f"checkpoint-{step}") and summary["steps"] == 30
    final, expected = adapter(out), adapter(ref_out)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert losses(out) == losses(ref_out), "metrics.jsonl: one history, equal to the uninterrupted run's"


def test_second_ctrl_c_aborts_at_once_and_resume_sets_the_cut_checkpoint_aside(tmp_path):
    """Steps of 16 micro-batches (about a second each here): the first Ctrl-C lands early in step 2, the
    second as soon as the run has said it will stop, so well before step 2 ends."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = [*QUICK, "--train_limit", "64", "--gradient_accumulation_steps", "16", "--max_steps", "4",
            "--save_steps", "1", "--output_dir", str(out)]  # fmt: skip
    proc = start(args, log)
    wait_until(lambda: complete(out) == ["checkpoint-1"], proc, log)  # step 2 has begun
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: "Ctrl-C: stopping at the end of this step" in log.read_text(), proc, log, timeout=30)
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    proc.wait(timeout=60)
    waited = time.monotonic() - sent
    printed = log.read_text()
    assert proc.returncode == 130, printed[-4000:]
    assert "aborted by Ctrl-C" in printed and "stopped:" not in printed, printed[-4000:]
    assert "Traceback" not in printed and "KeyboardInterrupt" not in printed, printed[-4000:]
    assert waited < 15, f"took {waited:.1f}s to abort"
    assert complete(out) == ["checkpoint-1"] and sorted(losses(out)) == [1], "step 2 was cut short"
    cut = sorted(p.name for p in out.glob("checkpoint-*") if not (p / "COMPLETE").is_file())

    resumed = train([*args, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resume: continuing from {out / 'checkpoint-1'} (step 1)" in resumed.stderr
    assert all((p / "COMPLETE").is_file() for p in out.glob("checkpoint-*"))
    assert sorted(p.name.rsplit("-", 1)[0] for p in out.glob("incomplete-checkpoint-*")) == [f"incomplete-{c}" for c in cut]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4 and sorted(losses(out)) == [1, 2, 3, 4]



def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> dict[str, str]:
    env = {k: v for k, v in _env().items() if not k.startswith(("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_"))
           and k not in ("LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")}  # fmt: skip
    return dict(env, MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning")


TORCHRUN = [*QUICK, "--train_limit", "16", "--max_steps", "12", "--save_steps", "2", "--fsdp", "fsdp2"]


def test_ctrl_c_under_torchrun_stops_both_ranks_cleanly_and_resume_ends_as_uninterrupted(tmp_path):
    """``torchrun --nproc_per_node 2 launch/train.py ... --fsdp fsdp2`` in its own process group, which gets the
    SIGINT (a terminal's Ctrl-C).  torchrun starts every rank in a session of its own (``start_new_session``,
    torch 2.11 to 2.14), so the ranks never see the terminal's SIGINT: the agent's handler raises
    ``SignalException``, it relays SIGINT to each rank's group and waits ``--shutdown_timeout`` (default 30 s)
    before SIGKILL, then re-raises: torchrun exits 1 with that one traceback (its report of the signal it got;
    the ranks' 130 is not passed on).  Both ranks stop at the end of the step with a complete checkpoint,
    rank 0 says so and prints the launcher hint; the same command with ``--resume`` ends with the adapter and
    per-step losses of an uninterrupted 2-rank run (bitwise: same launcher, world and data order)."""
    ref_out, out, log, ref_log = tmp_path / "ref", tmp_path / "run", tmp_path / "run.log", tmp_path / "ref.log"

    def command(output_dir: Path, port: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(port), str(TRAIN), *TORCHRUN, "--output_dir", str(output_dir)]  # fmt: skip

    port, ref_port = free_port(), free_port()
    while ref_port == port:
        ref_port = free_port()
    cmd = command(out, port)
    with open(log, "w") as f, open(ref_log, "w") as g:
        reference = subprocess.Popen(command(ref_out, ref_port), stdout=g, stderr=subprocess.STDOUT,
                                     env=torchrun_env(), cwd=tmp_path)  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=torchrun_env(), cwd=tmp_path,
                                start_new_session=True)  # fmt: skip
    try:
        wait_until(lambda: max(losses(out), default=0) >= 3 and complete(out) != [], proc, log)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the agent and everything else in its process group
        proc.wait(timeout=120)
        assert reference.wait(timeout=240) == 0, ref_log.read_text()[-4000:]
    finally:
        for p in (proc, reference):  # on a failure: SIGTERM to the agent stops its ranks (own sessions)
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
    printed = log.read_text()
    assert proc.returncode == 1, printed[-4000:]  # torchrun's SignalException, not the ranks' 130
    assert "closing signal SIGINT" in printed and "forcefully exiting" not in printed, printed[-4000:]
    assert printed.count("Traceback (most recent call last)") == 1, printed[-6000:]  # the agent's only
    assert printed.rstrip().splitlines()[-1].startswith(
        "torch.distributed.elastic.multiprocessing.api.SignalException: Process "), printed[-4000:]
    assert "KeyboardInterrupt" not in printed and "aborted by Ctrl-C" not in printed, printed[-4000:]
    stops = [line for line in printed.splitlines() if line.startswith("stopped: ")]
    assert len(stops) == 1 and stops[0].startswith("stopped: SIGINT (Ctrl-C) at step "), printed[-4000:]
    step = int(stops[0].split(" at step ")[1].split("/")[0])
    assert 3 <= step < 12 and f"{out / f'checkpoint-{step}'} is complete" in stops[0]
    assert complete(out)[-1] == f"checkpoint-{step}"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == complete(out), "no checkpoint left unmarked"
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()
    assert sorted(losses(out)) == list(range(1, step + 1)), "every step up to the stop, logged once"
    hint = next(line for line in printed.splitlines() if line.startswith("rerun the same launcher command with --resume"))
    assert shlex.join([str(TRAIN), *TORCHRUN, "--output_dir", str(out), "--resume"]) in hint

    resumed = run([*cmd, "--resume"], tmp_path, env=torchrun_env())
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert f"resume: continuing from {out / f'checkpoint-{step}'} (step {step})" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == str(out / f"checkpoint-{step}") and summary["steps"] == 12
    assert summary["backend"] == "fsdp2" and summary["world_size"] == 2
    final, expected = adapter(out), adapter(ref_out)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    assert losses(out) == losses(ref_out), "metrics.jsonl: one history, equal to the uninterrupted run's"


# ------------------------------------------------------------------------------------- loggers
def tensorboard_losses(folder: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def test_report_to_missing_package_is_one_error_and_tensorboard_and_metrics_jsonl_agree(tmp_path):
    missing, logged = tmp_path / "missing", tmp_path / "logged"
    base = [*QUICK, "--train_limit", "8", "--max_steps", "3"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        bad = pool.submit(train, [*base, "--report_to", "tensorboard,wandb", "--output_dir", str(missing)], tmp_path)
        good = pool.submit(train, [*base, "--report_to", "tensorboard", "--output_dir", str(logged)], tmp_path)
        bad, good = bad.result(), good.result()
    both = bad.stdout + bad.stderr
    errors = [line for line in both.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "Traceback" not in both, both[-3000:]
    assert "--report_to wandb" in errors[0] and "pip install wandb" in errors[0], errors[0]
    assert not missing.exists()

    assert good.returncode == 0, good.stderr[-4000:]
    records = metrics(logged)
    assert all("step" in r and "epoch" in r for r in records)
    assert any("train_runtime" in r for r in records), "the Trainer's closing log line too"
    from_jsonl = losses(logged)
    assert sorted(from_jsonl) == [1, 2, 3]
    from_tensorboard = tensorboard_losses(logged / "tensorboard")
    assert from_tensorboard.keys() == from_jsonl.keys()
    assert all(from_tensorboard[s] == pytest.approx(from_jsonl[s], rel=1e-6) for s in from_jsonl)
