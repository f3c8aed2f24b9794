"""``FLATLORA_TRACE`` and the callback's place in the Trainer's callback list.

A plain ``Trainer`` given the callback the way LLaMA-Factory gives it (``Trainer(callbacks=[...])``, which
transformers puts after its reporting callbacks) and by ``trainer.add_callback``: the callback moves
itself to the front, so ``flatlora/*`` reaches TensorBoard; the trace shows noise in every forward of
every step.  The trace's verdict must also fail where it should: plain LoRA (no noise), a step 0 of a
cosine ramp (no noise, rightly), a changed base, a draw repeated.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from flatlora_dist import FlatLoRAConfig
from flatlora_dist.hf import FlatLoRACallback
from flatlora_dist.trace import ENV, read, verify

sys.path.insert(0, str(Path(__file__).parent / "integrations"))
from common import check_noise_trace, check_tensorboard  # noqa: E402

STEPS, GAS = 3, 2


def _rows(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    ids = [torch.randint(4, 120, (16,), generator=g) for _ in range(n)]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i.clone()} for i in ids]


def _train(tmp_path: Path, monkeypatch, tiny_llama, *, sigma: float, schedule: str = "constant",
           how: str = "callbacks") -> tuple[object, FlatLoRACallback]:  # fmt: skip
    from transformers import Trainer, TrainingArguments

    monkeypatch.setenv(ENV, str(tmp_path / "trace.jsonl"))
    cb = FlatLoRACallback(FlatLoRAConfig(sigma=sigma, schedule=schedule, seed=1))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=2,
                             gradient_accumulation_steps=GAS, logging_steps=1, report_to=["tensorboard"],
                             save_strategy="no", use_cpu=True,
                             learning_rate=1e-3, disable_tqdm=True)  # fmt: skip
    model = tiny_llama(targets=["q_proj", "down_proj"])
    trainer = Trainer(model=model, args=args, train_dataset=_rows(STEPS * GAS * 2),
                      callbacks=[cb] if how == "callbacks" else None)  # fmt: skip
    if how == "add_callback":
        trainer.add_callback(cb)
    trainer.train()
    return trainer, cb


@pytest.mark.parametrize("how", ["callbacks", "add_callback"])
def test_callback_goes_first_and_its_stats_reach_tensorboard(tmp_path, monkeypatch, how):
    from conftest import tiny_llama
    from transformers import TrainerCallback
    from transformers.integrations import TensorBoardCallback

    trainer, cb = _train(tmp_path, monkeypatch, tiny_llama, sigma=0.1, how=how)
    cbs = trainer.callback_handler.callbacks
    assert sum(c is cb for c in cbs) == 1
    writers = [i for i, c in enumerate(cbs) if type(c).on_log is not TrainerCallback.on_log and c is not cb]
    assert isinstance(cbs[writers[0]], TensorBoardCallback) and cbs.index(cb) < writers[0]
    flat = check_tensorboard(tmp_path / "out", steps_logged=STEPS)
    assert next(v for k, v in flat.items() if k.endswith("flatlora/factor")) == [1.0] * STEPS  # constant schedule
    check_noise_trace(tmp_path / "trace.jsonl", steps=STEPS, micro_batches=GAS)


def test_trace_flags_plain_lora_and_accepts_a_cosine_step_zero(tmp_path, monkeypatch):
    from conftest import tiny_llama

    _train(tmp_path / "plain", monkeypatch, tiny_llama, sigma=0.0)
    _, problems = verify(read(tmp_path / "plain" / "trace.jsonl"), forwards_per_step=GAS)
    assert problems == ["no step was meant to carry noise (sigma 0, or only steps whose schedule factor is 0)"]

    _train(tmp_path / "cosine", monkeypatch, tiny_llama, sigma=0.1, schedule="cosine")
    records = read(tmp_path / "cosine" / "trace.jsonl")
    assert [r["factor"] for r in records if r["event"] == "step"][0] == 0.0
    summary, problems = verify(records, forwards_per_step=GAS)
    modules = len(records[0]["modules"])  # q_proj and down_proj of both layers
    assert problems == [] and summary == {"runs": 1, "steps": STEPS, "forwards": modules * STEPS * GAS}


def _synthetic(draws: list[str], end: str = "c") -> list[dict]:
    recs = [{"event": "begin", "step": 0, "modules": {"m": "c"}}]
    for s, d in enumerate(draws):
        recs += [{"event": "step", "step": s, "sigma": 0.1, "factor": 1.0},
                 {"event": "forward", "step": s, "module": "m", "digest": d}]  # fmt: skip
    return recs + [{"event": "end", "step": len(draws), "modules": {"m": end}}]


def test_verify_names_each_failure():
    assert verify(_synthetic(["x", "y"]))[1] == []
    assert verify(_synthetic(["x", "x"]))[1] == ["m: the same noise in two steps (not redrawn)"]
    assert verify(_synthetic(["c", "y"]))[1] == ["m, step 0: a forward saw the clean weight (no noise)"]
    assert verify(_synthetic(["x", "y"], end="z"))[1] == ["base weights changed by training: ['m']"]
    assert verify(_synthetic(["x", "y"]), forwards_per_step=2)[1] == [
        "m, step 0: 1 forwards, expected 2", "m, step 1: 1 forwards, expected 2"]  # fmt: skip
    assert "no 'end' record" in verify(_synthetic(["x"])[:-1])[1][0]
    assert verify([])[1] == ["the trace has no 'begin' record (was FlatLoRACallback attached?)"]
