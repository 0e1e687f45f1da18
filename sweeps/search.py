"""TPE search over DIVA's own knobs with pruning on `val/accuracy` (Optuna's Lightning integration).

    python sweeps/search.py --trials 30 --steps 60 --val-every 10
    python sweeps/search.py --storage sqlite:///outputs/search/study.db --study diva-search   # resumable, shareable

Searched: k, eta, V (num_variants), band, RRB mode, local/global weights (see `suggest`). Each trial is an
in-process `run_cli` fit (unlike the ablation's subprocesses): the pruning callback must hold the live
`optuna.Trial` inside the Trainer. Objective: the final `val/accuracy`.

Deviation from the stock `PyTorchLightningPruningCallback`: it reports at `current_epoch`, but a DIVA run is one
long epoch validated every N steps, so every report would land on step 0 and the pruner would see one value.
`StepPruningCallback` reports at `trainer.global_step` instead (single process; with DDP use the stock one).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import optuna  # noqa: E402
import yaml  # noqa: E402
from optuna_integration import PyTorchLightningPruningCallback  # noqa: E402
from typing_extensions import override  # noqa: E402

from diva_lightning.core.choices import RRB_MODES  # noqa: E402
from sweeps._common import BASE_CONFIG, REPO  # noqa: E402


class StepPruningCallback(PyTorchLightningPruningCallback):
    """Optuna's Lightning pruning callback, reporting at the optimizer step (see module docstring)."""

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is None:
            raise KeyError(f"StepPruningCallback: {self.monitor!r} was not logged by validation")
        self._trial.report(float(score), step=trainer.global_step)
        if self._trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {trainer.global_step} ({self.monitor}={float(score):.3f})")


def suggest(trial: optuna.Trial, overlay_dir: Path) -> list[str]:
    """The search space as CLI arguments (design.md sections 3-5 name every knob).

    eta lives on the DifficultyCallback, one element of the `trainer.callbacks` list, which a command-line flag
    cannot address; so the trial writes a small overlay that restates full.yaml's callback list with its eta."""
    adv = "--model.init_args.advantage.init_args."
    rrb = trial.suggest_categorical("rrb", [*RRB_MODES, "null"])
    overlay = overlay_dir / f"t{trial.number}.yaml"
    overlay.parent.mkdir(parents=True, exist_ok=True)
    callbacks = [
        {"class_path": "diva_lightning.callbacks.DifficultyCallback",
         "init_args": {"eta": trial.suggest_float("eta", 1.0, 8.0)}},
        {"class_path": "diva_lightning.callbacks.AdvantageMonitor"},
        {"class_path": "diva_lightning.callbacks.timing.ElapsedTime"},
    ]
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return [
        "--config", str(overlay),
        f"{adv}k={trial.suggest_float('k', 0.0, 0.5)}",
        f"{adv}rrb={rrb}",
        f"{adv}local_weight={trial.suggest_float('local_weight', 0.25, 2.0)}",
        f"{adv}global_weight={trial.suggest_float('global_weight', 0.25, 2.0)}",
        f"--data.init_args.num_variants={trial.suggest_int('num_variants', 1, 3)}",
        f"--data.init_args.band={trial.suggest_float('band', 0.25, 1.5)}",
    ]


def objective_factory(args: argparse.Namespace) -> Any:
    from diva_lightning.cli import run_cli

    def objective(trial: optuna.Trial) -> float:
        root = Path(args.out) / "runs"
        cli_args = ["fit", "--config", str(REPO / BASE_CONFIG), *sum((["--config", c] for c in args.config), []),
                    "--seed_everything", str(args.seed), "--trainer.max_steps", str(args.steps),
                    "--trainer.val_check_interval", str(args.val_every), "--trainer.enable_progress_bar", "false",
                    "--trainer.logger.init_args.save_dir", str(root),
                    "--trainer.logger.init_args.name", "search",
                    "--trainer.logger.init_args.version", f"t{trial.number}",
                    *suggest(trial, Path(args.out) / "overlays"), *args.set]
        argv, sys.argv = sys.argv, sys.argv[:1]  # our own flags are not the CLI's (LightningCLI warns otherwise)
        try:
            pruning = StepPruningCallback(trial, monitor="val/accuracy")
            cli = run_cli(cli_args, trainer_defaults={"callbacks": [pruning]})
        finally:
            sys.argv = argv
        value = cli.trainer.callback_metrics.get("val/accuracy")
        trial.set_user_attr("run_dir", str(cli.trainer.log_dir))
        return math.nan if value is None else float(value)

    return objective


def main(argv: list[str] | None = None) -> optuna.Study:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/search")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite in --out)")
    p.add_argument("--study", default="diva-search")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--val-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="training seed of every trial (and the TPE seed)")
    p.add_argument("--warmup-steps", type=int, default=20, help="no pruning before this many steps")
    p.add_argument("--config", action="append", default=[], help="extra overlay (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="ARG", help="extra CLI argument (repeatable)")
    a = p.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=a.study, storage=a.storage or f"sqlite:///{(Path(a.out) / 'study.db').resolve()}",
        direction="maximize", load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=a.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=a.warmup_steps),
    )
    study.optimize(objective_factory(a), n_trials=a.trials)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if done:
        print(f"[search] best val/accuracy {study.best_value:.3f} with {study.best_params}")
    return study


if __name__ == "__main__":
    main()
