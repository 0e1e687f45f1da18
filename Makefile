# Two commands on a fresh clone: `make run` (main job on the embedded default) and `make test`.
# Both create .venv when missing and install the project: torch first (CPU build, pinned by
# constraints.txt so nothing later pulls a CUDA torch), then the project with its dev extra.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
CONFIG ?= experiments/full.yaml
PYTEST_ARGS ?=

export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: setup run test test-slow test-all lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt "torch==2.13.0"
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m diva_lightning fit --config $(CONFIG)

# Fast suite (< 10 min on 2 cores): everything not marked slow.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Integration tests that train, resume, spawn DDP processes or run sweeps (CI runs these too).
test-slow: $(STAMP)
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check diva_lightning tests sweeps benchmarks
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache
