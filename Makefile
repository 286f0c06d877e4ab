# Porten: `make run` sets everything up and starts the stack; `make test` runs the whole suite.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.porten-installed

.PHONY: run test setup bench-planner

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing Python dependencies into $(VENV) (the first time builds llama.cpp from source: 5-10 minutes)..."
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[local,test]'
	@touch $(STAMP)

setup: $(STAMP)
	@bash scripts/system_deps.sh redis

run: setup
	@bash scripts/run.sh

test: setup
	@bash scripts/system_deps.sh redis chromium
	$(PY) -m pytest
