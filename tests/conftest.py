"""Shared test setup: quiet, offline, deterministic, and never writing outside tmp dirs."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from diva_lightning.models.policy import PolicyBundle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _wandb_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path_factory.getbasetemp() / "wandb"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(base))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained tiny Qwen2.5-VL whose tokenizer covers the world's text (built in ~1 s)."""
    from diva_lightning.data.world import generate_world, world_corpus
    from diva_lightning.models.tiny import build_tiny_policy

    out = tmp_path_factory.mktemp("tiny_policy")
    build_tiny_policy(out, world_corpus(generate_world(300, seed=0, split="train")), seed=0)
    return str(out)


@pytest.fixture(scope="module")
def bundle(tiny_policy_dir: str) -> PolicyBundle:
    """The tiny policy of ``tiny_policy_dir``, loaded once per test module (tests that change the model copy it)."""
    from diva_lightning.models.policy import load_policy

    return load_policy(tiny_policy_dir)
