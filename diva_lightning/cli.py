"""Command line: `python -m diva_lightning {fit,validate,test,predict,warmup} --config ...`.

- `fit|validate|test|predict` are LightningCLI subcommands over `DivaGRPOModule` / `DivaDataModule` (or any
  subclass by `class_path`); `--print_config`, stacked `--config` files and `class_path`/`init_args` work as in
  Lightning. Links: `seed_everything` -> data and model seeds; `model.num_generations` -> data (rollout budget).
- `warmup` builds the embedded base policy (SFT on the procedural world; see `diva_lightning.system.warmup`).
- `test` writes per source the responses, the metrics and a Table-1 report to `<log_dir>/test/`; `predict`
  writes the responses of `data.predict_source` to `<log_dir>/predict/` (`diva_lightning.evaluation.run`).

Before `fit`/`validate`/`test`, if the model's policy checkpoint is the embedded default and is missing, it is
built first by running the warm-up recipe (printed, with progress) and then cached: never rebuilt when present.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from diva_lightning.models.embedded import EMBEDDED, resolve_embedded
from diva_lightning.system.checkpointing import check_resume_settings, load_lazily, run_settings, verify_checkpoint
from diva_lightning.system.datamodule import DivaDataModule
from diva_lightning.system.module import DivaGRPOModule

REPO_ROOT = Path(__file__).resolve().parents[1]
WARMUP_RECIPE = "experiments/warmup.yaml"


def _resolve(path: str) -> Path:
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def ensure_base_policy(policy: str, recipe: str = WARMUP_RECIPE) -> None:
    """Build the embedded base policy at `policy` by running the warm-up recipe, unless it already exists."""
    target = Path(policy)
    if (target / "config.json").exists():
        return
    recipe_path = _resolve(recipe)
    if not recipe_path.exists():
        raise FileNotFoundError(
            f"policy checkpoint {policy!r} is missing and the warm-up recipe {recipe!r} was not found to build it"
        )
    print(f"[diva-lightning] base policy {policy!r} not found: building it with `{recipe}` "
          "(tiny Qwen2.5-VL, SFT warm-up on the procedural world; cached afterwards)", flush=True)
    cmd = [sys.executable, "-m", "diva_lightning", "warmup", "--config", str(recipe_path),
           "--output_dir", str(target)]
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0 or not (target / "config.json").exists():
        raise RuntimeError(f"building the base policy failed (exit {done.returncode}): {' '.join(cmd)}")
    print(f"[diva-lightning] base policy ready at {target}", flush=True)


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


class DivaCLI(LightningCLI):
    """LightningCLI with DIVA's argument links and the base-policy bootstrap."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--build_base_policy", type=bool, default=True,
                            help="Build the embedded base policy when the configured one is missing.")
        parser.add_argument("--base_policy_recipe", type=str, default=WARMUP_RECIPE,
                            help="Warm-up config used to build a missing embedded base policy.")
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

    def _bootstrap(self) -> None:
        """Build the embedded base policy when it is the configured one and is missing. Any other policy path is
        never built: a missing one is an error from `load_policy` naming the path (issue 11: pointing `policy`
        at an absent Qwen2.5-VL-7B folder used to build the 0.7M-parameter toy model into it)."""
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        model = self.model
        if isinstance(model, DivaGRPOModule) and model.policy_path == EMBEDDED:
            resolve_embedded(EMBEDDED)  # shipped: nothing to build; a damaged copy is an error before anything runs
        elif isinstance(model, DivaGRPOModule) and model.is_embedded and cfg.get("build_base_policy", True):
            ensure_base_policy(model.policy_path, cfg.get("base_policy_recipe", WARMUP_RECIPE))

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI torch.loads --ckpt_path for its hyperparameters right after parsing, before the Trainer's
        # checkpoint plugin sees it: check the file first, so a damaged one is an error naming it and the
        # folder's other checkpoints (a bare EOFError otherwise).
        sub = self.config.get("subcommand")
        cfg = self.config.get(sub) if sub else self.config
        ckpt = cfg.get("ckpt_path") if cfg is not None else None
        if isinstance(ckpt, str) and ckpt not in ("last", "best", "hpc", "registry") and "://" not in ckpt:
            verify_checkpoint(ckpt)
        # The config as given. LightningCLI then overwrites the model's config with a --ckpt_path checkpoint's
        # hyper-parameters (issue 22: a GRPO resume ran DIVA's estimator); `before_instantiate_classes` puts this
        # back, so the run, --print_config and the saved config.yaml all are what the user asked for.
        self._given_config = self.config.clone()

    def before_instantiate_classes(self) -> None:
        _STATE["training"] = False
        _console_logging()
        self.config = self._given_config
        sub = self.config.get("subcommand")
        if sub:
            check_trainer_counts(self.config[sub].get("trainer") or {}, fitting=sub == "fit")
        self._run_settings: dict[str, Any] | None = None
        if self.config.get("subcommand") == "fit":
            self._run_settings = run_settings(self._config_dump()["fit"])

    def _config_dump(self) -> dict[str, Any]:
        return yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False,
                                               format="yaml"))

    def _mark_start(self) -> None:
        self.trainer.callbacks.append(_TrainingStarted())

    def before_fit(self) -> None:
        self._mark_start()
        if isinstance(self.model, DivaGRPOModule):  # recorded in every checkpoint, checked on resume
            cfg = self.config["fit"]
            self.model.run_settings = self._run_settings
            self.model.allow_changed_settings = bool(cfg.get("allow_changed_settings"))
            ckpt = cfg.get("ckpt_path")
            if isinstance(ckpt, str) and Path(ckpt).is_file() and not self.model.allow_changed_settings:
                # early, before the policy loads; `DivaGRPOModule.on_load_checkpoint` checks "last" etc. too
                check_resume_settings(load_lazily(ckpt), self._run_settings or {}, ckpt)
        self._bootstrap()
        self._check_skew_temperature()

    def _check_skew_temperature(self) -> None:
        """A skewed world's shares were measured at one rollout temperature: training at another is an error
        before anything loads (the "hard" questions would not be hard)."""
        from diva_lightning.data.success import check_temperature, table_for
        from diva_lightning.system.datamodule import DivaDataModule

        model, data = self.model, self.datamodule
        if not isinstance(model, DivaGRPOModule) or not isinstance(data, DivaDataModule):
            return
        skew = data.world.skew
        if skew is not None and data.train_source == "world":
            check_temperature(table_for(skew.table), model.train_sampling.temperature,
                              f"data.world.skew (table {skew.table!r})")

    def before_validate(self) -> None:
        self._mark_start()
        self._bootstrap()

    def before_test(self) -> None:
        self._mark_start()
        self._bootstrap()

    def before_predict(self) -> None:
        self._mark_start()
        self._bootstrap()

    def after_test(self) -> None:
        """Write the responses, metrics and Table-1 report of every test source (rank 0) and say where."""
        from diva_lightning.evaluation.run import decoding_of, headline_lines, write_test_outputs

        out_dir = Path(self.trainer.log_dir or ".") / "test"  # log_dir is collective: every rank asks
        model = self.model
        if self.trainer.global_rank != 0 or not isinstance(model, DivaGRPOModule) or not model.test_results:
            return
        cfg = self.config.get(self.subcommand, self.config)
        decoding = decoding_of(model.val_sampling)
        paths = write_test_outputs(model.test_results, out_dir, policy=model.policy_path, decoding=decoding,
                                   baseline=cfg.get("eval_baseline"))
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
    """Entry point used by `python -m diva_lightning` and by tests (args as on the command line)."""
    return DivaCLI(
        DivaGRPOModule,
        DivaDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        **kwargs,
    )


class _TrainingStarted(Callback):
    """Marks the moment a loop starts: errors before it are start-up errors, reported in one line."""

    def _started(self, *args: Any) -> None:
        _STATE["training"] = True

    on_train_start = on_validation_start = on_test_start = on_predict_start = _started


_STATE = {"training": False}


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
# Subcommands beside LightningCLI's fit/validate/test/predict: name -> "module:function(argv)" (imported on use).
EXTRA_COMMANDS = {
    "warmup": "diva_lightning.system.warmup:warmup_main",
    "score": "diva_lightning.evaluation.score:score_main",
    "augment": "diva_lightning.teacher.augment:augment_main",
}
TRACEBACK_ENV = "DIVA_LIGHTNING_TRACEBACK"
# `python -m diva_lightning --help`: every command, one line each (LightningCLI's own help lists only its four).
COMMANDS = {
    "fit": "train a policy (DIVA-GRPO; baselines and ablations are overlays in experiments/); --ckpt_path resumes",
    "validate": "score a policy (or a --ckpt_path checkpoint) on the validation sources",
    "test": "evaluate on the test sources/benchmarks: responses, metrics and a Table-1 report in <log_dir>/test/",
    "predict": "answer data.predict_source and write the responses that `score` grades",
    "warmup": "build the embedded base policy (SFT warm-up on the procedural world)",
    "score": "grade saved responses on a benchmark's native file, without a model",
    "augment": "fill a data file's variants and think_steps with a local teacher model",
}


def overview() -> str:
    """The top-level help: every command with one line."""
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m diva_lightning COMMAND [--config FILE ...] [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`python -m diva_lightning COMMAND --help` lists a command's options; "
              "`fit --config experiments/full.yaml --print_config` shows every setting of a run."]
    return "\n".join(lines)


def _chain(err: BaseException) -> list[BaseException]:
    """The exception and its causes, outermost first."""
    out: list[BaseException] = []
    while err is not None and all(err is not e for e in out):
        out.append(err)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return out


def _raised_here(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in this package (one of our checks raised it)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "diva_lightning" in Path(tb.tb_frame.f_code.co_filename).parts


def _root_cause(err: BaseException) -> BaseException:
    """The exception to report: the outermost one a check of ours raised (under jsonargparse's wrappers, over
    the library error it explains), else the innermost."""
    chain = _chain(err)
    return next((e for e in chain if _raised_here(e)), chain[-1])


def startup_error_summary(err: BaseException) -> str:
    """One line (plus the problem list of a record file) naming what is wrong, for errors before training."""
    root = _root_cause(err)
    text = str(root).strip() or type(root).__name__
    lines = text.splitlines()
    if len(lines) > 41:
        lines = [*lines[:40], f"... and {len(lines) - 40} more lines"]
    return f"diva-lightning: {type(root).__name__}: " + "\n".join(lines)


# Parse errors raise (one line from `main`) instead of jsonargparse's usage dump; --help still prints usage.
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
PARSER_KWARGS: dict[str, Any] = {"exit_on_error": False, "prog": "python -m diva_lightning",
                                 **{name: {"exit_on_error": False} for name in LIGHTNING_COMMANDS}}
# Options people reach for that are spelled differently here: the real ones to name in the error.
OPTION_HINTS = {
    "batch_size": ["questions_per_step (questions per training round)", "val_batch_size (questions per "
                   "validation batch)"],
    "num_samples": ["num_generations (G, responses per prompt in training)"],
    "learning_rate": ["lr"],
    "epochs": ["ppo_epochs (passes over a round's responses)", "trainer.max_steps (rounds)"],
}
_KEY = re.compile(r"""(?:Parser key|Key) ["']([^"']+)["']|Option ["']([^"']+)["'] is not accepted""")


def _sources(argv: list[str], key: str) -> list[str]:
    """In command-line order, the --config files and command-line options that may set ``key`` (dotted): the
    last one is where the parsed value came from."""
    out = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--config="):
            out.append(arg.split("=", 1)[1])
        elif arg.startswith("--") and key and (key == arg[2:].split("=", 1)[0] or key.startswith(arg[2:] + ".")):
            out.append(arg)
    return out


def _holds(path: str, key: list[str]) -> bool:
    """Whether the YAML file at ``path`` sets ``key`` (a dotted path, parts in order)."""
    try:
        node: Any = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    for part in key:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _suggest(name: str, message: str) -> str:
    """' (did you mean ...?)' for an unknown option: the known spelling, else close names of the class's args."""
    import difflib
    import inspect

    hints = list(OPTION_HINTS.get(name, []))
    found = re.search(r"class_path '([\w.]+)'", message)
    if found and not hints:
        module, _, cls = found.group(1).rpartition(".")
        try:
            params = list(inspect.signature(getattr(importlib.import_module(module), cls)).parameters)
        except (ImportError, AttributeError, ValueError, TypeError):
            params = []
        hints = difflib.get_close_matches(name, params, n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(hints)}?)" if hints else ""


def parse_error_line(message: str, argv: list[str]) -> str:
    """jsonargparse's nested parse error as one line naming where the value came from (a --config file or the
    command line), the full key and the reason."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    parts: list[str] = []
    reasons: list[str] = []
    noise = ("Does not validate", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value")
    for line in lines:
        if "Problem with given class_path" in line:
            parts.append("init_args")  # the keys below it are the class's init_args
            continue
        for key, option in _KEY.findall(line):
            parts.extend((key or option).split("."))
        rest = _KEY.sub("", line).lstrip(":- ").strip()
        if rest and not line.startswith(noise) and not rest.startswith(noise):
            reasons.append(rest)
    reason = reasons[0] if reasons else lines[-1] if lines else message
    unknown = re.search(r"Option ['\"]([^'\"]+)['\"] is not accepted", message)
    if unknown:
        reason = f"{unknown.group(1)!r} is not an option{_suggest(unknown.group(1), message)}"
    key = ".".join(parts)
    found = [src for src in _sources(argv, key) if src.startswith("--") or _holds(src, parts)]
    if found and not found[-1].startswith("--"):
        where = f"config file {found[-1]}: key {key}"
    else:
        where = f"--{key}" if key else "the command line"
    return f"diva-lightning: {where}: {reason}"


def main(argv: list[str] | None = None) -> None:
    """`python -m diva_lightning SUBCOMMAND ...`. Errors before training starts (configuration, data, policy
    path) print one summary line instead of jsonargparse's chained tracebacks (exit code 2); set
    DIVA_LIGHTNING_TRACEBACK=1 for the traceback. Errors during training keep theirs."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        if not argv:
            raise SystemExit(2)
        return
    if argv and argv[0] in EXTRA_COMMANDS:
        module, _, function = EXTRA_COMMANDS[argv[0]].partition(":")
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    _STATE["training"] = False
    try:
        # args=None lets LightningCLI read sys.argv itself (passing both made it warn on every command)
        run_cli(None if from_command_line else argv, parser_kwargs=PARSER_KWARGS)
    except ArgumentError as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(parse_error_line(str(err), argv), file=sys.stderr)
        print(f"  (`python -m diva_lightning {argv[0] if argv else 'fit'} --help` lists the options)",
              file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        if _STATE["training"] or os.environ.get(TRACEBACK_ENV):
            raise
        print(startup_error_summary(err), file=sys.stderr)
        print(f"  (for the full traceback set {TRACEBACK_ENV}=1)", file=sys.stderr)
        raise SystemExit(2) from None
