"""Reading a user's data as records, whatever form it comes in, with one-line errors naming the source:

* JSON: JSON Lines, or one JSON array of objects (as the Alpaca dataset ships), whatever the suffix
  (``.json`` files are often JSONL); read with the standard library, so it needs no extra package and
  errors name the line.  A top-level object holding the list is refused with the fix.
* ``.parquet`` and ``.csv``: the ``datasets`` library's loaders (CSV cells are read as text).
* a folder written by ``datasets`` ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` by split).
* a folder of ``<split>.jsonl`` files.
* a Hub dataset ID (``owner/name``) through ``datasets.load_dataset`` (``HF_HUB_OFFLINE`` honoured:
  offline, ``datasets`` itself reads only the Arrow files an earlier ``load_dataset`` prepared in its
  cache, ``HF_DATASETS_CACHE``; failing that, the newest snapshot ``hf download --repo-type dataset``
  left in ``HF_HUB_CACHE`` is loaded as a folder of data files).

Everything but JSON needs ``datasets`` (the ``trl`` extra); without it, one error names the install.
Records come as :data:`~.formats.Row` ``(where, record)`` pairs in the source's order; ``where`` is
``file:line`` for JSONL and ``file record N`` (1-based) otherwise.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from .data import DataError
from .formats import Row, detect_format

TABLE_SUFFIXES = (".parquet", ".csv")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DATASETS_INSTALL = "pip install datasets (or pip install 'flatlora_dist[trl]')"


# ---------------------------------------------------------------------------------------------- kinds


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` (``state.json``) or ``DatasetDict.save_to_disk``
    (``dataset_dict.json``)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def source_kind(name: str) -> str:
    """What ``name`` is: ``json`` (any other file), ``parquet``, ``csv``, ``saved`` (a ``save_to_disk``
    folder), ``folder`` (of ``<split>.jsonl``), ``hub`` (no such path, shaped like ``owner/name``) or
    ``missing``."""
    path = Path(name).expanduser()
    if path.is_dir():
        return "saved" if is_saved_dataset(path) else "folder"
    if path.exists():
        return path.suffix.lower().lstrip(".") if path.suffix.lower() in TABLE_SUFFIXES else "json"
    if HUB_ID.match(name) and path.suffix.lower() not in (".json", ".jsonl", *TABLE_SUFFIXES):
        return "hub"
    return "missing"


def needs_datasets(kind: str) -> bool:
    """Whether reading a source of ``kind`` needs the ``datasets`` package."""
    return kind in ("parquet", "csv", "saved", "hub")


def require_datasets(name: str, kind: str) -> None:
    """One error line naming the install when ``kind`` needs ``datasets`` and it is missing."""
    if needs_datasets(kind) and importlib.util.find_spec("datasets") is None:
        what = {"saved": "a datasets save_to_disk folder", "hub": "a Hub dataset"}.get(kind, f"a {kind} file")
        raise DataError(f"{name}: reading {what} needs the datasets package: {DATASETS_INSTALL}")


# ----------------------------------------------------------------------------------------------- JSON


def _read_text(p: Path) -> str:
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a file")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_jsonl(path: str | os.PathLike) -> list[Row]:
    """``(file:line, record)`` for every non-blank line; one-line :class:`DataError` otherwise."""
    p = Path(path)
    return _jsonl_rows(p, _read_text(p))


def _jsonl_rows(p: Path, text: str) -> list[Row]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if not rows and p.suffix.lower() not in (".json", ".jsonl"):  # not JSON at all, and not named so
                raise DataError(f"{p}:{lineno}: not JSON ({err.msg}); give JSON Lines or a JSON array (.jsonl, "
                                ".json), a .parquet or .csv file, or a datasets save_to_disk folder") from None  # fmt: skip
            raise DataError(f"{p}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        rows.append((f"{p}:{lineno}", rec))
    return rows


def _list_holder(value: dict[str, Any]) -> str | None:
    """The key of a top-level object's only value that is a list of objects (``{"data": [...]}``)."""
    lists = [k for k, v in value.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
    return lists[0] if len(lists) == 1 else None


def read_json(path: str | os.PathLike) -> list[Row]:
    """Records of a JSON Lines file or of a file holding one JSON array of objects (non-empty)."""
    p = Path(path)
    text = _read_text(p)
    head = text.lstrip()[:1]
    whole: Any = None
    if head in ("[", "{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as err:
            if head == "[" and err.msg != "Extra data":  # "Extra data": JSON Lines starting with a list
                raise DataError(f"{p}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if isinstance(whole, list):
        rows = []
        for i, rec in enumerate(whole, start=1):
            if not isinstance(rec, dict):
                raise DataError(f"{p} record {i}: expected a JSON object, got {type(rec).__name__}")
            rows.append((f"{p} record {i}", rec))
    elif isinstance(whole, dict) and detect_format(whole) is None and _list_holder(whole) is not None:
        key = _list_holder(whole)
        raise DataError(f"{p}: a JSON object holding the records under {key!r}; give the list itself "
                        f"(a JSON array or JSON Lines), e.g. jq '.{key}' {p.name} > records.json")  # fmt: skip
    elif isinstance(whole, dict):  # one record, on one line or pretty-printed
        rows = [(f"{p}:1", whole)]
    else:
        rows = _jsonl_rows(p, text)
    if not rows:
        raise DataError(f"{p}: empty dataset (no records)")
    return rows


# ------------------------------------------------------------------------------------------- datasets


def _cause(err: BaseException) -> str:
    """The innermost cause's first line (``datasets`` wraps the parser's error)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _table(p: Path, kind: str):
    """A parquet or CSV file as a ``datasets.Dataset`` (CSV cells as text, empty cells as '')."""
    datasets = _quiet_datasets()
    kwargs: dict[str, Any] = {}
    if kind == "csv":
        with p.open(newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
        if not header:
            raise DataError(f"{p}: empty dataset (no header row)")
        kwargs = dict(features=datasets.Features({c: datasets.Value("string") for c in header}),
                      keep_default_na=False)  # fmt: skip
    try:
        return datasets.load_dataset(kind, data_files=str(p), split="train", **kwargs)
    except Exception as err:  # the loaders raise many types; the message names the file and the cause
        raise DataError(f"{p}: cannot read as {kind} ({_cause(err)})") from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_snapshot(name: str) -> str | None:
    """The folder of ``name``'s newest snapshot in the hub cache (``HF_HUB_CACHE``: what ``hf download
    --repo-type dataset`` leaves), or ``None``; never goes online."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=name, repo_type="dataset", local_files_only=True)
    except Exception:  # not cached (huggingface_hub raises its own LocalEntryNotFoundError and kin)
        return None


def open_dataset(name: str, kind: str):
    """A ``save_to_disk`` folder or a Hub dataset ID as a ``Dataset`` or ``DatasetDict``.  Offline, a Hub ID
    is read from ``datasets``' prepared cache, else from its hub snapshot (loaded as a local folder of data
    files, as ``load_dataset`` loads any folder)."""
    datasets = _quiet_datasets()
    if kind == "saved":
        try:
            return datasets.load_from_disk(str(Path(name).expanduser()))
        except Exception as err:  # a damaged folder: name it and the cause
            raise DataError(f"{name}: cannot read the save_to_disk folder ({_cause(err)})") from None
    try:
        return datasets.load_dataset(name)
    except Exception as err:  # not found, offline, no access: one line with the way to get it
        if not _offline():
            raise DataError(f"{name}: no such file or folder, and the Hub dataset cannot be loaded "
                            f"({_cause(err)})") from None  # fmt: skip
    snapshot = _hub_snapshot(name)
    if snapshot is None:
        raise DataError(f"{name}: no such file or folder, and not a dataset in the HF cache (HF_HUB_OFFLINE is "
                        f"set; neither prepared in {datasets.config.HF_DATASETS_CACHE} nor downloaded to "
                        f"{_hub_cache()}); get it first with network access: hf download {name} "
                        "--repo-type dataset") from None  # fmt: skip
    try:
        return datasets.load_dataset(snapshot)
    except Exception as err:
        raise DataError(f"{name}: the cached snapshot {snapshot} cannot be read as a dataset ({_cause(err)})") from None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def dataset_splits(name: str) -> tuple[str, ...] | None:
    """The named splits of a ``DatasetDict`` folder, a Hub dataset or a ``<split>.jsonl`` folder;
    ``None`` for a single set (a file or a saved ``Dataset``)."""
    kind = source_kind(name)
    if kind == "folder":
        return tuple(sorted(p.stem for p in Path(name).expanduser().glob("*.jsonl")))
    if kind in ("saved", "hub"):
        require_datasets(name, kind)
        ds = open_dataset(name, kind)
        return tuple(ds) if hasattr(ds, "keys") else None
    return None


def _dataset_rows(ds, label: str) -> list[Row]:
    return [(f"{label} record {i}", rec) for i, rec in enumerate(ds.to_list(), start=1)]


def read_records(name: str, split: str = "train") -> list[Row]:
    """The records of ``name`` (non-empty): a file as a whole, or the ``split`` of a folder or Hub
    dataset (a saved single ``Dataset`` as a whole)."""
    kind = source_kind(name)
    require_datasets(name, kind)
    path = Path(name).expanduser()
    if kind == "missing":
        raise DataError(f"{path}: file not found")
    if kind == "json":
        return read_json(path)
    if kind == "folder":
        candidate = path / f"{split}.jsonl"
        if not candidate.is_file():
            raise DataError(f"{path}: no {split}.jsonl in this folder")
        return read_json(candidate)
    if kind in ("parquet", "csv"):
        rows, label = _dataset_rows(_table(path, kind), str(path)), str(path)
    else:
        ds = open_dataset(name, kind)
        label = name
        if hasattr(ds, "keys"):
            if split not in ds:
                raise DataError(f"{name}: no {split!r} split (splits: {', '.join(ds) or 'none'})")
            ds, label = ds[split], f"{name} [{split}]"
        rows = _dataset_rows(ds, label)
    if not rows:
        raise DataError(f"{label}: empty dataset (no records)")
    return rows
