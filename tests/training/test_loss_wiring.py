"""The loss switches reach the update through the real CLI: truncation masking and the GSPO ratio."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from diva_lightning.cli import run_cli
from tests.test_module import _recorder, small_args


def _weights(cli: object) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in cli.model.policy.named_parameters()}  # type: ignore[attr-defined]


def _logged(cli: object, key: str) -> float:
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:  # type: ignore[attr-defined]
        return float(next(r for r in csv.DictReader(f) if r.get(key))[key])


@pytest.mark.parametrize("masked", [True, False])
def test_truncated_responses_leave_the_loss(tiny_policy_dir: str, tmp_path: Path, masked: bool) -> None:
    """One on-policy step (ratio 1): the token-mean loss is -sum(A_i * len_i) / sum(len_i) over the responses that
    count, i.e. only the finished ones when `mask_truncated_completions` is on (TRL's behaviour)."""
    args = ["--model.init_args.train_sampling.max_new_tokens", "2",
            "--model.init_args.loss.mask_truncated_completions", str(masked).lower()]
    cli = run_cli(small_args(tiny_policy_dir, tmp_path, *args, steps=1))
    out = _recorder(cli.trainer).outputs[0]
    truncated, adv = out["truncated"], out["advantages"].double()
    lengths = out["completion_lengths"].double()
    assert bool(truncated.any()) and not bool(truncated.all())  # a 2-token budget cuts some responses, not all
    keep = ~truncated if masked else torch.ones_like(truncated)
    expected = -(adv * lengths)[keep].sum() / lengths[keep].sum()
    assert _logged(cli, "loss/policy") == pytest.approx(float(expected), abs=1e-6)
    assert _logged(cli, "completions/clipped_ratio") == pytest.approx(float(truncated.double().mean()))


@pytest.mark.slow
def test_sequence_ratio_equals_token_ratio_on_policy_and_differs_after(tiny_policy_dir: str, tmp_path: Path) -> None:
    """GSPO's gradient equals the token-level one when the ratio is 1 (one on-policy step), and not once the
    second PPO epoch runs off-policy: the switch really reaches the loss."""
    runs = {}
    for level in ("token", "sequence"):
        for epochs in (1, 2):
            args = ["--model.init_args.loss.ratio_level", level, "--model.init_args.ppo_epochs", str(epochs)]
            runs[level, epochs] = _weights(run_cli(small_args(tiny_policy_dir, tmp_path / f"{level}{epochs}", *args,
                                                              steps=1)))
    for name, p in runs["token", 1].items():
        torch.testing.assert_close(p, runs["sequence", 1][name], atol=1e-6, rtol=1e-5)
    assert any(not torch.allclose(p, runs["sequence", 2][n], atol=1e-6) for n, p in runs["token", 2].items())
