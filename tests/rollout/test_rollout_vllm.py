"""The vLLM engine is optional: without vLLM it must fail loudly with the install hint."""

from __future__ import annotations

import importlib.util

import pytest

from diva_lightning.rollout.vllm import VLLMEngine


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_gives_install_hint() -> None:
    with pytest.raises(ImportError, match=r"pip install diva-lightning\[vllm\] on a CUDA machine"):
        VLLMEngine("any/model")
