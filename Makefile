# Porten: `make run` sets everything up and starts the stack; `make test` runs the whole suite.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.porten-installed
# llama.cpp is built from source for this machine's x86-64 (AVX2, FMA, F16C), not with -march=native:
# some VMs advertise AMX that the guest cannot use, and a native build then crashes on the first
# token; pip also reuses its cached wheel on whatever CPU the cache later finds itself.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: run test setup bench-planner

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing Python dependencies into $(VENV) (the first time builds llama.cpp from source: 5-10 minutes)..."
	$(PY) -m pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e '.[local,test]'
	@touch $(STAMP)

setup: $(STAMP)
	@bash scripts/system_deps.sh redis

run: setup
	@bash scripts/run.sh

# Two runs: everything on SQLite, as one machine runs, then the multi-node suite on PostgreSQL.
test: setup
	@bash scripts/system_deps.sh redis chromium postgres
	$(PY) -m pytest
	PORTEN_TEST_POSTGRES=1 $(PY) -m pytest tests/multinode
