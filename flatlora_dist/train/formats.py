"""The record shapes a user's data comes in, validated with one-line errors naming where the record is
(``file:line`` for JSONL, ``file record N`` for JSON arrays and tables; see :mod:`.records`):

* ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}``; rendered with the
  Stanford Alpaca prompt (``style="plain"``) or as one chat turn (``style="chat"``).
* ``chat`` (OpenAI ``messages``): ``{"messages": [{"role": "system"|"user"|"assistant", "content": str},
  ...]}``; rendered with the tokenizer's chat template, trained on the assistant turns only.
* ``sharegpt``: ``{"conversations": [{"from": str, "value": str}, ...], "system": str (optional)}``,
  converted to ``chat`` with LLaMA-Factory's default tags: ``human``/``user`` -> user, ``gpt``/``assistant``
  -> assistant, ``system`` -> system; ``function_call`` (what the model emits) -> assistant and
  ``observation`` (a tool's answer) -> user, the sides LLaMA-Factory trains and masks them on.

The format is auto-detected per source from its first record, or given.  Invariant: every function
here either returns validated values or raises :class:`~.data.DataError` whose message is one line
starting with the record's location.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .data import CHAT_ROLES, DataError, Example, chat_example, prompt_response_example

FORMATS = ("alpaca", "chat", "sharegpt")
SHAPES = "'messages' (chat), 'conversations' (sharegpt) or 'instruction' + 'output' (alpaca)"

# LLaMA-Factory's default ShareGPT tags (data/README.md: user_tag human, assistant_tag gpt,
# observation_tag observation, function_tag function_call, system_tag system), plus the OpenAI names.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "user"}  # fmt: skip

Row = tuple[str, dict[str, Any]]
"""``(where, record)``: the record's location for error messages (``file:line``) and the record."""

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def record_keys(record: dict) -> str:
    """A record's keys for one-line error messages: quoted (a key may hold a newline), sorted."""
    return ", ".join(repr(k) for k in sorted(record, key=str)) or "none"


def detect_format(record: dict[str, Any]) -> str | None:
    """``chat`` for a ``messages`` record, ``sharegpt`` for ``conversations``, ``alpaca`` for
    ``instruction``/``output``, else None."""
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    return None


def resolve_format(rows: Sequence[Row], fmt: str | None, flag: str | None = None) -> str:
    """The format of ``rows`` (non-empty): detected from the first record for ``None``/``auto``; an
    explicit one is returned as is, except that with ``flag`` (the preflight, naming the option the
    user set) a first record that looks like another format is refused, naming both and the fix."""
    if fmt not in (None, "auto", *FORMATS):
        raise DataError(f"{rows[0][0]}: unknown format {fmt!r}; expected one of auto, {', '.join(FORMATS)}")
    where, first = rows[0]
    looks = detect_format(first)
    if fmt in (None, "auto"):
        if looks is None:
            raise DataError(f"{where}: unknown format (keys: {record_keys(first)}); expected {SHAPES}")
        return looks
    if flag is not None and looks not in (None, fmt):
        raise DataError(f"{flag} {fmt}, but {where} looks like {looks} (keys: {record_keys(first)}): "
                        f"use {flag} {looks} or auto")  # fmt: skip
    return fmt


def _require(where: str, rec: dict[str, Any], fields: Sequence[str], fmt: str) -> None:
    missing = [f for f in fields if f not in rec]
    if missing:
        names = ", ".join(repr(f) for f in missing)
        raise DataError(f"{where}: record missing required field(s) {names} for {fmt} format")


def _type_error(where: str, what: str, expected: str, value: Any) -> DataError:
    return DataError(f"{where}: {what} must be {expected}, got {type(value).__name__}")


def _turn(where: str, label: str, turn: Any, keys: tuple[str, str]) -> tuple[Any, Any]:
    """The two ``keys`` of one conversation turn (``label``: e.g. ``messages[3]``), which must be an
    object holding both."""
    if not isinstance(turn, dict):
        raise _type_error(where, label, "an object", turn)
    missing = [k for k in keys if k not in turn]
    if missing:
        names = ", ".join(repr(k) for k in missing)
        raise DataError(f"{where}: {label} missing required field(s) {names}")
    return turn[keys[0]], turn[keys[1]]


def parse_alpaca(where: str, rec: dict[str, Any]) -> tuple[str, str, str]:
    """``(instruction, input, output)`` of an alpaca record, validated (a missing or null input is '')."""
    _require(where, rec, ("instruction", "output"), "alpaca")
    values = {}
    for name in ("instruction", "input", "output"):
        value = rec.get(name, "")
        if value is None and name == "input":
            value = ""
        if not isinstance(value, str):
            raise _type_error(where, f"field {name!r}", "a string", value)
        values[name] = value
    for name in ("instruction", "output"):
        if not values[name].strip():
            raise DataError(f"{where}: field {name!r} is empty")
    return values["instruction"], values["input"], values["output"]


def _message_list(where: str, rec: dict[str, Any], key: str) -> list:
    messages = rec[key]
    if isinstance(messages, list) and not messages:
        raise DataError(f"{where}: field {key!r} is empty")
    if not isinstance(messages, list):
        raise _type_error(where, f"field {key!r}", "a list", messages)
    return messages


def _with_assistant(where: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to train on")
    return messages


def parse_chat(where: str, rec: dict[str, Any]) -> list[dict[str, str]]:
    """The validated ``messages`` of a chat record (roles system/user/assistant, string content)."""
    _require(where, rec, ("messages",), "chat")
    out = []
    for i, msg in enumerate(_message_list(where, rec, "messages")):
        role, content = _turn(where, f"messages[{i}]", msg, ("role", "content"))
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: messages[{i}] has role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise _type_error(where, f"messages[{i}]['content']", "a string", content)
        out.append({"role": role, "content": content})
    return _with_assistant(where, out)


def parse_sharegpt(where: str, rec: dict[str, Any]) -> list[dict[str, str]]:
    """A ShareGPT record as validated chat ``messages`` (roles mapped by :data:`SHAREGPT_ROLES`; a
    top-level ``system`` string, LLaMA-Factory's system column, becomes the first message)."""
    _require(where, rec, ("conversations",), "sharegpt")
    out = []
    system = rec.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            raise _type_error(where, "field 'system'", "a string", system)
        out.append({"role": "system", "content": system})
    for i, turn in enumerate(_message_list(where, rec, "conversations")):
        source, value = _turn(where, f"conversations[{i}]", turn, ("from", "value"))
        if not isinstance(source, str) or source not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{i}] is from {source!r}; expected one of "
                            f"{', '.join(SHAREGPT_ROLES)}")  # fmt: skip
        if not isinstance(value, str):
            raise _type_error(where, f"conversations[{i}]['value']", "a string", value)
        out.append({"role": SHAREGPT_ROLES[source], "content": value})
    return _with_assistant(where, out)


def check_record(where: str, rec: dict[str, Any], fmt: str) -> None:
    """Validate one record of format ``fmt`` (no tokenizer needed)."""
    {"alpaca": parse_alpaca, "chat": parse_chat, "sharegpt": parse_sharegpt}[fmt](where, rec)


def alpaca_example(tokenizer, instruction: str, input_text: str, output: str, style: str = "plain") -> Example:
    """An alpaca record as an example: the Alpaca prompt (plain) or one chat turn."""
    if style == "chat":
        prompt = f"{instruction}\n\n{input_text}" if input_text.strip() else instruction
    else:
        template = ALPACA_PROMPT_INPUT if input_text.strip() else ALPACA_PROMPT
        prompt = template.format(instruction=instruction, input=input_text)
    return prompt_response_example(tokenizer, prompt, output, style=style)


def record_example(tokenizer, where: str, rec: dict[str, Any], fmt: str, style: str = "plain") -> Example:
    """One validated record of format ``fmt`` as an :class:`Example` (``meta['where']``: its location)."""
    if fmt == "alpaca":
        ex = alpaca_example(tokenizer, *parse_alpaca(where, rec), style=style)
    elif fmt == "chat":
        ex = chat_example(tokenizer, parse_chat(where, rec))
    else:
        ex = chat_example(tokenizer, parse_sharegpt(where, rec))
    ex.meta.update(where=where)
    return ex


def rows_to_examples(tokenizer, rows: Sequence[Row], fmt: str | None = None, style: str = "plain") -> list[Example]:
    """Records (non-empty) as examples, the format detected from the first unless given."""
    kind = resolve_format(rows, fmt)
    return [record_example(tokenizer, where, rec, kind, style) for where, rec in rows]
