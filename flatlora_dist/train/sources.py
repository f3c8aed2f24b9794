"""Where a run's data comes from: a built-in task (``math``, ``sentiment``) or a JSONL file/folder, loaded
and tokenized as :class:`~.data.TaskData` (:func:`load_task`), and the three sets a run uses
(:func:`load_data`: train, held-out, out-of-domain)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import STYLES, DataError, TaskData, make_collator, tokenize_examples
from .formats import load_jsonl_examples, split_file

BUILTIN_TASKS = ("math", "sentiment")


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


@dataclass(frozen=True)
class RunData:
    """A run's data: the train set, the held-out set (``None``: a ``--data`` file without ``--eval_data``)
    and the out-of-domain sets by name (sentiment's ``amazon``)."""

    train: TaskData
    heldout: TaskData | None
    extra: dict[str, TaskData] = field(default_factory=dict)


def load_data(cfg, tokenizer) -> RunData:
    """The train, held-out and out-of-domain sets of the run ``cfg`` (a :class:`~.config.TrainConfig`)."""
    common: dict[str, Any] = dict(max_length=cfg.max_length, seed=cfg.seed)
    source = cfg.data or cfg.task
    fmt = None if cfg.data_format == "auto" else cfg.data_format
    train = load_task(
        source, tokenizer, "train", packing=cfg.packing, limit=cfg.train_limit, fmt=fmt, **common
    )
    extra = {}
    if cfg.eval_data:
        heldout = load_task(cfg.eval_data, tokenizer, "test", limit=cfg.eval_limit, fmt=fmt, **common)
    elif cfg.data:
        heldout = None
    else:
        heldout = load_task(cfg.task, tokenizer, "test", limit=cfg.eval_limit, **common)
        if cfg.task == "sentiment":
            extra = {"amazon": load_task("sentiment", tokenizer, "amazon", limit=cfg.eval_limit, **common)}
    return RunData(train, heldout, extra)
