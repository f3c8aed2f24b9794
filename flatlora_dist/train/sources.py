"""Where a run's data comes from: a built-in task (``math``, ``sentiment``) or the user's data in any
form :mod:`.records` reads, loaded and tokenized as :class:`~.data.TaskData` (:func:`load_task`), and
the three sets a run uses (:func:`load_data`: train, held-out, out-of-domain).

Held-out data for ``--data``, in order: ``--eval_data``; ``--val_size`` (records split off the training
source: the very records ``datasets``' ``train_test_split(test_size=val_size, seed=seed)`` holds out, as
LLaMA-Factory does, the same on every rank); the source's own ``validation`` or ``test`` split (a
``DatasetDict`` folder, a Hub dataset, a folder of ``<split>.jsonl``); else none, with a warning.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import STYLES, DataError, TaskData, make_collator, tokenize_examples
from .formats import Row, check_record, resolve_format, rows_to_examples
from .records import dataset_splits, read_records, source_kind

BUILTIN_TASKS = ("math", "sentiment")
HELDOUT_SPLITS = ("validation", "test")
NO_HELDOUT = "none: no --eval_data, --val_size or validation/test split"


def _task_examples(task: str, tokenizer, split: str, limit: int | None, seed: int, style: str | None):
    if task == "math":
        from .tasks import gsm

        return gsm.math_examples(tokenizer, split=split, n=limit, seed=seed, style=style), "math"
    from .tasks import sentiment

    return sentiment.sentiment_examples(tokenizer, split=split, limit=limit, seed=seed, style=style), "sentiment"


def _check_name(name: str) -> None:
    if source_kind(name) == "missing" and Path(name).suffix == "" and os.sep not in name:
        raise DataError(f"{name}: not a built-in task ({', '.join(BUILTIN_TASKS)}) and no such file")


def rows_to_task(name: str, split: str, rows: list[Row], tokenizer, max_length: int | None = 512,
                 packing: bool = False, fmt: str | None = None, style: str | None = None) -> TaskData:  # fmt: skip
    """Records (non-empty) as a tokenized :class:`TaskData` of kind ``sft``."""
    examples = rows_to_examples(tokenizer, rows, fmt=fmt, style=style or "plain")
    dataset, stats = tokenize_examples(tokenizer, examples, max_length, packing, name)
    return TaskData(name=name, split=split, kind="sft", examples=examples, dataset=dataset,
                    collator=make_collator(tokenizer), stats=stats)  # fmt: skip


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
    """Load a built-in task (``math``, ``sentiment``) or the user's data, tokenized.

    * ``math``: splits ``train`` / ``validation`` (train templates, other instances) / ``test``
      (held-out templates); ``limit`` = examples per split (default 1000 train, 100 otherwise).
    * ``sentiment``: splits ``train`` / ``validation`` / ``test`` (movie sentences) and the
      out-of-domain ``amazon`` / ``tweets`` / ``nyt``.
    * a file (JSONL, JSON array, parquet, CSV: ``split`` is only recorded), or the ``split`` of a folder
      of ``<split>.jsonl``, a ``save_to_disk`` folder or a Hub dataset ID (see :mod:`.records`).

    Held-out splits never depend on ``seed``; ``seed`` only samples/orders the built-in tasks' train
    split (files keep their order and ``limit`` takes their first records; the Trainer shuffles).
    ``style`` is ``plain`` or ``chat`` (default: chat for math when the tokenizer has a template,
    plain for sentiment and alpaca files); ``fmt`` forces ``alpaca``/``chat``/``sharegpt`` for files.
    """
    if style is not None and style not in STYLES:
        raise DataError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    name = str(task_or_path)
    if name in BUILTIN_TASKS:
        examples, kind = _task_examples(name, tokenizer, split, limit, seed, style)
        dataset, stats = tokenize_examples(tokenizer, examples, max_length, packing, f"task {name!r} split {split!r}")
        return TaskData(name=name, split=split, kind=kind, examples=examples, dataset=dataset,
                        collator=make_collator(tokenizer), stats=stats)  # fmt: skip
    _check_name(name)
    rows = read_records(name, split)[:limit]
    return rows_to_task(name, split, rows, tokenizer, max_length, packing, fmt, style)


# --------------------------------------------------------------------------------- held-out records


def split_heldout(n: int, val_size: float, seed: int, source: str = "--data") -> tuple[list[int], list[int]]:
    """``(train indices, held-out indices)`` of ``n`` records, each in file order: ``val_size`` < 1 a
    fraction (rounded up), else a count; the records ``datasets.Dataset.train_test_split(test_size=...,
    seed=seed)`` holds out (a permutation of ``numpy.random.default_rng(seed)``), so any rank, run or
    library gets the same split.  Raises when it holds out nothing or leaves nothing to train on."""
    import numpy as np

    n_test = math.ceil(val_size * n) if val_size < 1 else int(val_size)
    if n_test <= 0 or n_test >= n:
        what = "holds out no record" if n_test <= 0 else "leaves no record to train on"
        raise DataError(f"--val_size {val_size:g} {what} ({n_test} of {n} in {source}); "
                        f"give a fraction or a count between 1 and {n - 1}")  # fmt: skip
    order = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in order[n_test:]), sorted(int(i) for i in order[:n_test])


@dataclass(frozen=True)
class Selection:
    """The records a ``--data`` run uses: ``train``, ``heldout`` (``None``: none) and where the held-out
    records come from (``heldout_from``, as ``summary.json`` reports it)."""

    train: list[Row]
    heldout: list[Row] | None
    heldout_from: str


def _heldout_split(name: str) -> str | None:
    splits = dataset_splits(name) or ()
    return next((s for s in HELDOUT_SPLITS if s in splits), None)


def select_records(cfg) -> Selection:
    """The records of a ``--data`` run ``cfg`` (a :class:`~.config.TrainConfig`), limits applied; reads
    the sources, needs no tokenizer (the preflight checks these, the run tokenizes these)."""
    rows = read_records(cfg.data, "train")
    if cfg.eval_data:
        split = _heldout_split(cfg.eval_data) or "test"
        heldout, origin = read_records(cfg.eval_data, split), f"--eval_data {cfg.eval_data}"
    elif cfg.val_size:
        train_idx, held_idx = split_heldout(len(rows), cfg.val_size, cfg.seed, cfg.data)
        heldout, origin = [rows[i] for i in held_idx], f"--val_size {cfg.val_size:g} of {cfg.data} (seed {cfg.seed})"
        rows = [rows[i] for i in train_idx]
    elif (split := _heldout_split(cfg.data)) is not None:
        heldout, origin = read_records(cfg.data, split), f"the {split!r} split of {cfg.data}"
    else:
        heldout, origin = None, NO_HELDOUT
    limit = lambda rs, n: rs[:n] if n is not None else rs  # noqa: E731
    return Selection(limit(rows, cfg.train_limit), limit(heldout, cfg.eval_limit) if heldout else None, origin)


def check_records(rows: list[Row], fmt: str) -> None:
    """Validate every record (no tokenizer needed); an explicit ``fmt`` the first record contradicts is
    refused naming the format it looks like."""
    kind = resolve_format(rows, fmt, flag="--data_format")
    for where, rec in rows:
        check_record(where, rec, kind)


def check_run_data(cfg) -> Selection | None:
    """The preflight's data check for ``cfg``: every record the run will read parsed, ``--val_size``
    checked; returns the selection (``None`` for a built-in task)."""
    if not cfg.data:
        return None
    selection = select_records(cfg)
    check_records(selection.train, cfg.data_format)
    if selection.heldout:
        check_records(selection.heldout, cfg.data_format)
    return selection


def warn_no_heldout(selection: Selection) -> None:
    """One warning line (main rank) when a ``--data`` run holds nothing out."""
    from .runtime import is_main

    if selection.heldout is None and is_main():
        print("warning: no held-out data (no --eval_data, --val_size or validation/test split): the run "
              "reports no held-out loss; add --val_size 0.1 or --eval_data FILE", file=sys.stderr)  # fmt: skip


# ----------------------------------------------------------------------------------------- run data


@dataclass(frozen=True)
class RunData:
    """A run's data: the train set, the held-out set (``None``: a ``--data`` run holding nothing out),
    the out-of-domain sets by name (sentiment's ``amazon``) and where the held-out set comes from."""

    train: TaskData
    heldout: TaskData | None
    extra: dict[str, TaskData] = field(default_factory=dict)
    heldout_from: str = ""


def load_data(cfg, tokenizer) -> RunData:
    """The train, held-out and out-of-domain sets of the run ``cfg`` (a :class:`~.config.TrainConfig`)."""
    common: dict[str, Any] = dict(max_length=cfg.max_length, seed=cfg.seed)
    fmt = None if cfg.data_format == "auto" else cfg.data_format
    if cfg.data:
        selection = select_records(cfg)
        train = rows_to_task(cfg.data, "train", selection.train, tokenizer, cfg.max_length, cfg.packing, fmt)
        heldout = (rows_to_task(cfg.eval_data or cfg.data, "test", selection.heldout, tokenizer, cfg.max_length,
                                fmt=fmt) if selection.heldout else None)  # fmt: skip
        warn_no_heldout(selection)
        return RunData(train, heldout, {}, selection.heldout_from)
    train = load_task(cfg.task, tokenizer, "train", packing=cfg.packing, limit=cfg.train_limit, **common)
    heldout = load_task(cfg.task, tokenizer, "test", limit=cfg.eval_limit, **common)
    extra = {}
    if cfg.task == "sentiment":
        extra = {"amazon": load_task("sentiment", tokenizer, "amazon", limit=cfg.eval_limit, **common)}
    return RunData(train, heldout, extra, f"task {cfg.task!r} split 'test'")
