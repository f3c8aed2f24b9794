"""Models and tokenizers for the training application: :func:`load_model` (``tiny``, ``smollm2-135m``,
a local folder or a Hub model ID; see :mod:`.model_sources`), :func:`apply_lora` and the check of LoRA
target modules against a loaded model.

Only a Hub model not yet in the Hugging Face cache is downloaded (:func:`.model_sources.model_folder`);
transformers itself always loads from a local folder (``local_files_only=True``), reads safetensors only
and keeps ``trust_remote_code`` off unless asked.  The loaded model's ``name_or_path`` stays that local
folder (PEFT's saves compare the vocabulary with its ``config.json`` there, without the network); the
final adapter names its base as the user did (:func:`.outputs.save_adapter`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..compat import enable_checkpointing, is_checkpointing, kbit_training_kwargs
from .model_sources import ModelLoadError, model_folder, smollm2_path
from .tiny import build_tiny_llama

logger = logging.getLogger(__name__)

__all__ = ["ModelLoadError", "apply_lora", "load_model", "pick_attn_implementation", "resolve_dtype",
           "smollm2_path", "target_modules_problem"]  # fmt: skip


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
    """Load ``(model, tokenizer)``: ``tiny``, ``smollm2-135m``, a local save_pretrained folder or a Hub
    model ID (from the Hugging Face cache, downloaded there unless ``HF_HUB_OFFLINE=1``).

    4-bit loads NF4 with double quantization, compute and storage dtype ``dtype``.  Errors about the
    request itself (unknown path, no config.json, no safetensors, a Hub model missing offline, no
    bitsandbytes) are one-line :class:`ModelLoadError`s raised before transformers is involved.
    """
    torch_dtype = resolve_dtype(dtype)
    attn = pick_attn_implementation(attn_implementation)
    name = str(name_or_path)
    if load_in_4bit:
        _bnb_config(torch_dtype)  # fail early and clearly
    path = model_folder(name, cache_dir, trust_remote_code=trust_remote_code)
    if path is None:
        model, tok = _load_tiny(torch_dtype, load_in_4bit, attn)
    else:
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
