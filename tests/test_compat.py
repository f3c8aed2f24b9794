"""The named shims of ``flatlora_dist.compat`` on the installed stack: each gives keywords the installed
transformers/peft accept without a deprecation warning, and they do what they say.  CI runs this file
on both ends of the tested range (``make test`` and ``make test-floor``)."""

from __future__ import annotations

import inspect
import warnings

import pytest

from flatlora_dist.compat import (
    checkpointing_arguments,
    enable_checkpointing,
    is_checkpointing,
    kbit_training_kwargs,
)


@pytest.mark.parametrize("enabled", [True, False])
def test_checkpointing_arguments_switch_checkpointing_without_a_deprecation(tmp_path, enabled):
    from transformers import TrainingArguments

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **checkpointing_arguments(enabled))
    on = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None)
    assert bool(on) is enabled
    if enabled:
        kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
        assert kwargs == {"use_reentrant": False}


def test_enable_checkpointing_is_seen_by_is_checkpointing():
    from flatlora_dist.train.tiny import build_tiny_llama

    model, _ = build_tiny_llama(seed=0)
    assert not is_checkpointing(model)
    enable_checkpointing(model)
    assert is_checkpointing(model)


def test_kbit_training_kwargs_are_what_the_installed_peft_takes():
    from peft import prepare_model_for_kbit_training

    kwargs = kbit_training_kwargs(True)
    params = inspect.signature(prepare_model_for_kbit_training).parameters
    assert set(kwargs) <= set(params) and kwargs["use_gradient_checkpointing"] is True
    from flatlora_dist.train.tiny import build_tiny_llama

    model, _ = build_tiny_llama(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        prepare_model_for_kbit_training(model, **kwargs)  # a dense model: checks the keywords only
