"""Flat-LoRA fine-tuning that works under DeepSpeed ZeRO-3, PyTorch FSDP and QLoRA."""

from .config import FlatLoRAConfig
from .engine import FlatLoRA
from .noise import noise_range
from .schedule import noise_factor
from .versions import warn_untested

__all__ = ["FlatLoRA", "FlatLoRAConfig", "noise_factor", "noise_range"]
__version__ = "0.1.0"

warn_untested()
