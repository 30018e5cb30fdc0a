# Set-up and the two main commands. Everything installs into .venv from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= .models/tiny-llama
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

$(MODEL)/config.json: | $(BIN)/.installed
	$(BIN)/pdserve make-tiny-model $(MODEL)

demo: $(BIN)/.installed $(MODEL)/config.json
	$(BIN)/pdserve generate --model $(MODEL) --max-tokens 32 "The quick brown fox"
	$(BIN)/pdserve generate --model $(MODEL) --max-tokens 16 --temperature 0.8 --seed 7 --json "Once upon a time"

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-quick: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
