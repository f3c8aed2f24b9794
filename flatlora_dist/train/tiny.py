"""The built-in ``tiny`` model: a randomly initialised 2-layer Llama (hidden 64) with an in-process
byte-level tokenizer and a ChatML chat template; deterministic given the seed, no files needed."""

from __future__ import annotations

import torch

from .model_sources import ModelLoadError

TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)



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
