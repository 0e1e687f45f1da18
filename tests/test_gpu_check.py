"""The GPU check's arithmetic, and its code path on a CPU (the GPU run itself is recorded in docs/gpu.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402


def test_summary_arithmetic() -> None:
    raw = {"generated_tokens": 40_000, "update_tokens": 60_000, "non_embedding_params": 3_000_000_000,
           "timings_s": {"rollout": 20.0, "update": 10.0, "reward": 0.1, "advantage": 0.01}}
    out = gpu_check.summarise(raw, "NVIDIA H200")
    assert out["rollout_tokens_per_s"] == 2000 and out["update_tokens_per_s"] == 6000
    # 6 * 3e9 * 6e4 / 10 s = 1.08e14 FLOP/s = 108 TFLOP/s; / 989.4 = 10.9 %
    assert out["update_tflops_per_s"] == pytest.approx(108.0)
    assert out["update_mfu"] == pytest.approx(108.0 / 989.4)
    assert gpu_check.summarise(raw, "cpu")["update_mfu"] is None


@pytest.mark.slow
def test_cpu_code_path(tmp_path: Path) -> None:
    # a subprocess: the strategy initialises a process group and launcher variables that must not outlive it
    script = Path(gpu_check.__file__)
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--size", "tiny", "--questions", "2",
                           "--max-new-tokens", "6", "--out", str(tmp_path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["responses"] == 2 * 2 * 5  # questions x (original + variant) x G
    assert 0 < result["mean_response_tokens"] <= 6
    assert result["update_tokens"] > result["generated_tokens"]  # prompts (with image tokens) count too
    assert "rollout (HF generate)" in (tmp_path / "gpu_check.md").read_text()
