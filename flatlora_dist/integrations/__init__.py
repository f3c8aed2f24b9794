"""Flat-LoRA inside other training tools: each module is imported only by its tool (never by the core).

``axolotl``: an axolotl plugin (``plugins: [flatlora_dist.integrations.axolotl.FlatLoRAPlugin]``).
``llamafactory``: ``flatlora-llamafactory train cfg.yaml``, LLaMA-Factory's ``run_exp`` with the callback.
"""
