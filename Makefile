# Set-up and the two main commands. Everything installs into .venv from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without an NVIDIA GPU, pin the CPU build of torch.
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints-cpu.txt)
export OMP_NUM_THREADS ?= 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-quick lint

$(BIN)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(CONSTRAINTS) -e '.[test]'
	touch $@

setup: $(BIN)/.installed

# The main job: the local cluster of deploy/local.yaml (creating its tiny model if missing),
# a few requests streamed through the gRPC client, then a clean shutdown.
demo: $(BIN)/.installed
	$(BIN)/pdserve demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-quick: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
