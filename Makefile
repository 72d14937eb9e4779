# fieldreg — every target creates and uses its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check lint typecheck bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: a hub on SQLite, two field devices registering offline, a sync, and what the hub then holds
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

## check: lint and type-check
check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check schemas sync server field_client tests bench scripts
	$(BIN)/ruff format --check schemas sync server field_client tests bench scripts

typecheck: $(STAMP)
	$(BIN)/mypy

## test: lint, types, then the whole pytest suite (what CI runs)
test: check
	$(BIN)/pytest -q

## soak: the crash-safety tests with many more kill -9s (FIELDREG_SOAK_KILLS, default 200)
SOAK_KILLS ?= 200
soak: $(STAMP)
	FIELDREG_SOAK_KILLS=$(SOAK_KILLS) $(BIN)/pytest -q -s tests/test_crash.py

## bench: print the benchmark figures and ratios (not part of test)
bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
