# Two commands do everything on a fresh machine:
#   make demo   set up, then segment a built-in synthetic whole-slide image
#   make test   set up, lint (make lint), then run the test suite
# Set-up is a virtual environment in .venv. Where no NVIDIA GPU is visible,
# torch is installed as the pinned CPU build first (TORCH_SPEC), so the generic
# requirement in pyproject.toml is already satisfied and no multi-GB CUDA build
# is pulled; with a GPU, pip's default (CUDA) build is taken. Override with
#   make setup TORCH_SPEC="torch==2.5.1" TORCH_PIP_ARGS="--index-url <your index>"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed
OUT ?= out/demo
PYTEST_ARGS ?=

.PHONY: setup demo test lint proto proto-check benchmark clean groovy lint-groovy

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch with CUDA"; \
		$(PIP) install -q "torch>=2.2" $(TORCH_PIP_ARGS); \
	else \
		echo "no NVIDIA GPU found: installing $(TORCH_SPEC) (CPU build where available)"; \
		$(PIP) install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS); \
	fi
	$(PIP) install -q -e ".[dev]"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/dannucnet demo --out $(OUT)

test: lint groovy
	$(PY) -m pytest $(PYTEST_ARGS)

# Python style and correctness (rules in pyproject.toml [tool.ruff]), then types (mypy on the public,
# torch-free modules listed in [tool.mypy]); `make test` runs it first. The Groovy scripts have their
# own linter: lint-groovy.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# QuPath scripts: npm-groovy-lint (from the npm registry, pinned in package-lock.json) brings
# CodeNarc and the Groovy 4 that tests/test_qupath_scripts.py runs the scripts' QuPath-free parts
# with. Without npm those tests skip and say why.
GROOVY_STAMP := node_modules/.installed
groovy: $(GROOVY_STAMP)

$(GROOVY_STAMP): package.json package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --no-audit --no-fund && touch $@; \
	else \
		echo "npm not found: skipping npm-groovy-lint (the QuPath script tests will skip)"; \
	fi

lint-groovy: groovy
	npx --no-install npm-groovy-lint --noserver --path qupath_scripts --files "**/*.groovy" \
		--config qupath_scripts/.groovylintrc.json --failon warning

proto: setup
	$(PY) -m dannucnet.service.codegen

proto-check: setup
	$(PY) -m dannucnet.service.codegen --check

benchmark: setup
	$(PY) benchmarks/bench_segment.py

clean:
	rm -rf $(VENV) out build *.egg-info
