"""The GPU check's arithmetic, and its code path on a CPU (the GPU run itself is recorded in docs/gpu.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402

DIMS = {"hidden_size": 4, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 8,
        "vision_depth": 1, "vision_hidden_size": 2, "vision_intermediate_size": 4, "vocab": 10}


def test_flops_by_component_hand_worked() -> None:
    r = {"sequence_lengths": [3, 5], "image_patches": [], "generated_tokens": 4}
    f = gpu_check.step_flops(r, DIMS)
    # per token: 2 x (q, o: 2 x 4 x 4 = 32; k, v: 2 x 4 x 2 = 16; gated MLP: 3 x 4 x 8 = 96) = 288; 8 tokens
    assert f["text_layers"] == 288 * 8
    assert f["attention"] == 2 * 1 * (3**2 + 5**2) * 4  # causal: 2 L^2 d per layer and sequence
    assert f["lm_head"] == 2 * 4 * 10 * 4  # only the 4 scored (completion) positions
    assert f["vision"] == 0
    assert f["update_total"] == 3 * (2304 + 272 + 320)
    # one image of 4 patches, one full-attention block of width 2: linear 320 + attention 128 + patch embedding
    # 2 x 4 x (3 x 2 x 14 x 14) x 2 = 18,816 + merger 2 x 1 x (8 x 8 + 8 x 4) = 192
    assert gpu_check.vision_flops(4, DIMS) == 320 + 128 + 18_816 + 192


def test_summary_takes_medians_and_reports_easyr1_figures() -> None:
    def step(update_s: float) -> dict:
        return {"responses": 80, "generated_tokens": 40_000, "mean_response_tokens": 500.0, "max_response_tokens": 1024,
                "update_tokens": 60_000, "sequence_lengths": [750] * 80, "image_patches": [1024] * 16,
                "timings_s": {"rollout": 20.0, "update": update_s, "reward": 0.1, "advantage": 0.01},
                "step_s": 30.0, "world_size": 1, "peak_memory_gib": None}

    steps = [step(10.0), step(12.0), step(100.0)]  # one slow outlier: the median ignores it
    out = gpu_check.summarise(steps, "NVIDIA H200", gpu_check.SIZES["3b"], "HF generate")
    assert out["update_s"] == 12.0 and out["tokens_per_s_per_gpu"] == 2000.0
    assert out["rollout_tokens_per_s"] == 2000.0
    assert out["s_per_2560_step_extrapolated"] == pytest.approx(30.0 * 320 / 80)
    flops = gpu_check.step_flops(steps[0], gpu_check.SIZES["3b"])
    assert out["update_tflops_per_s"] == pytest.approx(flops["update_total"] / 12.0 / 1e12)
    assert out["update_mfu"] == pytest.approx(out["update_tflops_per_s"] / 989.4)
    assert gpu_check.summarise(steps, "cpu", gpu_check.SIZES["3b"], "HF generate")["update_mfu"] is None


def test_drawn_lengths_are_a_long_tail_within_the_budget() -> None:
    lengths = gpu_check.draw_lengths(20_000, 2048, 0.25, torch.Generator().manual_seed(0)).float()
    assert lengths.min() >= 8 and lengths.max() == 2048  # some responses reach the budget
    assert 0.2 * 2048 < lengths.mean() < 0.3 * 2048  # mean ~ 0.25 x budget (clipping pulls it down a little)
    assert lengths.median() < lengths.mean()  # skewed: a long tail


@pytest.mark.slow
def test_cpu_code_path(tmp_path: Path) -> None:
    # a subprocess: the strategy initialises a process group and launcher variables that must not outlive it
    script = Path(gpu_check.__file__)
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--size", "tiny", "--questions", "2",
                           "--max-new-tokens", "12", "--warmup", "1", "--steps", "2", "--token-budget", "600",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["responses"] == 2 * 2 * 5  # questions x (original + variant) x G
    assert result["timed_steps"] == 2 and result["engine"] == "HF generate"
    assert 0 < result["mean_response_tokens"] < 12  # cut at drawn lengths, not all at the budget
    assert result["update_tokens"] > result["generated_tokens"]  # prompts (with image tokens) count too
    f = result["flops_by_component"]
    assert f["vision"] > 0 and f["attention"] > 0 and f["lm_head"] > 0 and f["text_layers"] > 0
    assert result["tokens_per_s_per_gpu"] > 0 and result["update_mfu"] is None  # no peak known for a CPU
    assert "EasyR1 baseline" in (tmp_path / "gpu_check.md").read_text()
