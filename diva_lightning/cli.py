"""Command line: `python -m diva_lightning {fit,validate,test,predict,warmup} --config ...`.

- `fit|validate|test|predict` are LightningCLI subcommands over `DivaGRPOModule` / `DivaDataModule` (or any
  subclass by `class_path`); `--print_config`, stacked `--config` files and `class_path`/`init_args` work as in
  Lightning. Links: `seed_everything` -> data and model seeds; `model.num_generations` -> data (rollout budget).
- `warmup` builds the embedded base policy (SFT on the procedural world; see `diva_lightning.warmup`).

Before `fit`/`validate`/`test`, if the model's policy checkpoint is the embedded default and is missing, it is
built first by running the warm-up recipe (printed, with progress) and then cached: never rebuilt when present.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from diva_lightning.data.datamodule import DivaDataModule
from diva_lightning.module import DivaGRPOModule

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


class DivaCLI(LightningCLI):
    """LightningCLI with DIVA's argument links and the base-policy bootstrap."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--build_base_policy", type=bool, default=True,
                            help="Build the embedded base policy when the configured one is missing.")
        parser.add_argument("--base_policy_recipe", type=str, default=WARMUP_RECIPE,
                            help="Warm-up config used to build a missing embedded base policy.")
        parser.link_arguments("seed_everything", "data.init_args.seed")
        parser.link_arguments("seed_everything", "model.init_args.seed")
        parser.link_arguments("model.init_args.num_generations", "data.init_args.num_generations")

    def _bootstrap(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        model = self.model
        if isinstance(model, DivaGRPOModule) and cfg.get("build_base_policy", True):
            path = Path(model.policy_path)
            if not path.exists() and not _looks_like_hub_id(model.policy_path):
                ensure_base_policy(model.policy_path, cfg.get("base_policy_recipe", WARMUP_RECIPE))

    def before_fit(self) -> None:
        self._bootstrap()

    def before_validate(self) -> None:
        self._bootstrap()

    def before_test(self) -> None:
        self._bootstrap()

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        if trainer.global_rank != 0:
            return
        lines = ["", "[diva-lightning] run finished"]
        log_dir = Path(trainer.log_dir or ".")
        for logger in trainer.loggers:
            metrics_file = Path(getattr(logger, "log_dir", "") or "") / "metrics.csv"
            if metrics_file.exists():
                lines.append(f"  metrics:    {metrics_file}")
        ckpt = trainer.checkpoint_callback
        if ckpt is not None:
            last = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
            if last:
                lines.append(f"  checkpoint: {last}")
        if isinstance(model, DivaGRPOModule) and model.bundle is not None:
            policy_dir = model.save_policy(log_dir / "policy")
            lines.append(f"  policy:     {policy_dir}  (save_pretrained layout)")
        config_file = log_dir / "config.yaml"
        if config_file.exists():
            lines.append(f"  config:     {config_file}")
        print("\n".join(lines), flush=True)


def _looks_like_hub_id(policy: str) -> bool:
    """'org/name' with no local meaning: handed to `load_policy`, which may download when the user allows."""
    parts = policy.split("/")
    return (len(parts) == 2 and all(parts) and not policy.startswith((".", "/", "~"))
            and parts[0] not in ("artifacts", "runs", "checkpoints"))


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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "warmup":
        from diva_lightning.warmup import warmup_main

        warmup_main(argv[1:])
        return
    if argv and argv[0] == "augment":
        from diva_lightning.teacher.augment import augment_main

        augment_main(argv[1:])
        return
    run_cli(argv)
