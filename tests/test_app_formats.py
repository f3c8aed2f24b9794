"""Issue 6, application features end to end on the tiny model: alpaca and chat JSONL, packing, the
sentiment task, gradient checkpointing, TensorBoard scalars, --merge; bad input refused with one
``error:`` line before anything in the output folder is touched; local models load offline, from
safetensors only, without running model-folder code.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))

from app_common import FAST, adapter, in_process, max_diff, per_step  # noqa: E402

from flatlora_dist.train.run import main  # noqa: E402

STEPS = ["--max_steps", "3", "--per_device_train_batch_size", "2"]


def alpaca_file(path: Path, n: int) -> Path:
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"numbers: {i}, {i + 1}",
             "output": f"The sum is {2 * i + 1}."} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_file(path: Path, n: int) -> Path:
    rows = [{"messages": [{"role": "system", "content": "You are terse."},
                          {"role": "user", "content": f"What is {i} times 2?"},
                          {"role": "assistant", "content": f"{2 * i}."},
                          {"role": "user", "content": "And plus one?"},
                          {"role": "assistant", "content": f"{2 * i + 1}."}]} for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tb_scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


# ---------------------------------------------------------------------------------------------- formats
def test_alpaca_jsonl_with_tensorboard_and_merge(tmp_path):
    """Alpaca train/eval files; TensorBoard gets train/loss and train/flatlora/factor every step;
    --merge writes a model that loads on its own and computes what base + adapter computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flatlora_dist.train.tiny import build_tiny_llama

    train, held = alpaca_file(tmp_path / "train.jsonl", 24), alpaca_file(tmp_path / "eval.jsonl", 4)
    out = tmp_path / "run"
    code, _ = in_process(out, [*STEPS, "--data", str(train), "--eval_data", str(held), "--report_to",
                               "tensorboard", "--merge"])  # fmt: skip
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["task"] == str(train) and s["data"]["train"]["examples"] == 24
    assert "eval_loss" in s["metrics_before"] and "eval_loss" in s["metrics_after"]

    scalars = tb_scalars(out / "tensorboard")
    assert len(scalars["train/loss"]) == 3 and len(scalars["train/flatlora/factor"]) == 3
    assert scalars["train/flatlora/factor"][0] == 0 < scalars["train/flatlora/factor"][-1] <= 1

    merged = AutoModelForCausalLM.from_pretrained(out / "merged", local_files_only=True, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(out / "merged", local_files_only=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base, _ = build_tiny_llama()
    peft = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ids = tok("Add 2 and 3.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(merged.eval()(ids).logits, peft(ids).logits, atol=1e-5)


def test_chat_jsonl_with_packing(tmp_path):
    """Multi-turn chat records packed into 128-token blocks (fewer items than examples)."""
    train = chat_file(tmp_path / "chat.jsonl", 24)
    out = tmp_path / "run"
    code, _ = in_process(out, [*STEPS, "--data", str(train), "--packing", "--max_length", "128"])
    assert code == 0
    stats = json.loads((out / "summary.json").read_text())["data"]["train"]
    assert stats["examples"] == 24 and 0 < stats["items"] < 24
    assert stats["trained_tokens"] > 0 and stats["tokens"] <= stats["items"] * 128


def test_sentiment_task_reports_in_and_out_of_domain_accuracy(tmp_path):
    out = tmp_path / "run"
    code, _ = in_process(out, ["--task", "sentiment", "--max_steps", "2", "--per_device_train_batch_size", "2",
                               "--eval_generate_limit", "4", "--max_length", "128"])  # fmt: skip
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    for metrics in (s["metrics_before"], s["metrics_after"]):
        for key in ("eval_loss", "sentiment_accuracy", "sentiment_accuracy_amazon"):
            assert key in metrics, key
        assert 0 <= metrics["sentiment_accuracy"] <= 1 and 0 <= metrics["sentiment_accuracy_amazon"] <= 1


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path):
    """Recomputation in backward sees the same perturbed weights as the forward (one draw per step)."""
    args = [*STEPS, "--lora_dropout", "0", "--flat_schedule", "constant", "--sigma", "0.1"]
    code, plain = in_process(tmp_path / "plain", args)
    assert code == 0
    code, ckpt = in_process(tmp_path / "ckpt", [*args, "--gradient_checkpointing"])
    assert code == 0
    assert max_diff(adapter(tmp_path / "plain" / "adapter"), adapter(tmp_path / "ckpt" / "adapter")) <= 1e-5
    assert per_step(plain)["noise"] == pytest.approx(per_step(ckpt)["noise"], rel=1e-6)
    assert per_step(ckpt)["noise"][2] > 0


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def previous_run(tmp_path):
    """An output folder holding an earlier run; every bad request below also says --overwrite."""
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"old adapter")
    (out / "summary.json").write_text('{"old": true}')
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "COMPLETE").write_text("step 1\n")
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, out: Path, *args: str) -> str:
    before = snapshot(out)
    code = main([*FAST, "--output_dir", str(out), "--overwrite", "--max_steps", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and err[-1].startswith("error: "), err[-3:]
    assert "Traceback" not in "\n".join(err)
    assert snapshot(out) == before, "existing files must be untouched"
    return err[-1]


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys, previous_run):
    bad = alpaca_file(tmp_path / "bad.jsonl", 2)
    bad.write_text(bad.read_text() + '{"instruction": "x", "output": \n')
    msg = refused(capsys, previous_run, "--data", str(bad))
    assert f"{bad}:3: malformed JSON" in msg


def test_invalid_record_names_file_and_line_within_the_limit_only(tmp_path, capsys, previous_run):
    """A record the run would read is checked up front; one past --train_limit is never read."""
    from flatlora_dist.train.config import parse_args
    from flatlora_dist.train.preflight import preflight

    bad = alpaca_file(tmp_path / "bad.jsonl", 3)
    bad.write_text(bad.read_text() + '{"instruction": "x"}\n')
    msg = refused(capsys, previous_run, "--data", str(bad), "--train_limit", "10")
    assert f"{bad}:4:" in msg and "'output'" in msg
    cfg = parse_args(["--data", str(bad), "--train_limit", "3", "--output_dir", str(tmp_path / "fresh")])
    plan = preflight(cfg)
    assert (plan.resume_from, plan.ds) == (None, None)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset(tmp_path, capsys, previous_run, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    assert "empty dataset" in refused(capsys, previous_run, "--data", str(empty))


def test_dataset_empty_after_filtering_leaves_output_untouched(tmp_path, capsys, previous_run):
    """Caught only after tokenization (model loaded), still before the output folder is touched."""
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"instruction": "x " * 200, "output": "y"}) + "\n")
    assert "empty dataset after filtering" in refused(
        capsys, previous_run, "--data", str(long), "--max_length", "16"
    )


@pytest.mark.parametrize(
    "key,value,expect",
    [
        (
            "train_batch_size",
            64,
            "per_device_train_batch_size 4 x gradient_accumulation_steps 2 x world size 1 = 8",
        ),
        ("train_micro_batch_size_per_gpu", 3, "per_device_train_batch_size 4"),
        ("gradient_accumulation_steps", 1, "gradient_accumulation_steps 2"),
    ],
)
def test_ds_config_batch_size_mismatch(tmp_path, capsys, previous_run, monkeypatch, key, value, expect):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({key: value, "zero_optimization": {"stage": 2}}))
    msg = refused(capsys, previous_run, "--ds_config", str(ds), "--per_device_train_batch_size", "4",
                  "--gradient_accumulation_steps", "2")  # fmt: skip
    assert f"{ds}: {key} is {value}" in msg and expect in msg and '"auto"' in msg


def test_ds_config_matching_or_auto_batch_sizes_pass_preflight(tmp_path, monkeypatch):
    from flatlora_dist.train.config import parse_args
    from flatlora_dist.train.preflight import preflight

    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 16, "train_micro_batch_size_per_gpu": "auto",
                              "zero_optimization": {"stage": 3}}))  # fmt: skip
    cfg = parse_args(["--ds_config", str(ds), "--per_device_train_batch_size", "4", "--gradient_accumulation_steps",
                      "2", "--output_dir", str(tmp_path / "o")])  # fmt: skip
    assert preflight(cfg).ds["train_batch_size"] == 16


def test_load_in_4bit_without_bitsandbytes(capsys, previous_run, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    assert "--load_in_4bit needs bitsandbytes" in refused(capsys, previous_run, "--load_in_4bit")


# ---------------------------------------------------------------------------------------------- item 8
@pytest.fixture
def local_model(tmp_path):
    """The tiny model saved as a local folder, with bait: a corrupt ``pytorch_model.bin`` (loading it
    would fail) and an ``auto_map`` to model-folder code that, if ever imported, leaves a marker."""
    from flatlora_dist.train.tiny import build_tiny_llama

    folder = tmp_path / "model"
    model, tok = build_tiny_llama()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    marker = tmp_path / "REMOTE_CODE_RAN"
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, marker


def test_local_model_runs_offline_from_safetensors_without_remote_code(tmp_path, local_model, monkeypatch):
    folder, marker = local_model
    attempts: list = []
    local = ("127.0.0.1", "::1", "localhost", "0.0.0.0")

    def guarded_connect(self, address, _real=socket.socket.connect):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in local:
            attempts.append(address)
            raise OSError(f"network access in a test: {address}")
        return _real(self, address)

    def guarded_getaddrinfo(host, *args, _real=socket.getaddrinfo, **kwargs):
        if host not in (None, *local):
            attempts.append(host)
            raise OSError(f"name lookup in a test: {host}")
        return _real(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    from transformers import AutoModelForCausalLM

    seen: dict = {}
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    out = tmp_path / "run"
    code, _ = in_process(
        out, ["--model", str(folder), "--max_steps", "1", "--per_device_train_batch_size", "2"]
    )
    assert code == 0 and attempts == []
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True and seen["local_files_only"]
    assert not marker.exists(), "model-folder code ran without --trust_remote_code"
    assert json.loads((out / "summary.json").read_text())["model"] == str(folder)


def test_model_folder_without_safetensors_is_refused(tmp_path, capsys, local_model):
    folder, _ = local_model
    for f in folder.glob("*.safetensors"):
        f.unlink()
    code = main([*FAST, "--model", str(folder), "--output_dir", str(tmp_path / "run"), "--max_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "no *.safetensors weights" in err[-1]
