"""reports/revalidate.py on a real (tiny) fit's run folder: the decoding override reaches validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from diva_lightning.cli import run_cli
from reports.revalidate import Score, decoding_args, revalidate, write
from tests.test_module import small_args


def test_revalidate_a_run_folder_under_sampled_decoding(tiny_policy_dir: str, tmp_path: Path) -> None:
    from tests.helpers import rewards

    sweep = tmp_path / "sweep"
    args = small_args(tiny_policy_dir, sweep / "runs", "--trainer.logger.init_args.name", "full",
                      "--trainer.logger.init_args.version", "seed0-t0", steps=1)
    args[args.index("tests.helpers.rewards.contains_digit")] = "tests.helpers.rewards.counting_contains_digit"
    run_cli(args)
    run = sweep / "runs" / "full" / "seed0-t0"
    assert (run / "config.yaml").is_file() and (run / "policy" / "config.json").is_file()
    rewards.GRADED.clear()
    scores = revalidate(sweep, decoding_args(0.8, 0.95, 2) + ["--model.init_args.val_sampling.max_new_tokens", "6"])
    assert [(s.row, s.run) for s in scores] == [("base", "-"), ("full", "seed0-t0")]
    # base and trained policy each answer 8 validation questions x 2 samples, graded by the run's own reward
    assert len(rewards.GRADED) == 2 * 8 * 2
    base_hits = sum(rewards.contains_digit(r, "") for r in rewards.GRADED[:16]) / 16
    assert scores[0].accuracy == pytest.approx(base_hits)
    md = write(scores + [Score("full", "seed1", 0.5)], sweep / "revalidate_x0.6", "title")
    assert md.name == "revalidate_x0.6.md" and (sweep / "revalidate_x0.6.csv").is_file()
    assert f"| full | 2 | {(scores[1].accuracy + 0.5) / 2:.3f} ± " in md.read_text()
    assert f"| base | 1 | {scores[0].accuracy:.3f} | " in md.read_text()  # one run: no spread shown
    with pytest.raises(FileNotFoundError, match="no runs/<row>/<seed>/config.yaml"):
        revalidate(tmp_path / "empty", [])
