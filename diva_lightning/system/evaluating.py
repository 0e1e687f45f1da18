"""Validation, test and predict passes of `DivaGRPOModule`: sample with `val_sampling`, grade each source by its rule.

`Evaluator` keeps the running pass of each stage (`evaluation.run.EvalRun`): `start` at the epoch start, `add` per
batch (each rank samples its shard of the questions), `finish` gathers every rank's responses and computes each
source's metrics (a benchmark's scorer, or the reward); val/test metrics are logged with the same values on every
rank. Padding batches (generated only to keep sharded ranks in step) are sampled and then dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from diva_lightning.core.seeding import stable_seed
from diva_lightning.data.batch import FamilyBatch
from diva_lightning.evaluation.run import EvalRun, SourceResult, log_values, sources_of
from diva_lightning.system.round import RoundRunner

LogFn = Callable[..., None]


class Evaluator:
    """The running evaluation pass of each stage ("val", "test", "predict")."""

    def __init__(self) -> None:
        self.runs: dict[str, EvalRun] = {}

    def start(self, stage: str, datamodule: Any) -> None:
        self.runs[stage] = EvalRun(sources_of(datamodule, stage))

    def add(self, runner: RoundRunner, batch: FamilyBatch, stage: str, batch_idx: int, dataloader_idx: int,
            datamodule: Any) -> list[dict[str, str]]:
        """Sample `val_sampling.num_samples` responses per question and grade them by the source's rule; returns
        the batch's ``{"id", "response"}`` rows."""
        system = runner.system
        assert system.policy is not None
        sampling = system.val_sampling
        system.policy.eval()
        with torch.no_grad():
            roll = runner.sample(runner.encode(batch), sampling, sampling.num_samples,
                                 stable_seed("eval", system.seed, stage, dataloader_idx, batch_idx))
        if batch.meta.get("padding"):  # generated only to keep sharded ranks in step
            return []
        if stage not in self.runs:  # the epoch-start hook did not run (a loop driven by hand)
            self.start(stage, datamodule)
        return self.runs[stage].add(dataloader_idx, batch, roll.prompt_index.tolist(), roll.texts,
                                    reward=None if stage == "predict" else system.reward, where=stage)

    def finish(self, stage: str, datamodule: Any, log: LogFn) -> list[SourceResult]:
        """Gather every rank's responses, compute each source's metrics, and (val/test) ``log`` the same values on
        every rank."""
        run = self.runs.pop(stage, None) or EvalRun(sources_of(datamodule, stage))
        run.gather()
        results = run.results(graded=stage != "predict")
        if stage != "predict":
            for key, value in log_values(stage, results).items():
                log(key, value, prog_bar=key == f"{stage}/accuracy", sync_dist=False)
        return results


class EvaluationHooks(pl.LightningModule):
    """The validation, test and predict hooks of `DivaGRPOModule` (a Lightning hook mixin): each stage's pass runs
    through `self.evaluator`; test and predict results are kept in `test_results` / `predict_results`."""

    evaluator: Evaluator
    test_results: list[SourceResult]  # the last test pass, per source (every rank)
    predict_results: list[SourceResult]

    @property
    def rounds(self) -> RoundRunner:
        raise NotImplementedError

    @override
    def on_validation_epoch_start(self) -> None:
        self.evaluator.start("val", self.trainer.datamodule)

    @override
    def validation_step(self, batch: FamilyBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluator.add(self.rounds, batch, "val", batch_idx, dataloader_idx, self.trainer.datamodule)

    @override
    def on_validation_epoch_end(self) -> None:
        self.evaluator.finish("val", self.trainer.datamodule, self.log)

    @override
    def on_test_epoch_start(self) -> None:
        self.evaluator.start("test", self.trainer.datamodule)

    @override
    def test_step(self, batch: FamilyBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluator.add(self.rounds, batch, "test", batch_idx, dataloader_idx, self.trainer.datamodule)

    @override
    def on_test_epoch_end(self) -> None:
        self.test_results = self.evaluator.finish("test", self.trainer.datamodule, self.log)

    @override
    def on_predict_epoch_start(self) -> None:
        self.evaluator.start("predict", self.trainer.datamodule)

    @override
    def predict_step(self, batch: FamilyBatch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, str]]:
        """``{"id", "response"}`` rows of the batch (`num_samples` per question), as the ``score`` command reads."""
        return self.evaluator.add(self.rounds, batch, "predict", batch_idx, dataloader_idx, self.trainer.datamodule)

    @override
    def on_predict_epoch_end(self) -> None:
        self.predict_results = self.evaluator.finish("predict", self.trainer.datamodule, self.log)
