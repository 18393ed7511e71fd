# diadb: `make demo` and `make test` do all set-up on a fresh machine with Python >= 3.11.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo $$p && break; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install demo test lint format clean services

help:  ## list the targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: Python >= 3.11 is needed"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install diadb with its dev tools

demo: $(STAMP)  ## store and read synthetic visits in an embedded SQLite APDB
	$(BIN)/diadb demo --out build/demo

services:  ## install what the server-backed tests need (PostgreSQL, Cassandra jars, lsst-dax-ppdb)
	bash scripts/services.sh install

test: $(STAMP) lint services  ## lint, type-check, install servers and run the whole test suite
	$(BIN)/python -m pytest

lint: $(STAMP)  ## ruff (lint + format check) and mypy --strict
	$(BIN)/ruff check diadb tests
	$(BIN)/ruff format --check diadb tests
	$(BIN)/mypy

format: $(STAMP)  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix diadb tests
	$(BIN)/ruff format diadb tests

clean:  ## remove the venv and build outputs
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
