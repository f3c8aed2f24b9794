"""Scoring a model: held-out loss, math accuracy by greedy generation, sentiment accuracy by log-probs.

All functions put the model in eval mode (restoring its previous mode), run without gradients, and
are deterministic (greedy decoding, no dropout).  Prompts are tokenized exactly as in training
(:func:`flatlora_dist.train.data.encode_prompt`).  Under torch.distributed every rank evaluates the
same data (simple, and keeps ZeRO-3/FSDP parameter gathers in step; generation uses
``synced_gpus``), so every rank returns the same numbers.

Inside ``with stop_when(check):`` every batch loop calls ``check()`` before each batch and raises
:class:`EvaluationStopped` when it returns true (the application's SIGTERM flag).  Ranks that
evaluate in lockstep must pass a check that agrees over ranks (one all-reduce), so all stop at the
same batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation

import torch
from torch.utils.data import DataLoader, Dataset

from .data import IGNORE_INDEX, Example, encode_prompt
from .runtime import distributed

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"
_FINAL_ANSWER = re.compile(r"####\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)


# ------------------------------------------------------------------------------------------ stopping
class EvaluationStopped(Exception):
    """The ``stop_when`` check asked the evaluation to stop (raised between batches)."""


_stop_check: Callable[[], bool] | None = None


@contextmanager
def stop_when(check: Callable[[], bool]) -> Iterator[None]:
    """Within the block, each evaluation batch first calls ``check()``; true: raise EvaluationStopped."""
    global _stop_check
    previous, _stop_check = _stop_check, check
    try:
        yield
    finally:
        _stop_check = previous


def _batch_gate() -> None:
    if _stop_check is not None and _stop_check():
        raise EvaluationStopped("stop requested")


# ------------------------------------------------------------------------------------------ helpers


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU if it has none)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; the previous training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _sharded(model: torch.nn.Module) -> bool:
    """Whether forwards are collective (ZeRO-3 / FSDP params), so ranks must generate in lockstep."""
    from ..shards import model_kinds

    return distributed() and model_kinds(model) != ["plain"]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every sequence right-aligned (left padding)."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, longest - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, longest - len(seq) :] = 1
    return ids, mask


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ------------------------------------------------------------------------------------------- loss


def heldout_loss(model: torch.nn.Module, dataset: Dataset, collator, batch_size: int = 8) -> float:
    """Mean cross-entropy per response token (labels != -100) over ``dataset``; NaN if none."""
    device = model_device(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    total, count = 0.0, 0
    with eval_mode(model):
        for batch in loader:
            _batch_gate()
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            target = labels[:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((target != IGNORE_INDEX).sum())
    return total / count if count else math.nan


# ------------------------------------------------------------------------------------- generation


def generate(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions of every example's prompt (left-padded batches), special tokens dropped."""
    from transformers import GenerationConfig

    device = model_device(model)
    pad = _pad_id(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True)  # fmt: skip
    outputs: list[str] = []
    with eval_mode(model):
        for batch in _batches(list(examples), batch_size):
            _batch_gate()
            ids, mask = left_pad([encode_prompt(tokenizer, ex) for ex in batch], pad)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config, synced_gpus=_sharded(model))  # fmt: skip
            new = out[:, ids.shape[1] :].cpu()
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


# ------------------------------------------------------------------------------------------- math


def _normalize_number(text: str) -> str | None:
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    value = value.normalize()
    return format(value, "f") if value == value.to_integral() else str(value)


def extract_answer(text: str) -> str | None:
    """The number after the first ``####`` (fallback: the last number in ``text``), normalised.

    Commas, ``$`` and trailing zeros are dropped (``1,200.0`` -> ``1200``); None if no number.
    """
    match = _FINAL_ANSWER.search(text)
    if match:
        return _normalize_number(match.group(1))
    numbers = _ANY_NUMBER.findall(text)
    return _normalize_number(numbers[-1]) if numbers else None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Exact numeric match after normalisation."""
    return predicted is not None and predicted == _normalize_number(reference)


def math_accuracy(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    return_predictions: bool = False,
) -> dict:
    """Greedy-decode every problem and compare the extracted answer with ``example.answer``.

    Returns ``{"accuracy", "correct", "total"}`` (plus ``"predictions"``: (completion, extracted)
    pairs, if asked).
    """
    completions = generate(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    extracted = [extract_answer(c) for c in completions]
    correct = sum(answers_match(p, ex.answer) for p, ex in zip(extracted, examples))
    result = {"accuracy": correct / len(examples) if examples else math.nan, "correct": correct, "total": len(examples)}
    if return_predictions:
        result["predictions"] = list(zip(completions, extracted))
    return result


# -------------------------------------------------------------------------------------- sentiment


def continuation_logprobs(
    model: torch.nn.Module, tokenizer, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16
) -> list[float]:
    """Sum of log-probabilities of each continuation given its prompt (token ids), right-padded."""
    device = model_device(model)
    pad = _pad_id(tokenizer)
    scores: list[float] = []
    with eval_mode(model):
        for batch in _batches(list(pairs), batch_size):
            _batch_gate()
            seqs = [p + c for p, c in batch]
            longest = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, s in enumerate(seqs):
                ids[row, : len(s)] = torch.as_tensor(s)
                mask[row, : len(s)] = 1
            logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
            for row, (p, c) in enumerate(batch):
                positions = torch.arange(len(p) - 1, len(p) + len(c) - 1, device=logp.device)
                targets = torch.as_tensor(c, device=logp.device)
                scores.append(float(logp[row, positions, targets].sum()))
    return scores


def sentiment_accuracy(model: torch.nn.Module, tokenizer, examples: Sequence[Example], batch_size: int = 16) -> dict:
    """Pick the label whose continuation (``example.choices``) is more likely; compare with the answer.

    Returns ``{"accuracy", "correct", "total", "positive_rate"}`` (positive_rate: share predicted
    positive, to spot a model that always says one label).
    """
    pairs, owners = [], []
    for i, ex in enumerate(examples):
        if not ex.choices:
            raise ValueError(f"sentiment_accuracy: example {i} has no choices")
        prompt = encode_prompt(tokenizer, ex)
        for label, text in ex.choices.items():
            pairs.append((prompt, tokenizer(text, add_special_tokens=False)["input_ids"]))
            owners.append((i, label))
    scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size)
    best: dict[int, tuple[float, str]] = {}
    for (i, label), score in zip(owners, scores):
        if i not in best or score > best[i][0]:
            best[i] = (score, label)
    predicted = [best[i][1] for i in range(len(examples))]
    correct = sum(p == ex.answer for p, ex in zip(predicted, examples))
    n = len(examples)
    return {
        "accuracy": correct / n if n else math.nan,
        "correct": correct,
        "total": n,
        "positive_rate": sum(p == "positive" for p in predicted) / n if n else math.nan,
    }


def sentiment_suite(
    model: torch.nn.Module, tokenizer, sets: dict[str, Sequence[Example]], batch_size: int = 16
) -> dict[str, float]:
    """:func:`sentiment_accuracy` over named sets (e.g. test + amazon/tweets/nyt): ``{name}_accuracy``."""
    return {f"{name}_accuracy": sentiment_accuracy(model, tokenizer, exs, batch_size)["accuracy"] for name, exs in sets.items()}
