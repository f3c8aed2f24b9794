"""All evaluation of a run: held-out loss and the built-in tasks' accuracy before and after training,
in lockstep on every rank, or for sharded runs (ZeRO-3, FSDP) accuracy from one unsharded copy of base +
saved adapter on rank 0; a SIGTERM stops the final evaluation between batches.  The scoring itself
(loss, generation, log-probs) is :mod:`.scoring`'s."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from . import scoring
from .config import TrainConfig
from .plan import RunPlan
from .report import gather_per_rank
from .runtime import StopRequest, barrier, is_main
from .scoring import EvaluationStopped, stop_when


def _accuracy(cfg: TrainConfig, model, tokenizer, heldout, extra: dict[str, Any]) -> dict[str, float]:
    """Accuracy metrics of the built-in tasks (generation for math, log-probs for sentiment)."""
    n = cfg.eval_generate_limit
    metrics: dict[str, float] = {}
    if not n or heldout is None:
        return metrics
    if heldout.kind == "math":
        metrics["math_accuracy"] = scoring.math_accuracy(model, tokenizer, heldout.examples[:n],
                                                          max_new_tokens=cfg.max_new_tokens)["accuracy"]  # fmt: skip
    elif heldout.kind == "sentiment":
        metrics["sentiment_accuracy"] = scoring.sentiment_accuracy(model, tokenizer, heldout.examples[:n])[
            "accuracy"
        ]
        for name, data in extra.items():
            metrics[f"sentiment_accuracy_{name}"] = scoring.sentiment_accuracy(
                model, tokenizer, data.examples[:n]
            )["accuracy"]
    return metrics


def evaluate_all(cfg: TrainConfig, model, tokenizer, heldout, extra: dict[str, Any], accuracy: bool = True):
    """Held-out loss (and, if asked, accuracy).  Every rank runs the same work in lockstep."""
    metrics: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        if heldout is not None:
            metrics["eval_loss"] = scoring.heldout_loss(model, heldout.dataset, heldout.collator,
                                                         cfg.per_device_eval_batch_size)  # fmt: skip
        if accuracy:
            metrics.update(_accuracy(cfg, model, tokenizer, heldout, extra))
    finally:
        model.train(was_training)
    return metrics


@contextmanager
def unsharded_loading(args) -> Iterator[None]:
    """Inside: transformers treats models as unsharded (``from_pretrained`` loads a plain model, ``generate``
    does not sync with other ranks).  After: the DeepSpeed config that ``TrainingArguments`` registered
    (``args.hf_deepspeed_config``) is registered again.  Public calls only: ``unset_hf_deepspeed_config``
    and ``set_hf_deepspeed_config``."""
    from transformers.integrations import deepspeed as hf_ds

    ds_config = getattr(args, "hf_deepspeed_config", None)  # None without DeepSpeed
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ds_config is not None:
            hf_ds.set_hf_deepspeed_config(ds_config)


def rank0_accuracy(cfg: TrainConfig, args, adapter_dir: Path, heldout, extra,
                   stop: StopRequest | None = None) -> tuple[dict, dict] | None:  # fmt: skip
    """Before/after accuracy from an unsharded copy on rank 0 (others wait at a barrier); ``None`` when a
    SIGTERM reached rank 0 during it (checked between batches).

    Token-by-token generation through ZeRO-3/FSDP gathers every layer for every new token; one plain
    copy of base + saved adapter is far cheaper whenever the model fits one device.  "Before" is the
    base model with the adapter disabled, which is what LoRA's zero-initialised B starts from.  ``args``:
    the run's ``TrainingArguments``, whose DeepSpeed config is switched off for that load and back on after.
    """
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    result: tuple[dict, dict] | None = (before, after)
    if is_main() and cfg.eval_generate_limit and heldout is not None:
        from peft import PeftModel

        from .model import load_model

        try:
            with unsharded_loading(args):  # plain load and generation (no ZeRO-3 sync), on this rank alone
                base, tokenizer = load_model(cfg.model, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                             attn_implementation=cfg.attn_implementation,
                                             trust_remote_code=cfg.trust_remote_code)  # fmt: skip
                if torch.cuda.is_available():
                    base = base.to(f"cuda:{torch.cuda.current_device()}")
                model = PeftModel.from_pretrained(base, str(adapter_dir))
                model.eval()
                with stop_when(lambda: stop is not None and stop.signum is not None):  # rank 0 alone: local flag
                    with model.disable_adapter():
                        before.update(_accuracy(cfg, model, tokenizer, heldout, extra))
                    after.update(_accuracy(cfg, model, tokenizer, heldout, extra))
        except EvaluationStopped:
            result = None
    barrier()
    return result


def final_evaluation(cfg: TrainConfig, plan: RunPlan, trainer, tokenizer, data, before: dict[str, Any],
                     stop: StopRequest) -> dict[str, Any] | None:  # fmt: skip
    """Held-out metrics of the trained model (the adapter is already saved; ``data``: the run's
    :class:`~.sources.RunData`); ``None`` if a SIGTERM stopped
    it (checked between batches; ranks agree on it).  Sharded runs take accuracy from rank 0's unsharded
    copy, whose "before" numbers are added to ``before['metrics']``."""
    from ..hf import any_rank

    split_eval, heldout, extra = plan.sharded, data.heldout, data.extra
    if is_main():
        what = f"{len(heldout.dataset)} held-out examples" if heldout is not None else "no held-out data (loss not measured)"
        print(f"final evaluation: {what}", file=sys.stderr, flush=True)
    try:
        with stop_when(lambda: any_rank(stop.signum is not None)):  # every rank evaluates in lockstep
            after = evaluate_all(cfg, trainer.model, tokenizer, heldout, extra, not split_eval)
    except EvaluationStopped:
        return None
    if split_eval:
        accuracy = gather_per_rank(rank0_accuracy(cfg, trainer.args, Path(cfg.output_dir) / "adapter", heldout, extra,
                                                  stop))[0]  # fmt: skip
        if accuracy is None:
            return None
        if before.get("metrics") is not None:
            before["metrics"].update(accuracy[0])
        after.update(accuracy[1])
    return after


