"""Resume is exact whatever the overlay (issue 22): the config the user gives is what runs, a checkpoint records
every setting that defines the run, and a resume that changes one is refused naming it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diva_lightning.callbacks.advantage_monitor import rank_dependent
from diva_lightning.cli import TRACEBACK_ENV, main, run_cli
from diva_lightning.system.checkpointing import RUN_SETTINGS_KEY
from diva_lightning.system.module import DivaGRPOModule

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "experiments"
OVERLAYS = {
    "full": [],
    "grpo": ["--config", str(EXP / "grpo.yaml")],
    **{p.stem: ["--config", str(p)] for p in sorted((EXP / "ablate").glob("*.yaml"))},
    "dapo": ["--config", str(EXP / "grpo.yaml"), "--config", str(EXP / "dapo.yaml")],
    "G4": ["--model.init_args.num_generations", "4"],
}


def tiny_args(policy: str, root: Path, overlay: list[str], steps: int, ckpt_dir: Path) -> list[str]:
    """full.yaml + an overlay at toy size; every step checkpointed into ``ckpt_dir``."""
    return [
        "fit", "--config", str(EXP / "full.yaml"), *overlay,
        "--model.init_args.policy", policy, "--build_base_policy", "false",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "1000",
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.deterministic", "true",
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath", str(ckpt_dir),
        "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1",
        "--data.init_args.questions_per_step", "2", "--data.init_args.world.train_size", "24",
        "--data.init_args.world.val_size", "8", "--data.init_args.world.test_size", "8",
        "--model.init_args.train_sampling.max_new_tokens", "10",
        "--model.init_args.reward.init_args.accuracy_fn", "tests.helpers.rewards.contains_digit",
        "--model.init_args.lr", "1e-2",
    ]


def _metrics(root: Path) -> dict[int, dict[str, str]]:
    """metrics.csv rows by step, timing columns left out (wall-clock differs between runs)."""
    (path,) = root.rglob("metrics.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    out: dict[int, dict[str, str]] = {}
    for row in rows:
        kept = {k: v for k, v in row.items() if v != "" and not k.startswith(("timing/", "time")) and k != "epoch"}
        if kept.get("step"):
            out.setdefault(int(kept.pop("step")), {}).update(kept)
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _fit(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "diva_lightning", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow  # two CLI subprocesses per overlay (~1 min each on 2 busy cores)
@pytest.mark.parametrize("name", list(OVERLAYS))
def test_a_stopped_run_resumed_equals_the_uninterrupted_run(name: str, tiny_policy_dir: str, tmp_path: Path) -> None:
    """`python -m diva_lightning fit` for 4 rounds against the same run stopped after round 2 and resumed from
    its checkpoint with the same command line: the same metrics for rounds 3-4 and the same final weights."""
    overlay = OVERLAYS[name]
    _fit(tiny_args(tiny_policy_dir, tmp_path / "full", overlay, 4, tmp_path / "ck_full"), tmp_path)
    (stopped,) = (tmp_path / "ck_full").glob("*step=2.ckpt")
    _fit(tiny_args(tiny_policy_dir, tmp_path / "resumed", overlay, 4, tmp_path / "ck_resumed")
         + ["--ckpt_path", str(stopped)], tmp_path)
    full, resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    assert sorted(resumed) == [2, 3]  # steps are 0-based in metrics.csv: rounds 3 and 4 only
    for step in (2, 3):
        assert {k: full[step].get(k) for k in resumed[step]} == resumed[step], step
        # a metric only some rounds have (e.g. variant_rescue_rate) shows in the uninterrupted run's CSV rows
        # after the round that had it: the resumed run never saw that round
        assert all(rank_dependent(k) for k in full[step].keys() - resumed[step].keys()), step
    (a,) = (tmp_path / "ck_full").glob("*step=4.ckpt")
    (b,) = (tmp_path / "ck_resumed").glob("*step=4.ckpt")
    wa, wb = _state(a), _state(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    # the updates were real: the weights moved between the stop and the end
    w2 = _state(stopped)
    assert any(not torch.equal(w2[k], wa[k]) for k in wa)


def test_a_changed_setting_is_refused_naming_each_difference(tiny_policy_dir: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    ck = tmp_path / "ck"
    cli = run_cli(tiny_args(tiny_policy_dir, tmp_path / "run", [], 1, ck))
    (ckpt,) = ck.glob("*step=1.ckpt")
    record = torch.load(ckpt, map_location="cpu", weights_only=True)[RUN_SETTINGS_KEY]
    assert record["model.init_args.advantage.class_path"] == "diva_lightning.training.estimators.DivaAdvantage"
    assert record["model.init_args.num_generations"] == 5
    assert record["data.init_args.num_variants"] == 1
    assert "hyper_parameters" not in torch.load(ckpt, map_location="cpu", weights_only=True)
    assert cli.trainer.global_step == 1
    # the GRPO overlay on a DIVA checkpoint: estimator, G, variants and the difficulty callback all differ
    resume = tiny_args(tiny_policy_dir, tmp_path / "grpo", OVERLAYS["grpo"], 2, tmp_path / "ck2")
    with pytest.raises(SystemExit):
        main([*resume, "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert f"cannot resume from {ckpt}:" in err
    for line in ("  model.init_args.advantage.class_path: checkpoint "
                 "'diva_lightning.training.estimators.DivaAdvantage', "
                 "now 'diva_lightning.training.estimators.GRPOAdvantage'",
                 "  model.init_args.num_generations: checkpoint 5, now 10",
                 "  data.init_args.num_variants: checkpoint 1, now 0",
                 "  trainer.callbacks.DifficultyCallback: checkpoint {'rule': 'linear', 'eta': 4.0, "):
        assert line in err
    assert "init_args.rrb" not in err  # the estimator's arguments differ because its class does: one line
    assert "--allow_changed_settings true" in err


@pytest.mark.slow  # three short fits
def test_allowed_changes_run_what_the_command_line_says(tiny_policy_dir: str, tmp_path: Path) -> None:
    """Evaluation settings may change on resume, and so may any setting with the switch; both run (and save in
    config.yaml) what the command line says."""
    ck = tmp_path / "ck"
    run_cli(tiny_args(tiny_policy_dir, tmp_path / "run", [], 1, ck))
    (ckpt,) = ck.glob("*step=1.ckpt")
    same = tiny_args(tiny_policy_dir, tmp_path / "again", [], 2, tmp_path / "ck3")
    cli = run_cli([*same, "--model.init_args.val_sampling.temperature", "0.7", "--ckpt_path", str(ckpt)])
    assert cli.trainer.global_step == 2 and cli.model.val_sampling.temperature == 0.7
    changed = tiny_args(tiny_policy_dir, tmp_path / "g4", [], 2, tmp_path / "ck4")
    cli = run_cli([*changed, "--model.init_args.num_generations", "4", "--allow_changed_settings", "true",
                   "--ckpt_path", str(ckpt)])
    assert isinstance(cli.model, DivaGRPOModule) and cli.model.num_generations == 4
    saved = (Path(cli.trainer.log_dir) / "config.yaml").read_text()
    assert "num_generations: 4" in saved and "class_path: diva_lightning.training.estimators.DivaAdvantage" in saved


@pytest.mark.slow
def test_evaluation_from_a_checkpoint_uses_the_decoding_asked_for(tiny_policy_dir: str, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    run_cli(tiny_args(tiny_policy_dir, tmp_path / "run", OVERLAYS["grpo"], 1, ck))
    (ckpt,) = ck.glob("*step=1.ckpt")
    args = tiny_args(tiny_policy_dir, tmp_path / "val", OVERLAYS["grpo"], 1, ck)
    args[0] = "validate"
    args = [a for a in args if a != "--trainer.limit_val_batches" and a != "0"]
    cli = run_cli([*args, "--trainer.limit_val_batches", "1", "--model.init_args.val_sampling.temperature", "0.9",
                   "--model.init_args.val_sampling.top_p", "0.8", "--ckpt_path", str(ckpt)])
    assert cli.model.val_sampling.temperature == 0.9 and cli.model.val_sampling.top_p == 0.8
    assert type(cli.model.advantage).__name__ == "GRPOAdvantage"


def test_memory_and_speed_settings_are_not_run_defining() -> None:
    """A resume after an out-of-memory error may change the layout and the engine's memory (equal losses either
    way), but a change of G is still a difference."""
    from diva_lightning.system.checkpointing import run_settings, settings_differences

    def config(g: int, padding_free: bool, budget: int | None, kv: int) -> dict:
        return {"seed_everything": 0, "data": {}, "trainer": {},
                "model": {"class_path": "diva_lightning.system.module.DivaGRPOModule",
                          "init_args": {"num_generations": g,
                                        "policy_config": {"padding_free": padding_free,
                                                          "max_tokens_per_micro_batch": budget,
                                                          "attn_implementation": "sdpa"},
                                        "rollout": {"class_path": "diva_lightning.rollout.vllm.VLLMEngine",
                                                    "init_args": {"cpu_kv_cache_gib": kv,
                                                                  "gpu_memory_utilization": 0.4}}}}}

    recorded = run_settings(config(5, True, None, 1))
    assert settings_differences(recorded, run_settings(config(5, False, 4096, 2))) == []
    changed = settings_differences(recorded, run_settings(config(4, True, None, 1)))
    assert len(changed) == 1 and "num_generations" in changed[0]
