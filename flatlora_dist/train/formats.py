"""The JSONL formats a user's data comes in, read with one-line errors naming file and line:

* ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}``; rendered with the
  Stanford Alpaca prompt (``style="plain"``) or as one chat turn (``style="chat"``).
* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
  rendered with the tokenizer's chat template, trained on the assistant turns only.

The format is auto-detected per file from its first record, or given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import CHAT_ROLES, DataError, Example, chat_example, prompt_response_example

FORMATS = ("alpaca", "chat")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


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


def split_file(path: Path, split: str) -> Path:
    """A file path as is; for a folder, ``<folder>/<split>.jsonl``."""
    if path.is_dir():
        candidate = path / f"{split}.jsonl"
        if not candidate.is_file():
            raise DataError(f"{path}: no {split}.jsonl in this folder")
        return candidate
    return path
