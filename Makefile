# Set-up and the two front-door commands. Everything installs into ./.venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup run test test-gpu

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first and pinned: the CPU build comes from local disk; an unpinned torch pulls CUDA wheels.
setup: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"

# A short SLoPe pretraining run on the embedded corpus (CPU without a GPU, every GPU with).
run: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/deepspeed launch/pretrain.py $(ARGS)

# The CPU test suite (what CI runs), multi-rank DeepSpeed tests included.
test: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q $(ARGS)

# GPU tests (run on a CUDA machine).
test-gpu:
	$(PY) -m pytest -q -m gpu $(ARGS)
