"""Supervised fine-tuning data: JSONL loaders, tokenization with response-only labels, packing.

An :class:`Example` is a list of rendered text segments, each marked trained or not; tokenizing it
gives ``input_ids`` and ``labels`` with ``-100`` on every untrained (prompt) token.  Segments are
tokenized one by one, so the prompt tokens are exactly those :func:`encode_prompt` feeds the model
at evaluation time.

Formats (auto-detected per file from its first record, or given):

* ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}``; rendered with the
  Stanford Alpaca prompt (``style="plain"``) or as one chat turn (``style="chat"``).
* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
  rendered with the tokenizer's chat template, trained on the assistant turns only.

Built-in tasks (``math``, ``sentiment``) live in :mod:`flatlora_dist.train.tasks`; everything is
reached through :func:`load_task`.  Bad input raises :class:`DataError`, one line naming the file and
line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("alpaca", "chat")
STYLES = ("plain", "chat")
CHAT_ROLES = ("system", "user", "assistant")
BUILTIN_TASKS = ("math", "sentiment")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class DataError(ValueError):
    """Bad training data; the message is one line naming the file (and line) at fault."""


# ------------------------------------------------------------------------------------ examples


@dataclass
class Example:
    """One training/evaluation example as rendered text segments.

    ``segments`` are ``(text, trained)`` pairs in order.  ``add_special_tokens`` lets the tokenizer
    add its own specials (e.g. BOS) to the first segment (plain prompts; chat templates render their
    own).  ``append_eos`` appends the EOS token, trained, after the last segment.  ``answer`` is the
    reference for evaluation (a number for math, a label for sentiment); ``choices`` maps labels to
    the continuation text scored for them.
    """

    segments: list[tuple[str, bool]]
    add_special_tokens: bool = True
    append_eos: bool = False
    answer: str | None = None
    choices: dict[str, str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """Text before the first trained segment (what generation starts from)."""
        out = []
        for text, trained in self.segments:
            if trained:
                break
            out.append(text)
        return "".join(out)

    @property
    def response(self) -> str:
        """Text of the first trained segment (the reference completion)."""
        return next((text for text, trained in self.segments if trained), "")


def render_chat(tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages``."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no chat template; cannot render chat data")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_segments(tokenizer, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into segments, trained on the assistant turns.

    Each assistant turn spans from the end of the generation prompt before it to the end of the
    conversation rendered up to and including it (so its end-of-turn token is trained).  Needs a
    prefix-stable template (true of ChatML / SmolLM2 / Llama-style templates).
    """
    full = render_chat(tokenizer, messages)
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for k, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:k], add_generation_prompt=True)) if k else 0
        end_text = render_chat(tokenizer, messages[: k + 1])
        if not full.startswith(end_text) or start < cursor or start > len(end_text):
            raise DataError("the tokenizer's chat template is not prefix-stable; cannot mask assistant turns")
        if start > cursor:
            segments.append((full[cursor:start], False))
        segments.append((full[start : len(end_text)], True))
        cursor = len(end_text)
    if cursor < len(full):
        segments.append((full[cursor:], False))
    return segments


def chat_example(tokenizer, messages: Sequence[dict[str, str]], **kwargs: Any) -> Example:
    """An :class:`Example` from chat messages (assistant turns trained)."""
    return Example(chat_segments(tokenizer, messages), add_special_tokens=False, append_eos=False, **kwargs)


def prompt_response_example(
    tokenizer,
    prompt: str,
    response: str,
    style: str = "plain",
    system: str | None = None,
    **kwargs: Any,
) -> Example:
    """A single-turn example: ``plain`` = raw prompt text then response + EOS; ``chat`` = one turn."""
    if style == "plain":
        return Example([(prompt, False), (response, True)], add_special_tokens=True, append_eos=True, **kwargs)
    if style == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return chat_example(tokenizer, messages, **kwargs)
    raise DataError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")


def default_style(tokenizer) -> str:
    """``chat`` if the tokenizer has a chat template, else ``plain``."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


# ---------------------------------------------------------------------------------- tokenization


def _encode_segments(tokenizer, ex: Example, segments: Iterable[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(segments):
        piece = tokenizer(text, add_special_tokens=ex.add_special_tokens and i == 0)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def encode_prompt(tokenizer, ex: Example) -> list[int]:
    """Token ids of the prompt, exactly as :func:`encode_example` tokenizes them."""
    prompt = []
    for text, trained in ex.segments:
        if trained:
            break
        prompt.append((text, False))
    return _encode_segments(tokenizer, ex, prompt)[0]


def encode_example(tokenizer, ex: Example, max_length: int | None = None) -> dict[str, list[int]] | None:
    """``{"input_ids", "labels"}`` for ``ex``, right-truncated to ``max_length``.

    Returns None when nothing trainable is left (e.g. the prompt alone exceeds ``max_length``).
    """
    ids, labels = _encode_segments(tokenizer, ex, ex.segments)
    if ex.append_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    if max_length is not None and len(ids) > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


def pack_features(features: Sequence[dict[str, list[int]]], block_size: int) -> list[dict[str, list[int]]]:
    """Concatenate examples into blocks of ``block_size`` tokens, keeping each token's label.

    Examples are not truncated but continue into the next block; the last, shorter block is kept
    when it still has trained tokens.
    """
    if block_size < 2:
        raise DataError(f"packing needs max_length >= 2, got {block_size}")
    ids = [t for f in features for t in f["input_ids"]]
    labels = [t for f in features for t in f["labels"]]
    blocks = []
    for start in range(0, len(ids), block_size):
        block_labels = labels[start : start + block_size]
        if any(label != IGNORE_INDEX for label in block_labels[1:]):
            blocks.append({"input_ids": ids[start : start + block_size], "labels": block_labels})
    return blocks


class TokenizedDataset(Dataset):
    """A list of ``{"input_ids", "labels"}`` features (plain int lists) as a torch Dataset."""

    def __init__(self, features: list[dict[str, list[int]]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, idx: int) -> dict[str, list[int]]:
        return self.features[idx]

    @property
    def lengths(self) -> list[int]:
        """Token count of every item."""
        return [len(f["input_ids"]) for f in self.features]


@dataclass
class PadCollator:
    """Pads a batch to its longest item: ``pad_token_id`` on the right, mask 0, labels -100."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_collator(tokenizer, pad_to_multiple_of: int | None = None) -> PadCollator:
    """A :class:`PadCollator` using the tokenizer's pad token (EOS when it has none)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")
    return PadCollator(pad_token_id=pad, pad_to_multiple_of=pad_to_multiple_of)


# ----------------------------------------------------------------------------------------- JSONL


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every non-blank line; one-line :class:`DataError` otherwise."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a file")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{p}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append((lineno, rec))
    if not records:
        raise DataError(f"{p}: empty dataset (no records)")
    return records


def record_keys(record: dict) -> str:
    """A record's keys for one-line error messages: quoted (a key may hold a newline), sorted."""
    return ", ".join(repr(k) for k in sorted(record)) or "none"


def detect_format(record: dict[str, Any]) -> str | None:
    """``chat`` for a ``messages`` record, ``alpaca`` for ``instruction``/``output``, else None."""
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def _require(path: Path, lineno: int, rec: dict[str, Any], fields: Sequence[str], fmt: str) -> None:
    missing = [f for f in fields if f not in rec]
    if missing:
        names = ", ".join(repr(f) for f in missing)
        raise DataError(f"{path}:{lineno}: record missing required field(s) {names} for {fmt} format")


def _type_error(path: Path, lineno: int, what: str, expected: str, value: Any) -> DataError:
    return DataError(f"{path}:{lineno}: {what} must be {expected}, got {type(value).__name__}")


def parse_alpaca(path: Path, lineno: int, rec: dict[str, Any]) -> tuple[str, str, str]:
    """``(instruction, input, output)`` of an alpaca record, validated."""
    _require(path, lineno, rec, ("instruction", "output"), "alpaca")
    values = {}
    for name in ("instruction", "input", "output"):
        value = rec.get(name, "")
        if value is None and name == "input":
            value = ""
        if not isinstance(value, str):
            raise _type_error(path, lineno, f"field {name!r}", "a string", value)
        values[name] = value
    for name in ("instruction", "output"):
        if not values[name].strip():
            raise DataError(f"{path}:{lineno}: field {name!r} is empty")
    return values["instruction"], values["input"], values["output"]


def parse_chat(path: Path, lineno: int, rec: dict[str, Any]) -> list[dict[str, str]]:
    """The validated ``messages`` of a chat record (roles system/user/assistant, string content)."""
    _require(path, lineno, rec, ("messages",), "chat")
    messages = rec["messages"]
    if not isinstance(messages, list) or not messages:
        if isinstance(messages, list):
            raise DataError(f"{path}:{lineno}: field 'messages' is empty")
        raise _type_error(path, lineno, "field 'messages'", "a list", messages)
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _type_error(path, lineno, f"messages[{i}]", "an object", msg)
        missing = [k for k in ("role", "content") if k not in msg]
        if missing:
            names = ", ".join(repr(k) for k in missing)
            raise DataError(f"{path}:{lineno}: messages[{i}] missing required field(s) {names}")
        role, content = msg["role"], msg["content"]
        if role not in CHAT_ROLES:
            raise DataError(f"{path}:{lineno}: messages[{i}] has role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise _type_error(path, lineno, f"messages[{i}]['content']", "a string", content)
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{path}:{lineno}: no assistant message to train on")
    return out


def alpaca_example(tokenizer, instruction: str, input_text: str, output: str, style: str = "plain") -> Example:
    """An alpaca record as an example: the Alpaca prompt (plain) or one chat turn."""
    if style == "chat":
        prompt = f"{instruction}\n\n{input_text}" if input_text.strip() else instruction
    else:
        template = ALPACA_PROMPT_INPUT if input_text.strip() else ALPACA_PROMPT
        prompt = template.format(instruction=instruction, input=input_text)
    return prompt_response_example(tokenizer, prompt, output, style=style)


def load_jsonl_examples(
    path: str | os.PathLike,
    tokenizer,
    fmt: str | None = None,
    style: str = "plain",
    limit: int | None = None,
) -> list[Example]:
    """Read an alpaca or chat JSONL file into examples (format auto-detected from the first record)."""
    p = Path(path)
    if fmt not in (None, "auto", *FORMATS):
        raise DataError(f"{p}: unknown format {fmt!r}; expected one of auto, {', '.join(FORMATS)}")
    records = read_jsonl(p)
    if fmt in (None, "auto"):
        first_line, first = records[0]
        fmt = detect_format(first)
        if fmt is None:
            keys = record_keys(first)
            raise DataError(
                f"{p}:{first_line}: unknown format (keys: {keys}); expected 'messages' (chat) "
                "or 'instruction' + 'output' (alpaca)"
            )
    if limit is not None:
        records = records[:limit]
    examples = []
    for lineno, rec in records:
        if fmt == "chat":
            ex = chat_example(tokenizer, parse_chat(p, lineno, rec))
        else:
            ex = alpaca_example(tokenizer, *parse_alpaca(p, lineno, rec), style=style)
        ex.meta.update(source=str(p), line=lineno)
        examples.append(ex)
    return examples


# -------------------------------------------------------------------------------------- load_task


@dataclass
class TaskData:
    """What :func:`load_task` returns: raw examples (for generation/scoring) and the tokenized set."""

    name: str
    split: str
    kind: str
    examples: list[Example]
    dataset: TokenizedDataset
    collator: PadCollator
    stats: dict[str, int] = field(default_factory=dict)


def tokenize_examples(
    tokenizer, examples: Sequence[Example], max_length: int | None, packing: bool, source: str
) -> tuple[TokenizedDataset, dict[str, int]]:
    """Tokenize (and optionally pack) examples; :class:`DataError` if none survive."""
    if max_length is not None and max_length < 2:
        raise DataError(f"{source}: max_length must be >= 2, got {max_length}")
    features, dropped = [], 0
    for ex in examples:
        feat = encode_example(tokenizer, ex, None if packing else max_length)
        if feat is None:
            dropped += 1
        else:
            features.append(feat)
    if not features:
        raise DataError(
            f"{source}: empty dataset after filtering ({dropped} of {len(examples)} examples dropped: "
            f"no response tokens within max_length={max_length})"
        )
    if dropped:
        logger.warning("%s: dropped %d of %d examples with no response tokens within max_length=%s",
                       source, dropped, len(examples), max_length)  # fmt: skip
    if packing:
        if max_length is None:
            raise DataError(f"{source}: packing needs max_length")
        features = pack_features(features, max_length)
    stats = {
        "examples": len(examples),
        "dropped": dropped,
        "items": len(features),
        "tokens": sum(len(f["input_ids"]) for f in features),
        "trained_tokens": sum(sum(1 for t in f["labels"] if t != IGNORE_INDEX) for f in features),
    }
    return TokenizedDataset(features), stats


def split_file(path: Path, split: str) -> Path:
    """A file path as is; for a folder, ``<folder>/<split>.jsonl``."""
    if path.is_dir():
        candidate = path / f"{split}.jsonl"
        if not candidate.is_file():
            raise DataError(f"{path}: no {split}.jsonl in this folder")
        return candidate
    return path


def _task_examples(task: str, tokenizer, split: str, limit: int | None, seed: int, style: str | None):
    if task == "math":
        from .tasks import gsm

        return gsm.math_examples(tokenizer, split=split, n=limit, seed=seed, style=style), "math"
    from .tasks import sentiment

    return sentiment.sentiment_examples(tokenizer, split=split, limit=limit, seed=seed, style=style), "sentiment"


def load_task(
    task_or_path: str | os.PathLike,
    tokenizer,
    split: str = "train",
    max_length: int | None = 512,
    packing: bool = False,
    limit: int | None = None,
    seed: int = 0,
    *,
    fmt: str | None = None,
    style: str | None = None,
) -> TaskData:
    """Load a built-in task (``math``, ``sentiment``) or a JSONL file/folder, tokenized.

    * ``math``: splits ``train`` / ``validation`` (train templates, other instances) / ``test``
      (held-out templates); ``limit`` = examples per split (default 1000 train, 100 otherwise).
    * ``sentiment``: splits ``train`` / ``validation`` / ``test`` (movie sentences) and the
      out-of-domain ``amazon`` / ``tweets`` / ``nyt``.
    * a ``.jsonl`` file (``split`` is only recorded) or a folder holding ``<split>.jsonl``.

    Held-out splits never depend on ``seed``; ``seed`` only samples/orders the built-in tasks' train
    split (files keep their order and ``limit`` takes their first records; the Trainer shuffles).
    ``style`` is ``plain`` or ``chat`` (default: chat for math when the tokenizer has a template,
    plain for sentiment and alpaca files); ``fmt`` forces ``alpaca``/``chat`` for files.
    """
    if style is not None and style not in STYLES:
        raise DataError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    name = str(task_or_path)
    if name in BUILTIN_TASKS:
        examples, kind = _task_examples(name, tokenizer, split, limit, seed, style)
        source = f"task {name!r} split {split!r}"
    else:
        path = Path(name).expanduser()
        if not path.exists() and path.suffix != ".jsonl" and os.sep not in name:
            raise DataError(f"{name}: not a built-in task ({', '.join(BUILTIN_TASKS)}) and no such file")
        path = split_file(path, split)
        examples = load_jsonl_examples(path, tokenizer, fmt=fmt, style=style or "plain", limit=limit)
        kind, source = "sft", str(path)
    dataset, stats = tokenize_examples(tokenizer, examples, max_length, packing, source)
    return TaskData(name=name, split=split, kind=kind, examples=examples, dataset=dataset,
                    collator=make_collator(tokenizer), stats=stats)  # fmt: skip
