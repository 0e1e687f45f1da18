"""`DifficultyCallback`: owns the per-question difficulty table and updates it from rollout accuracy (or reward).

Usable in any Lightning project. The contract:

- **Input.** After each training batch the callback reads a `callbacks.outputs.StepOutputs`: the dict returned by
  `training_step` (or, if that returns a tensor, `pl_module.difficulty_outputs`; a `None` return is a skipped batch),
  with `statistic="accuracy"` (default, the paper)
  either `"difficulty_stats"`: a `core.difficulty.DifficultyStats` (question ids, correct counts, response
  counts), or `"question_ids"` (list[str], one per response) with `"accuracy"` (tensor [N] of 0/1 or fractions),
  the correctness term, not a shaped reward. With `statistic="reward"` (the authors' code) it reads
  `"question_ids"` with `"rewards"` (tensor [N] in [0, 1], the combined 0.9 accuracy + 0.1 format reward) and
  the family's mean reward is alpha; `"difficulty_stats"` is not used then.
- **Cadence.** Every training batch's statistics count, whatever `accumulate_grad_batches` is: with
  `update="step"` the table is updated after every batch (k updates per optimizer step under accumulation k).
  `warmup_steps` counts optimizer steps (`trainer.global_step` when the batch starts): the batches before the
  `warmup_steps`-th optimizer step are warm-up (`warmup_steps * accumulate_grad_batches` batches).
- **Seeding.** If the data module has `initial_difficulties()` (question id -> starting D, e.g. the records' own
  `difficulty`), those ids start there instead of at `initial`.
- **Output.** `callback.table` (a `DifficultyTable`). In `setup` the table is handed to
  `trainer.datamodule.use_difficulty(table)` and `pl_module.use_difficulty(table)` when they have that method, so a
  data pipeline can read the live difficulties (the same object: updates are seen at once). The callback alone
  checkpoints it.
- **Distributed.** The (id, correct, count) statistics of every rank are gathered and merged in a fixed order,
  then applied on every rank: all ranks hold identical tables after every update.
- **Checkpoints.** The table (and pending statistics for epoch cadence) is saved in the callback state.
- **Logging.** `difficulty/mean`, `difficulty/std`, `difficulty/frac_{easy,medium,hard}` and the histogram
  (`difficulty/hist_<bin>`, fraction of known questions per unit bin; also a real histogram to loggers that
  support it, such as TensorBoard and wandb).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from diva_lightning.callbacks.outputs import StepOutputs, batch_outputs
from diva_lightning.core.choices import (
    DIFFICULTY_STATISTICS,
    DIFFICULTY_UPDATES,
    RULES,
    TIERS,
    DifficultyRule,
    DifficultyStatistic,
    DifficultyUpdate,
    check_choice,
    choice_problems,
)
from diva_lightning.core.difficulty import DEFAULT_DIFFICULTY, DifficultyStats, DifficultyTable
from diva_lightning.core.tiers import tier_of

log = logging.getLogger(__name__)


# The outputs key each statistic is read from.
_STATISTIC_KEY = {"accuracy": "accuracy", "reward": "rewards"}


def stats_from_outputs(outputs: StepOutputs | Mapping[str, Any] | None,
                       statistic: DifficultyStatistic = "accuracy") -> DifficultyStats | None:
    """Extract per-question statistics from a step's outputs (see module docstring for the accepted keys).

    With `statistic="reward"` the "correct" sums of the returned stats are sums of rewards, so the
    table's alpha is the family's mean reward.
    """
    check_choice("statistic", statistic, DIFFICULTY_STATISTICS)
    if isinstance(outputs, Mapping):
        outputs = StepOutputs.from_mapping(outputs)
    if not isinstance(outputs, StepOutputs):
        return None
    if statistic == "accuracy" and isinstance(outputs.difficulty_stats, DifficultyStats):
        return outputs.difficulty_stats
    key = _STATISTIC_KEY[statistic]
    if outputs.has("question_ids") and outputs.has(key):
        ids = list(outputs.question_ids)  # type: ignore[arg-type]
        values = torch.as_tensor(getattr(outputs, key), dtype=torch.float64).detach().cpu().flatten()
        if len(ids) != values.numel():
            raise ValueError(
                f"DifficultyCallback: outputs['question_ids'] has {len(ids)} entries but outputs[{key!r}] "
                f"has {values.numel()}; they must be one per response"
            )
        bad = ~((values >= 0) & (values <= 1))
        if bool(bad.any()):
            idx = bad.nonzero()[:, 0].tolist()[:10]
            raise ValueError(
                f"DifficultyCallback: statistic={statistic!r} needs outputs[{key!r}] in [0, 1]; bad values "
                f"{values[bad].tolist()[:10]} at responses {idx}"
            )
        return DifficultyTable.merge_stats([DifficultyStats(ids, values, torch.ones_like(values))])
    return None


class DifficultyCallback(Callback):
    """Maintains DIVA's dynamic difficulty (design.md section 3).

    Args:
        rule: "linear" (paper) or "binned" (official bins).
        statistic: what alpha averages over the family's responses: "accuracy" (paper, default) or
            "reward" (the authors' code: the combined 0.9 accuracy + 0.1 format reward, read from
            `outputs["rewards"]`). They differ for well-formatted wrong answers: an all-wrong,
            well-formatted family has accuracy 0 (binned rule: +2) but reward 0.1 (binned rule: +1).
        eta: step size of the linear rule.
        d_min / d_max / initial: the difficulty scale and the starting value of unseen questions.
        update: "step" (update after every training batch, also under gradient accumulation) or "epoch"
            (accumulate, apply at epoch end).
        warmup_steps: plain GRPO for this many optimizer steps: the statistics of the batches that start before
            the `warmup_steps`-th optimizer step are discarded.
        d_mid / band: tier boundaries, used for the logged tier fractions.
        log_histogram: log the per-bin fractions of the table.
    """

    def __init__(
        self,
        rule: DifficultyRule = "linear",
        eta: float = 4.0,
        d_min: float = 1.0,
        d_max: float = 9.0,
        initial: float = DEFAULT_DIFFICULTY,
        update: DifficultyUpdate = "step",
        warmup_steps: int = 0,
        d_mid: float = DEFAULT_DIFFICULTY,
        band: float = 0.5,
        log_histogram: bool = True,
        statistic: DifficultyStatistic = "accuracy",
    ) -> None:
        problems = choice_problems("rule", rule, RULES) + choice_problems("statistic", statistic, DIFFICULTY_STATISTICS)
        problems += choice_problems("update", update, DIFFICULTY_UPDATES)
        if not d_min <= initial <= d_max:
            problems.append(f"initial {initial} outside [{d_min}, {d_max}]")
        if warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {warmup_steps}")
        if eta < 0:
            problems.append(f"eta must be >= 0, got {eta}")
        if problems:
            raise ValueError("DifficultyCallback: " + "; ".join(problems))
        self.update, self.warmup_steps, self.statistic = update, warmup_steps, statistic
        self.d_mid, self.band, self.log_histogram = d_mid, band, log_histogram
        self.table = DifficultyTable(initial=initial, d_min=d_min, d_max=d_max, eta=eta, rule=rule)
        self.num_updates = 0
        self.skipped_batches = 0  # batches whose training_step returned None
        self._steps_before_batch = 0  # trainer.global_step when the current batch started

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(rule=self.table.rule, update=self.update)

    # ---------------------------------------------------------------------------------------------- wiring
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        for owner in (datamodule, pl_module):  # handed explicitly to whoever reads it (the data module plans by it)
            use = getattr(owner, "use_difficulty", None)
            if callable(use):
                use(self.table)
        # A data module that knows its questions' starting difficulties seeds the table (a resumed run's
        # checkpointed table is loaded after setup and replaces these).
        initial = getattr(datamodule, "initial_difficulties", None)
        if callable(initial):
            seeded = self.table.seed(initial())
            if seeded:
                log.info("DifficultyCallback: %d questions start at their record's own difficulty", seeded)

    # ---------------------------------------------------------------------------------------------- update
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Optimizer steps done before this batch: under gradient accumulation global_step moves only on the batch
        # that steps, and with manual optimization it has already moved by on_train_batch_end.
        self._steps_before_batch = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        found = batch_outputs(outputs, pl_module, "DifficultyCallback")
        if found is None:  # a skipped batch (training_step returned None); under DDP every rank must skip it
            self.skipped_batches += 1
            return
        stats = stats_from_outputs(found, self.statistic)
        if stats is None:
            wanted = ("neither 'difficulty_stats' nor 'question_ids' + 'accuracy'" if self.statistic == "accuracy"
                      else "no 'question_ids' + 'rewards' (needed by statistic='reward')")
            raise KeyError(
                f"DifficultyCallback: training_step outputs carry {wanted} "
                "(see diva_lightning.callbacks.difficulty for the contract)"
            )
        stats = self._gather(stats)
        if self._steps_before_batch < self.warmup_steps:
            return
        if self.update == "step":
            self.table.update(stats.ids, stats.correct, stats.count)
            self.num_updates += 1
            self._log(pl_module)
        else:
            self.table.accumulate(stats.ids, stats.correct, stats.count)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.update == "epoch":
            self.table.flush()
            self.num_updates += 1
            self._log(pl_module, epoch_end=True)

    def _gather(self, stats: DifficultyStats) -> DifficultyStats:
        """Merge every rank's statistics in rank order, so every rank applies the identical update."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return stats
        payload = (list(stats.ids), stats.correct.double().cpu().tolist(), stats.count.double().cpu().tolist())
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, payload)
        parts = [DifficultyStats(ids, torch.tensor(c, dtype=torch.float64), torch.tensor(n, dtype=torch.float64))
                 for ids, c, n in gathered]
        return DifficultyTable.merge_stats(parts)

    def _log(self, pl_module: pl.LightningModule, *, epoch_end: bool = False) -> None:
        values = self.table.values()
        if values.numel() == 0:
            return
        metrics: dict[str, float] = {
            "difficulty/mean": float(values.mean()),
            "difficulty/std": float(values.std()) if values.numel() > 1 else 0.0,
            "difficulty/num_updates": float(self.num_updates),
        }
        tiers = [tier_of(float(v), d_mid=self.d_mid, band=self.band) for v in values.tolist()]
        for name in TIERS:
            metrics[f"difficulty/frac_{name}"] = tiers.count(name) / len(tiers)
        if self.log_histogram:
            for b, frac in enumerate(self.histogram_fractions(values)):
                metrics[f"difficulty/hist_{int(self.table.d_min) + b}"] = frac
            self._log_native_histogram(pl_module, values)
        # Identical on every rank by construction: no cross-rank reduction needed.
        # Lightning allows only epoch-level logging from on_train_epoch_end.
        pl_module.log_dict(metrics, on_step=not epoch_end, on_epoch=epoch_end, rank_zero_only=True)

    def histogram_fractions(self, values: Tensor) -> list[float]:
        """Fractions of questions per unit-wide bin [d_min, d_min+1), ..., [d_max-1, d_max]."""
        nbins = int(round(self.table.d_max - self.table.d_min))
        idx = (values - self.table.d_min).floor().clamp(0, nbins - 1).long()
        counts = torch.bincount(idx, minlength=nbins).double()
        return (counts / counts.sum()).tolist()

    def _log_native_histogram(self, pl_module: pl.LightningModule, values: Tensor) -> None:
        trainer = pl_module.trainer
        for logger in trainer.loggers if trainer is not None else []:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_histogram"):  # TensorBoard
                experiment.add_histogram("difficulty/hist", values, trainer.global_step)
            elif type(logger).__name__ == "WandbLogger":
                import wandb

                logger.experiment.log({"difficulty/hist": wandb.Histogram(values.numpy()),
                                       "trainer/global_step": trainer.global_step})

    # ------------------------------------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table.state_dict(), "num_updates": self.num_updates}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Mutate in place: the owners given it by `use_difficulty` hold references to this very table.
        if "table" in state_dict:
            self.table.load_state_dict(state_dict["table"])
        self.num_updates = int(state_dict.get("num_updates", 0))
