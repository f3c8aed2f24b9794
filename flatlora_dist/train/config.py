"""The application's configuration: one YAML file plus command-line overrides.

Field names follow ``transformers.TrainingArguments`` wherever one exists, so a Trainer user's flags
work unchanged.  Precedence: built-in defaults < ``--config file.yaml`` < command-line flags.
Unknown keys (in YAML or on the command line) are rejected with the closest valid name.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, get_type_hints

import yaml

from ..config import FlatLoRAConfig

DATA_FORMATS = ("auto", "alpaca", "chat", "sharegpt")


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key and the fix."""


@dataclass
class TrainConfig:
    """Every setting of ``launch/train.py`` (each one is also a ``--flag``)."""

    # what to train
    model: str = field(default="smollm2-135m", metadata={"help": "a local folder, a Hub model ID (from the HF cache; downloaded unless HF_HUB_OFFLINE=1), "
                          "'smollm2-135m' (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32) or 'tiny'"})  # fmt: skip
    task: str = field(default="math", metadata={"help": "built-in task: 'math' or 'sentiment'"})
    data: str | None = field(
        default=None,
        metadata={"help": "training data (overrides task): a .jsonl/.json/.parquet/.csv file, a datasets "
                          "save_to_disk folder or a Hub dataset ID (offline: from the HF cache)"},  # fmt: skip
    )
    eval_data: str | None = field(default=None, metadata={"help": "held-out data for --data (same forms)"})
    val_size: float = field(
        default=0.0,
        metadata={"help": "hold out part of --data when there is no --eval_data: a fraction (< 1) or a count"},
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "'auto', 'alpaca', 'chat' (OpenAI messages) or 'sharegpt' (conversations/from/value)"},
    )
    max_length: int = field(default=256, metadata={"help": "tokens per example (longer ones are truncated)"})
    packing: bool = field(default=False, metadata={"help": "pack examples into max_length blocks"})
    train_limit: int | None = field(
        default=None, metadata={"help": "use at most this many training examples"}
    )
    eval_limit: int | None = field(default=32, metadata={"help": "held-out examples for loss"})
    eval_generate_limit: int = field(
        default=8, metadata={"help": "held-out examples for accuracy (0: skip)"}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "generation budget for math accuracy"})
    # Flat-LoRA
    sigma: float = field(default=0.05, metadata={"help": "noise strength; 0 = plain LoRA"})
    flat_schedule: str = field(default="cosine", metadata={"help": "'cosine' or 'constant'"})
    flat_mode: str = field(default="auto", metadata={"help": "'auto', 'inplace' or 'functional'"})
    flat_seed: int | None = field(default=None, metadata={"help": "noise seed (default: --seed)"})
    # LoRA
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "'all-linear' or a comma list of module names (each must match a layer)"}
    )
    # model loading
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: nf4 4-bit base (needs bitsandbytes)"})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "eager, sdpa, flex_attention, flash_attention_2 (CUDA + flash_attn); "
                          "default: flash_attention_2 if usable, else sdpa"},  # fmt: skip
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow model code from the model folder"}
    )
    # TrainingArguments names
    output_dir: str = field(
        default="outputs/demo", metadata={"help": "where checkpoints, logs and summary go"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an output_dir that holds another run"})
    resume: bool = field(
        default=False, metadata={"help": "continue from the last complete checkpoint (a finished run: nothing to do)"}
    )
    max_steps: int = field(
        default=12,
        metadata={"help": "optimizer steps (overrides num_train_epochs when > 0; <= 0: train num_train_epochs)"},
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs when max_steps <= 0"})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "micro-batch per rank"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "eval batch per rank"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=5e-4, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "HF scheduler name (transformers.SchedulerType)"}
    )
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps for LR warmup, in [0, 1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    seed: int = field(default=42, metadata={"help": "seed for data order, init and (default) noise"})
    bf16: bool = field(default=False, metadata={"help": "bf16 base weights and autocast"})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward"}
    )
    logging_steps: int = field(default=1, metadata={"help": "log every N steps"})
    save_steps: int = field(
        default=0,
        metadata={"help": "checkpoint every N steps (0: none; a SIGTERM stop still writes one, "
                          "the adapter is saved at the end)"},  # fmt: skip
    )
    eval_steps: int = field(
        default=0, metadata={"help": "held-out loss every N steps (0: before/after only)"}
    )
    save_total_limit: int | None = field(default=None, metadata={"help": "keep at most N checkpoints (default: all)"})
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "'none' or a comma list of installed loggers transformers supports "
                          "(tensorboard, wandb, mlflow, ...); metrics.jsonl is always written"},  # fmt: skip
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "data loader workers"})
    # distribution
    ds_config: str | None = field(
        default=None,
        metadata={"help": "DeepSpeed JSON config: a path, or a shipped one by name: zero2, zero3, "
                          "zero3_offload (alias --deepspeed)"},  # fmt: skip
    )
    fsdp: str | None = field(default=None, metadata={"help": "'fsdp2', 'fsdp1' or 'hsdp' under torchrun"})
    merge: bool = field(default=False, metadata={"help": "also write a merged model (single process)"})

    def validate(self) -> None:
        """Cheap checks that need no model, data or heavy import (run before any expensive work).

        Invariant: a config that passes holds only finite numbers, Flat-LoRA settings that
        :class:`FlatLoRAConfig` accepts, and names from the fixed choices below; settings that need
        transformers (scheduler, attention) or the file system are checked by the run's preflight.
        """
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name} must be a finite number, got {value}")
        positive = [
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "lora_r",
            "logging_steps",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "save_steps",
            "eval_steps",
            "eval_generate_limit",
            "max_new_tokens",
            "dataloader_num_workers",
            "weight_decay",
            "max_grad_norm",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("train_limit", "eval_limit", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be > 0 (or left unset), got {getattr(self, name)}")
        if self.max_length < 2:
            raise ConfigError(f"--max_length must be >= 2 (a prompt token and a trained token), got {self.max_length}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set --max_steps > 0 or --num_train_epochs > 0")
        self.flat_config()
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if not self.target_modules():
            raise ConfigError("--lora_target_modules is empty: give 'all-linear' or module names like q_proj,v_proj")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.data_format not in DATA_FORMATS:
            raise ConfigError(f"--data_format must be one of {', '.join(DATA_FORMATS)}, got {self.data_format!r}")
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 are exclusive: pick one")
        if self.overwrite and self.resume:
            raise ConfigError("--overwrite and --resume contradict each other: pick one")
        if self.ds_config and self.fsdp:
            raise ConfigError("--ds_config and --fsdp are exclusive: DeepSpeed or FSDP, not both")
        if self.fsdp not in (None, "fsdp1", "fsdp2", "hsdp"):
            raise ConfigError(f"--fsdp must be 'fsdp1', 'fsdp2' or 'hsdp', got {self.fsdp!r}")
        if self.val_size < 0:
            raise ConfigError(f"--val_size must be >= 0 (a fraction < 1 or a count), got {self.val_size}")
        if self.val_size >= 1 and not float(self.val_size).is_integer():
            raise ConfigError(f"--val_size must be a fraction < 1 or a whole count, got {self.val_size}")
        if self.val_size and not self.data:
            raise ConfigError("--val_size splits --data: give --data FILE (the built-in tasks have held-out data)")
        if self.val_size and self.eval_data:
            raise ConfigError("--val_size and --eval_data both give held-out data: pick one")
        if self.eval_steps and self.data and not (self.eval_data or self.val_size):
            raise ConfigError(
                "--eval_steps needs held-out data: give --eval_data FILE or --val_size 0.1 (or --eval_steps 0)"
            )

    def flat_config(self) -> FlatLoRAConfig:
        """The run's :class:`FlatLoRAConfig` (its own rules, reported under this app's flag names)."""
        flags = {"sigma": "sigma", "schedule": "flat_schedule", "mode": "flat_mode",
                 "seed": "seed" if self.flat_seed is None else "flat_seed"}  # fmt: skip
        try:
            return FlatLoRAConfig(sigma=self.sigma, schedule=self.flat_schedule, mode=self.flat_mode,
                                  seed=self.seed if self.flat_seed is None else self.flat_seed)  # fmt: skip
        except ValueError as e:
            message = str(e)
            for name, flag in flags.items():
                message = message.replace(f"FlatLoRAConfig.{name} ", f"--{flag} ")
            raise ConfigError(message) from None

    def target_modules(self) -> str | list[str]:
        """``'all-linear'`` or the list of module names given in ``lora_target_modules``."""
        if self.lora_target_modules == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.lora_target_modules.split(",") if t.strip()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Names users bring from other tools (short forms, axolotl, LLaMA-Factory) for the TrainingArguments ones.
_ALIASES = {
    "deepspeed": "ds_config",
    "resume_from_checkpoint": "resume",
    "overwrite_output_dir": "overwrite",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "num_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "micro_batch_size": "per_device_train_batch_size",
    "cutoff_len": "max_length",
    "sequence_len": "max_length",
}
_LAUNCHER_ARGS = {"local_rank", "local-rank"}


def _closest(name: str) -> str:
    names = [f.name for f in fields(TrainConfig)]
    match = difflib.get_close_matches(name, names + list(_ALIASES), n=1, cutoff=0.5)
    if not match:
        return f"; valid keys: {', '.join(names)}"
    return f"; did you mean '{_ALIASES.get(match[0], match[0])}'?"


def _coerce(name: str, value: Any, source: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise a one-line ConfigError."""
    hint = get_type_hints(TrainConfig)[name]
    optional = type(None) in getattr(hint, "__args__", ())
    base = next((a for a in getattr(hint, "__args__", (hint,)) if a is not type(None)), hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{source}: '{name}' cannot be empty")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(value, (dict, list)):
            if name == "lora_target_modules" and isinstance(value, list):
                return ",".join(str(v) for v in value)
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{name}' expects {base.__name__}, got {value!r}") from None


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file into a dict of raw values (one-line errors for every problem)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}"
        )
    return data


def _apply(values: dict[str, Any], into: dict[str, Any], source: str) -> None:
    for raw_key, value in values.items():
        key = _ALIASES.get(str(raw_key).replace("-", "_"), str(raw_key).replace("-", "_"))
        if key in _LAUNCHER_ARGS or key == "local_rank":
            continue
        if key == "config":
            continue
        if key not in into:
            raise ConfigError(f"{source}: unknown key '{raw_key}'{_closest(key)}")
        into[key] = _coerce(key, value, source)


def _cli_pairs(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """``--key value`` / ``--key=value`` / bare ``--flag`` (true) pairs, in order; ``--config`` apart."""
    out: dict[str, Any] = {}
    config = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: settings are given as --name value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                value, i = nxt, i + 1
            else:
                value = "true"
        i += 1
        if key == "config":
            config = value
        else:
            out[key] = value
    return config, out


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Build a validated TrainConfig from ``--config file.yaml`` and flag overrides."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        raise SystemExit(0)
    config_path, cli = _cli_pairs(argv)
    values = {f.name: (f.default if f.default is not MISSING else None) for f in fields(TrainConfig)}
    if config_path:
        _apply(load_yaml(config_path), values, config_path)
    _apply(cli, values, "command line")
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def command_name(argv0: str) -> str:
    """The command as the user typed it, for ``--help``'s usage line: ``python -m flatlora_dist.train``
    (``argv0`` is the package's ``__main__.py``), a script as given (``launch/train.py``), or a console
    script's name (``flatlora-train``)."""
    if os.path.basename(argv0) == "__main__.py":
        return "python -m flatlora_dist.train"
    return argv0 if argv0.endswith(".py") else os.path.basename(argv0) or "flatlora-train"


def help_text() -> str:
    import sys

    usage = f"usage: {command_name(sys.argv[0] if sys.argv else '')} [--config FILE.yaml] [--name value ...]"
    lines = [usage, "", "settings:"]
    for f in fields(TrainConfig):
        lines.append(f"  --{f.name:<30} {f.metadata.get('help', '')} (default: {f.default!r})")
    lines += ["", "also accepted: " + ", ".join(f"--{k} (= --{v})" for k, v in _ALIASES.items())]
    return "\n".join(lines)


def config_table() -> str:
    """Markdown table of every setting (for the README)."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for f in fields(TrainConfig):
        rows.append(f"| `{f.name}` | `{f.default!r}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)
