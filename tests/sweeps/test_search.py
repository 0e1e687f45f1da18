"""The search mode: TPE trials are real fits whose knobs reach the resolved config, with pruning reports at the
optimizer step (the stock Lightning callback would report every validation at epoch 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweeps.search import main


@pytest.mark.slow
def test_search_trial_reports_per_step_and_applies_its_knobs(tiny_policy_dir: str, tmp_path: Path) -> None:
    sets = [f"--model.init_args.policy={tiny_policy_dir}", "--build_base_policy=false",
            "--data.init_args.questions_per_step=2", "--data.init_args.world.train_size=4",
            "--data.init_args.world.val_size=4", "--data.init_args.val_batch_size=4",
            "--model.init_args.train_sampling.max_new_tokens=6", "--model.init_args.val_sampling.max_new_tokens=6"]
    study = main(["--out", str(tmp_path), "--trials", "1", "--steps", "2", "--val-every", "1",
                  *[f"--set={s}" for s in sets]])
    (trial,) = study.trials
    assert sorted(trial.intermediate_values) == [1, 2]  # one report per validation, at the global step
    assert trial.value == trial.intermediate_values[2]
    cfg = yaml.safe_load((Path(trial.user_attrs["run_dir"]) / "config.yaml").read_text())
    adv = cfg["model"]["init_args"]["advantage"]["init_args"]
    assert adv["k"] == pytest.approx(trial.params["k"])
    assert adv["rrb"] == (None if trial.params["rrb"] == "null" else trial.params["rrb"])
    assert cfg["data"]["init_args"]["num_variants"] == trial.params["num_variants"]
    diff = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("DifficultyCallback"))
    assert diff["init_args"]["eta"] == pytest.approx(trial.params["eta"])
