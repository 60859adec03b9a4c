# Everything a user runs. `make demo` and `make test` set up the environment themselves.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PYTHONPATH := $(CURDIR)/code

.PHONY: help install test lint demo clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools<82" wheel

$(VENV)/.installed: $(BIN)/python requirements/*.txt pyproject.toml
	$(BIN)/pip install -q -r requirements/dev.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed ## create .venv with the pinned dependencies and the package

test: install ## run the test suite (what CI runs)
	$(BIN)/pytest -q

lint: install ## ruff on the code, scripts and tests
	$(BIN)/ruff check code scripts tests

DATA ?=
MODEL ?=
WEIGHTS ?=
demo: install ## sample data -> train -> serve -> predict, on this machine (DATA=, MODEL=, WEIGHTS= for your own)
	$(BIN)/python scripts/demo.py $(if $(DATA),--data $(DATA)) $(if $(MODEL),--model $(MODEL)) $(if $(WEIGHTS),--weights $(WEIGHTS))

clean:
	rm -rf $(VENV) demo-output .pytest_cache
