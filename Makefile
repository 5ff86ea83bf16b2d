# The README's two commands: `make run` (the gateway end to end on the embedded defaults) and
# `make test` (the suite). Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

run: $(VENV)/.run
	$(BIN)/mailgate demo

# four workers: most tests wait on sockets and timers, so they overlap well even on two cores
test: $(VENV)/.test
	$(BIN)/pytest -n 4

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(VENV)/.bench
	$(BIN)/python bench/run_all.py

$(VENV)/.run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.run

$(VENV)/.bench: pyproject.toml $(VENV)/.test
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

clean:
	rm -rf $(VENV) var build dist .pytest_cache .mypy_cache .ruff_cache
