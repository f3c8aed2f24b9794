"""PEFT LoRA as the DeepSpeed and FSDP workers' tiny models get it (``ds_common``/``fsdp_common.tiny_model``),
and the input-gradient probe both workers' functional checks use."""

from __future__ import annotations

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_lora(model, r: int, seed: int):
    """``model`` under PEFT LoRA (rank ``r``, alpha ``2r``) on all projections, every B drawn
    N(0, 0.05²) from a generator seeded ``seed + 1``: identical on every rank for the same seed."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL_PROJ))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 would make s*BA vanish from the norms
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    return model


def capture_input_grad(model):
    """Hook the token embedding so its output is a leaf that requires grad: after backward, that leaf's
    ``.grad`` is the gradient of the loss with respect to the transformer's input (it flows back through
    every base weight).  Returns ``(hook handle, list of the leaves, one per forward)``."""
    emb = next(m for n, m in model.named_modules() if n.endswith("embed_tokens"))
    store = []

    def hook(module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        store.append(leaf)
        return leaf

    return emb.register_forward_hook(hook), store
