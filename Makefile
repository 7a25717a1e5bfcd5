# One obvious way to run each thing. Every target sets up .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench bench-scale sandbox chaos clean

# The product (with its dev tools) and the local Attentive sandbox, its own distribution in sandbox/.
$(STAMP): pyproject.toml sandbox/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -e ./sandbox
	touch $(STAMP)

install: $(STAMP)

## Run the whole test suite (unit + integration; Redis on TEST_REDIS_URL, default 127.0.0.1:6379, else a private one).
test: $(STAMP)
	$(BIN)/python -m pytest

## ruff (lint and format), mypy strict, import-linter (imports flow one way; see pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## Run the export end to end on embedded defaults against the local sandbox.
demo: $(STAMP)
	$(BIN)/attentive-export demo

bench: $(STAMP)
	$(BIN)/python -m bench

## 1,000,000 users backfilled at Attentive's pace with real-time changes throughout (bench/bench_scale.py;
## SCALE_ARGS="--quick" for 100,000 users, "--users N", "--help"); its section of bench/RESULTS.md.
bench-scale: $(STAMP)
	$(BIN)/python -m bench scale $(SCALE_ARGS)

## Seeded fault-injection run of the whole product, under ten minutes (tests/chaos/; CHAOS_ARGS="--seed 2").
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

## Start the local Attentive sandbox on :8787 with token "demo-key".
sandbox: $(STAMP)
	$(BIN)/python -m sandbox --port 8787 --token demo-key

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
