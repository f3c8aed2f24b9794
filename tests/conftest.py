"""Shared fixtures: tiny PEFT models built from configs (no downloads), weight fingerprints."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

# Without a GPU the fused Triton kernels run in Triton's interpreter, which must be chosen before anything
# imports triton (bitsandbytes does, through peft): triton.language's own @jit helpers (randn, philox) are
# decorated at that import.  torch's import does not load triton, so asking torch about CUDA is safe here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from flatlora_dist.train.tiny import TINY_LLAMA_SHAPE  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

# tests/integrations/<tool>/ run only inside that tool's own environment (make test-integrations sets
# FLATLORA_INTEGRATION=<tool>); the main suite collects none of them.
_TOOL = os.environ.get("FLATLORA_INTEGRATION", "")
collect_ignore_glob = [f"integrations/{d}/*" for d in ("axolotl", "llamafactory") if d != _TOOL]

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0, targets=None, r: int = 4):
    """A random Llama of the ``tiny`` model's shape (2 layers, hidden 64; vocabulary 128, no tokenizer)
    wrapped with PEFT LoRA; B is randomised so BA != 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, **TINY_LLAMA_SHAPE, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets or ALL_PROJ))
    randomise_lora_b(model, seed)
    return model


def randomise_lora_b(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def fingerprint(model, frozen_only: bool = True) -> str:
    """sha256 over the raw bytes of every (frozen) parameter, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if frozen_only and p.requires_grad:
            continue
        h.update(name.encode())
        t = p.detach().contiguous().view(-1)
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def tiny():
    return tiny_llama()
