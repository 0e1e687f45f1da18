"""Command line: `python -m diva_lightning COMMAND ...`, every command one function of `COMMANDS`.

- `fit|validate|test|predict` are LightningCLI subcommands over `DivaGRPOModule` / `DivaDataModule` (or any
  subclass by `class_path`); `--print_config`, stacked `--config` files and `class_path`/`init_args` work as in
  Lightning. Links: `seed_everything` -> data and model seeds; `model.num_generations` -> data (rollout budget).
- `warmup` builds the embedded base policy (SFT on the procedural world; see `diva_lightning.system.warmup`).
- `score` grades saved responses (`diva_lightning.evaluation.score`); `augment` fills a data file's variants with
  a local teacher (`diva_lightning.teacher.augment`). Both parse with jsonargparse, as LightningCLI does.
- `test` writes per source the responses, the metrics and a Table-1 report to `<log_dir>/test/`; `predict`
  writes the responses of `data.predict_source` to `<log_dir>/predict/` (`diva_lightning.evaluation.run`).

Before `fit`/`validate`/`test`/`predict`, if the model's policy checkpoint is the embedded default and is missing,
it is built first by running the warm-up recipe shipped in the package (printed, with progress) and then cached.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from diva_lightning.cli_messages import parse_error_line, startup_error_summary
from diva_lightning.evaluation.score import score_main
from diva_lightning.models.embedded import EMBEDDED, resolve_embedded
from diva_lightning.system.checkpointing import check_resume_settings, load_lazily, run_settings, verify_checkpoint
from diva_lightning.system.datamodule import DivaDataModule
from diva_lightning.system.module import DivaGRPOModule
from diva_lightning.system.warmup import ensure_base_policy, warmup_main
from diva_lightning.teacher.augment import augment_main

TRACEBACK_ENV = "DIVA_LIGHTNING_TRACEBACK"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# Parse errors raise (one line from `main`) instead of jsonargparse's usage dump; --help still prints usage.
PARSER_KWARGS: dict[str, Any] = {"exit_on_error": False, "prog": "python -m diva_lightning",
                                 **{name: {"exit_on_error": False} for name in LIGHTNING_COMMANDS}}


def check_trainer_counts(trainer: Any, *, fitting: bool) -> None:
    """Counts that make no sense are refused naming the option, before anything loads (issue 22:
    ``--trainer.max_steps -1`` silently planned Lightning's default of 1000 epochs)."""
    problems = []
    max_steps, max_epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    if fitting and isinstance(max_steps, int) and max_steps < 0 and (max_steps < -1 or max_epochs is None):
        problems.append(f"trainer.max_steps must be >= 0 (the number of training rounds), got {max_steps}"
                        + (": -1 with trainer.max_epochs unset would run Lightning's default of 1000 epochs; "
                           "set trainer.max_epochs for an epoch-bounded run" if max_steps == -1 else ""))
    if fitting and isinstance(max_epochs, int) and max_epochs < -1:
        problems.append(f"trainer.max_epochs must be >= -1 (-1: no epoch limit), got {max_epochs}")
    for key in ("val_check_interval", "log_every_n_steps", "accumulate_grad_batches"):
        value = trainer.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            problems.append(f"trainer.{key} must be >= 1, got {value}")
    if problems:
        raise ValueError("; ".join(problems))


class TrainingStarted(Callback):
    """Marks the moment a loop starts: errors before it are start-up errors, reported in one line."""

    def __init__(self) -> None:
        self.started = False

    def _start(self, *args: Any) -> None:
        self.started = True

    on_train_start = on_validation_start = on_test_start = on_predict_start = _start


class DivaCLI(LightningCLI):
    """LightningCLI with DIVA's argument links, the base-policy bootstrap and the run's record and reports.

    Args:
        started: the marker callback added to the Trainer (`main` reads it when an error escapes); a fresh one
            when not given. The other arguments are LightningCLI's.
    """

    def __init__(self, *args: Any, started: TrainingStarted | None = None, **kwargs: Any) -> None:
        self.started = started if started is not None else TrainingStarted()
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--build_base_policy", type=bool, default=True,
                            help="Build the embedded base policy when the configured one is missing.")
        parser.add_argument("--base_policy_recipe", type=str | None, default=None,
                            help="Warm-up config used to build a missing embedded base policy (null: the recipe "
                                 "shipped in the package, equal to experiments/warmup.yaml).")
        parser.add_argument("--eval_baseline", type=str | None, default=None,
                            help="test: the test/ folder (or its metrics.json) of an earlier test run, e.g. of the "
                                 "base policy; its numbers are the comparison row of the Table-1 report.")
        parser.add_argument("--allow_changed_settings", type=bool, default=False,
                            help="fit --ckpt_path: resume even when a setting that defines the run (estimator, "
                                 "reward, rollout, loss, G, sampling, plan, data, seed) differs from the "
                                 "checkpoint's record; refused by default, naming each difference.")
        parser.link_arguments("seed_everything", "data.init_args.seed")
        parser.link_arguments("seed_everything", "model.init_args.seed")
        parser.link_arguments("model.init_args.num_generations", "data.init_args.num_generations")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI torch.loads --ckpt_path for its hyperparameters right after parsing, before the Trainer's
        # checkpoint plugin sees it: check the file first, so a damaged one is an error naming it and the
        # folder's other checkpoints (a bare EOFError otherwise).
        ckpt = self._command_config().get("ckpt_path")
        if isinstance(ckpt, str) and ckpt not in ("last", "best", "hpc", "registry") and "://" not in ckpt:
            verify_checkpoint(ckpt)
        # The config as given. LightningCLI then overwrites the model's config with a --ckpt_path checkpoint's
        # hyper-parameters (issue 22: a GRPO resume ran DIVA's estimator); `before_instantiate_classes` puts this
        # back, so the run, --print_config and the saved config.yaml all are what the user asked for.
        self._given_config = self.config.clone()

    def _command_config(self) -> Any:
        """The config of the subcommand being run (the whole config when run without one)."""
        sub = self.config.get("subcommand")
        return (self.config.get(sub) if sub else self.config) or {}

    def before_instantiate_classes(self) -> None:
        _console_logging()
        self.config = self._given_config
        sub = self.config.get("subcommand")
        if sub:
            check_trainer_counts(self.config[sub].get("trainer") or {}, fitting=sub == "fit")
        self._run_settings: dict[str, Any] | None = None
        if sub == "fit":
            dump = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False,
                                                   format="yaml"))
            self._run_settings = run_settings(dump["fit"])

    def _before_run(self) -> None:
        """Before every subcommand: mark the loop's start, and build the embedded base policy when it is the
        configured one and is missing. Any other policy path is never built: a missing one is an error from
        `load_policy` naming the path (issue 11: pointing `policy` at an absent Qwen2.5-VL-7B folder used to build
        the 0.7M-parameter toy model into it)."""
        self.trainer.callbacks.append(self.started)
        model, cfg = self.model, self._command_config()
        if isinstance(model, DivaGRPOModule) and model.policy_path == EMBEDDED:
            resolve_embedded(EMBEDDED)  # shipped: nothing to build; a damaged copy is an error before anything runs
        elif isinstance(model, DivaGRPOModule) and model.is_embedded and cfg.get("build_base_policy", True):
            ensure_base_policy(model.policy_path, cfg.get("base_policy_recipe"))

    before_validate = before_test = before_predict = _before_run

    def before_fit(self) -> None:
        if isinstance(self.model, DivaGRPOModule):  # recorded in every checkpoint, checked on resume
            cfg = self._command_config()
            self.model.run_settings = self._run_settings
            self.model.allow_changed_settings = bool(cfg.get("allow_changed_settings"))
            ckpt = cfg.get("ckpt_path")
            if isinstance(ckpt, str) and Path(ckpt).is_file() and not self.model.allow_changed_settings:
                # early, before the policy loads; `DivaGRPOModule.on_load_checkpoint` checks "last" etc. too
                check_resume_settings(load_lazily(ckpt), self._run_settings or {}, ckpt)
        self._before_run()
        self._check_skew_temperature()

    def _check_skew_temperature(self) -> None:
        """A skewed world's shares were measured at one rollout temperature: training at another is an error
        before anything loads (the "hard" questions would not be hard)."""
        from diva_lightning.data.success import check_temperature, table_for

        model, data = self.model, self.datamodule
        if not isinstance(model, DivaGRPOModule) or not isinstance(data, DivaDataModule):
            return
        skew = data.world.skew
        if skew is not None and data.train_source == "world":
            check_temperature(table_for(skew.table), model.train_sampling.temperature,
                              f"data.world.skew (table {skew.table!r})")

    def after_test(self) -> None:
        """Write the responses, metrics and Table-1 report of every test source (rank 0) and say where."""
        from diva_lightning.evaluation.run import decoding_of, headline_lines, write_test_outputs

        out_dir = Path(self.trainer.log_dir or ".") / "test"  # log_dir is collective: every rank asks
        model = self.model
        if self.trainer.global_rank != 0 or not isinstance(model, DivaGRPOModule) or not model.test_results:
            return
        decoding = decoding_of(model.val_sampling)
        paths = write_test_outputs(model.test_results, out_dir, policy=model.policy_path, decoding=decoding,
                                   baseline=self._command_config().get("eval_baseline"))
        lines = ["", f"[diva-lightning] test of {model.policy_path} ({decoding['mode']} decoding: temperature "
                     f"{decoding['temperature']}, top_p {decoding['top_p']}, {decoding['num_samples']} sample(s), "
                     f"max {decoding['max_new_tokens']} tokens)", *headline_lines(model.test_results),
                 f"  outputs in {out_dir}/:"]
        lines += [f"    {path.name}" for path in paths.values()]
        print("\n".join(lines), flush=True)

    def after_predict(self) -> None:
        """Write the responses of every predict source as the JSONL that `score` reads (rank 0)."""
        from diva_lightning.evaluation.run import write_predictions

        out_dir = Path(self.trainer.log_dir or ".") / "predict"
        model = self.model
        if self.trainer.global_rank != 0 or not isinstance(model, DivaGRPOModule):
            return
        if not model.predict_results:
            print("[diva-lightning] predict: nothing to answer (set data.init_args.predict_source)", flush=True)
            return
        paths = write_predictions(model.predict_results, out_dir)
        lines = ["", "[diva-lightning] predict: responses (score them with `python -m diva_lightning score`)"]
        lines += [f"  {res.source.label}: {res.samples} response(s) for {len(res.responses)} question(s) -> "
                  f"{paths[res.source.label]}" for res in model.predict_results]
        print("\n".join(lines), flush=True)

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        log_dir = Path(trainer.log_dir or ".")
        policy_dir = None
        if isinstance(model, DivaGRPOModule) and model.bundle is not None:
            # every rank takes part: under FSDP the full weights are gathered from the shards
            policy_dir = model.export_policy(log_dir / "policy")
        if trainer.global_rank != 0:
            return
        lines = ["", "[diva-lightning] run finished"]
        for logger in trainer.loggers:
            metrics_file = Path(getattr(logger, "log_dir", "") or "") / "metrics.csv"
            if metrics_file.exists():
                lines.append(f"  metrics:    {metrics_file}")
        ckpt = trainer.checkpoint_callback
        if ckpt is not None:
            last = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
            if last:
                lines.append(f"  checkpoint: {last}")
        if policy_dir is not None:
            lines.append(f"  policy:     {policy_dir}  (save_pretrained layout)")
        config_file = log_dir / "config.yaml"
        if config_file.exists():
            lines.append(f"  config:     {config_file}")
        print("\n".join(lines), flush=True)


def run_cli(args: list[str] | None = None, **kwargs: Any) -> DivaCLI:
    """The Lightning commands, as `python -m diva_lightning` runs them and tests call them (args as on the command
    line, the subcommand first; kwargs go to `DivaCLI`)."""
    return DivaCLI(
        DivaGRPOModule,
        DivaDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        **kwargs,
    )


def _console_logging() -> None:
    """Show the package's INFO lines (what each data file loaded and skipped) on the console, as Lightning shows
    its own. Left alone when logging is configured already (a handler on the package or the root logger)."""
    pkg = logging.getLogger("diva_lightning")
    if pkg.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[diva-lightning] %(message)s"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)


def lightning_main(command: str, args: list[str]) -> None:
    """`python -m diva_lightning {fit,validate,test,predict} ...`. Errors before training starts (configuration,
    data, policy path) print one summary line instead of jsonargparse's chained tracebacks (exit code 2); set
    DIVA_LIGHTNING_TRACEBACK=1 for the traceback. Errors during training keep theirs."""
    argv = [command, *args]
    started = TrainingStarted()
    try:
        # args=None lets LightningCLI read sys.argv itself (passing both made it warn on every command)
        run_cli(None if sys.argv[1:] == argv else argv, parser_kwargs=PARSER_KWARGS, started=started)
    except ArgumentError as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(parse_error_line(str(err), argv), file=sys.stderr)
        print(f"  (`python -m diva_lightning {command} --help` lists the options)", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        if started.started or os.environ.get(TRACEBACK_ENV):
            raise
        print(startup_error_summary(err), file=sys.stderr)
        print(f"  (for the full traceback set {TRACEBACK_ENV}=1)", file=sys.stderr)
        raise SystemExit(2) from None


class Command(NamedTuple):
    run: Callable[[list[str]], None]
    """Takes the arguments after the command's name."""
    help: str


COMMANDS: dict[str, Command] = {
    "fit": Command(partial(lightning_main, "fit"), "train a policy (DIVA-GRPO; baselines and ablations are overlays "
                   "in experiments/); --ckpt_path resumes"),
    "validate": Command(partial(lightning_main, "validate"),
                        "score a policy (or a --ckpt_path checkpoint) on the validation sources"),
    "test": Command(partial(lightning_main, "test"), "evaluate on the test sources/benchmarks: responses, metrics "
                    "and a Table-1 report in <log_dir>/test/"),
    "predict": Command(partial(lightning_main, "predict"),
                       "answer data.predict_source and write the responses that `score` grades"),
    "warmup": Command(warmup_main, "build the embedded base policy (SFT warm-up on the procedural world)"),
    "score": Command(score_main, "grade saved responses on a benchmark's native file, without a model"),
    "augment": Command(augment_main, "fill a data file's variants and think_steps with a local teacher model"),
}


def overview() -> str:
    """The top-level help: every command with one line."""
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m diva_lightning COMMAND [--config FILE ...] [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()]
    lines += ["", "`python -m diva_lightning COMMAND --help` lists a command's options; "
              "`fit --config experiments/full.yaml --print_config` shows every setting of a run."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`python -m diva_lightning COMMAND ...` (argv: the arguments after the program's name)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        if not argv:
            raise SystemExit(2)
        return
    if argv[0] not in COMMANDS:  # LightningCLI's own parser answers (global options, an unknown command)
        lightning_main(argv[0], argv[1:])
        return
    COMMANDS[argv[0]].run(argv[1:])
