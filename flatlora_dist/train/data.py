"""Supervised fine-tuning data, the types every data source shares: :class:`Example` (text segments, each
trained or not), :class:`DataError`, tokenization with response-only labels, packing, the padding
collator and :class:`TaskData` (what a loaded source is).

Tokenizing an example gives ``input_ids`` and ``labels`` with ``-100`` on every untrained (prompt)
token.  Segments are tokenized one by one, so the prompt tokens are exactly those :func:`encode_prompt`
feeds the model at evaluation time.  The sources build on this module: the JSONL formats
(:mod:`.formats`), the built-in tasks (:mod:`.tasks`) and :func:`.sources.load_task`, which reaches them
all.  Bad input raises :class:`DataError`, one line naming the file and line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
STYLES = ("plain", "chat")
CHAT_ROLES = ("system", "user", "assistant")


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
