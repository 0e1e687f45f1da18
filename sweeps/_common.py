"""The ablation grid and the command line of one cell: the facts shared by the sweep, its workers and the report.

A *row* is one line of the paper's Table 2 (an overlay stacked on `experiments/full.yaml`); a *cell* is a
(row, seed) pair, i.e. one Lightning `fit`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = "experiments/full.yaml"

# Row name -> overlays stacked on BASE_CONFIG, in the paper's Table 2 order (full first, the baseline last).
ROWS: dict[str, tuple[str, ...]] = {
    "full": (),
    "no_variants": ("experiments/ablate/no_variants.yaml",),
    "no_difficulty_weighting": ("experiments/ablate/no_difficulty_weighting.yaml",),
    "no_rrb": ("experiments/ablate/no_rrb.yaml",),
    "no_gl_balance": ("experiments/ablate/no_gl_balance.yaml",),
    "grpo": ("experiments/grpo.yaml",),
    # Optional baseline, not in the default matrix: GRPO with DIVA's group size (G=5) and twice the questions per
    # step, the same rollout budget (the authors' GRPO_n=5 runs). Per-prompt zero-spread rates compare like for like.
    "grpo_n5": ("experiments/grpo.yaml", "experiments/grpo_n5.yaml"),
    # Optional baseline: GRPO with DAPO-style dynamic sampling (zero-spread groups dropped, more questions drawn);
    # it generates more rollouts per step than the other rows: compare at equal `rollouts/generated`.
    "dapo": ("experiments/grpo.yaml", "experiments/dapo.yaml"),
    # Optional baselines of the seed (Table 1's neighbours), same rollout budget: Share-GRPO (paraphrases for every
    # question, local + global advantage, no difficulty) and MM-Eureka (GRPO with online accuracy filtering).
    "share_grpo": ("experiments/share_grpo.yaml",),
    "mm_eureka": ("experiments/grpo.yaml", "experiments/mm_eureka.yaml"),
    # Optional baseline: the authors' released GRPO script (n=10, 512 prompts, 4 updates per step): 8x the rollouts
    # of the other rows, so not the Table 2 matrix's baseline (docs/paper.md).
    "grpo_released": ("experiments/grpo_released.yaml",),
}
# Baselines outside the paper's Table 2, run only when asked for.
EXTRA_ROWS: tuple[str, ...] = ("grpo_n5", "dapo", "share_grpo", "mm_eureka", "grpo_released")
TABLE2_ROWS: tuple[str, ...] = tuple(r for r in ROWS if r not in EXTRA_ROWS)
FULL_ROW, BASELINE_ROW = "full", "grpo"


@dataclass(frozen=True, order=True)
class Cell:
    """One (row, seed) of the matrix; its `params` are the Optuna trial parameters that identify it."""

    row: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.row}/seed{self.seed}"

    @property
    def params(self) -> dict[str, object]:
        return {"row": self.row, "seed": self.seed}

    @classmethod
    def from_params(cls, params: dict[str, object]) -> Cell:
        return cls(str(params["row"]), int(params["seed"]))  # type: ignore[call-overload]


def build_grid(rows: list[str], seeds: list[int]) -> list[Cell]:
    """rows x seeds in row-major order (all seeds of a row together); unknown or repeated names are errors."""
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; choose from {list(ROWS)}")
    for what, values in (("rows", rows), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise ValueError(f"repeated {what}: {values}")
        if not values:
            raise ValueError(f"no {what} given")
    return [Cell(r, s) for r, s in itertools.product(rows, seeds)]


@dataclass(frozen=True)
class TrialSettings:
    """What every cell's `fit` shares: budget, cadence and user overlays (a real model's config goes in `configs`).

    Attributes:
        steps: optimizer steps per cell (`trainer.max_steps`).
        val_every: validate every N steps; must divide `steps` so the final step is validated.
        configs: extra `--config` overlays stacked after the row's own (e.g. a real model's settings).
        overrides: extra command-line arguments appended last (tests shrink the world and model with these).
    """

    steps: int = 60
    val_every: int = 20
    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.steps < 1 or self.val_every < 1:
            raise ValueError(f"steps and val_every must be >= 1, got {self.steps} and {self.val_every}")
        if self.steps % self.val_every:
            raise ValueError(f"val_every ({self.val_every}) must divide steps ({self.steps}): the objective is the "
                             "validation accuracy after the last step, which Lightning only measures on the cadence")


def fit_args(cell: Cell, settings: TrialSettings, *, save_dir: Path, version: str) -> list[str]:
    """Arguments of `python -m diva_lightning` for one cell; the CSV lands in save_dir/<row>/<version>/."""
    args = ["fit", "--config", BASE_CONFIG]
    for overlay in (*ROWS[cell.row], *settings.configs):
        args += ["--config", overlay]
    args += [
        "--seed_everything", str(cell.seed),
        "--trainer.max_steps", str(settings.steps),
        "--trainer.val_check_interval", str(settings.val_every),
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.class_path", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.logger.init_args.name", cell.row,
        "--trainer.logger.init_args.version", version,
        "--trainer.callbacks+=diva_lightning.callbacks.timing.ElapsedTime",
    ]
    return args + list(settings.overrides)
