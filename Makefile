# One obvious way to run each thing. Every target sets up .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench sandbox clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the whole test suite (unit + integration; integration needs Redis on REDIS_URL, default 127.0.0.1:6379).
test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Run the export end to end on embedded defaults against the local sandbox.
demo: $(STAMP)
	$(BIN)/attentive-export demo

bench: $(STAMP)
	$(BIN)/python -m bench

## Start the local Attentive sandbox on :8787 with token "demo-key".
sandbox: $(STAMP)
	$(BIN)/python -m sandbox --port 8787 --token demo-key

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
