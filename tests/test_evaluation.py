"""Evaluation over named sources (`diva_lightning.evaluation.run`): the real data module builds the batches, the real
benchmark scorers and reward grade them; hand-worked metrics; the rank gathering on two gloo processes."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diva_lightning.data.batch import FamilyBatch, QuestionBatch
from diva_lightning.data.streams import eval_shard
from diva_lightning.data.world import generate_world
from diva_lightning.evaluation import get_benchmark
from diva_lightning.evaluation.run import EvalRun, EvalSource, log_values
from diva_lightning.evaluation.score import score_responses
from diva_lightning.rewards import CombinedReward
from diva_lightning.system.datamodule import DivaDataModule
from tests.benchmarks.conftest import box, write_wemath
from tests.helpers.rewards import contains_digit

THINK = "<think>counting</think> "


def _batch(records: list, padding: bool = False) -> FamilyBatch:
    dm = DivaDataModule(val_source=None, test_source=None)
    return dm.build_families(QuestionBatch(records, [dm.images.get(r) for r in records], 0, padding), 0)


# ------------------------------------------------------------------------------------------------------ sharding
def test_eval_shard_by_hand() -> None:
    # 7 records over 2 ranks at batch size 2: shards [0,2,4,6] and [1,3,5]; the longest needs 2 batches
    assert eval_shard(7, 2, 0, 2) == [([0, 2], False), ([4, 6], False)]
    assert eval_shard(7, 2, 1, 2) == [([1, 3], False), ([5], False)]
    # 3 records, batch size 1, 2 ranks: rank 1 holds one record but must run 2 batches, the second is padding
    assert eval_shard(3, 1, 1, 2) == [([1], False), ([1], True)]
    assert eval_shard(0, 4, 0, 2) == []


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 60), batch_size=st.integers(1, 9), world=st.integers(1, 5))
def test_eval_shard_covers_each_record_once_in_equal_batch_counts(n: int, batch_size: int, world: int) -> None:
    shards = [eval_shard(n, batch_size, rank, world) for rank in range(world)]
    real = sorted(i for shard in shards for idx, pad in shard if not pad for i in idx)
    assert real == list(range(n))
    assert len({len(shard) for shard in shards}) == 1  # every rank runs the same number of batches
    for shard in shards:
        for idx, pad in shard:
            assert 1 <= len(idx) <= batch_size and (not pad or len(idx) == 1)


def test_padding_batches_are_marked_for_the_module() -> None:
    records = generate_world(2, seed=0, split="val")
    assert _batch(records, padding=True).meta["padding"] is True
    batch = _batch(records)
    assert batch.meta["padding"] is False and [r.id for r in batch.records] == [r.id for r in records]


# ------------------------------------------------------------------------------------------------------- grading
def test_benchmark_source_is_scored_by_its_rules_across_batches(tmp_path: Path) -> None:
    bench = get_benchmark("wemath")
    records, _ = bench.read(write_wemath(tmp_path))
    # answers are all B. 2steps_1: both one-step answers right, the multi-step wrong (IG);
    # 3steps_1: the first one-step answer wrong, the others and the multi-step right (RM strict, CM loose)
    wrong = {"2steps_1|2steps_multi", "3steps_1|3steps_1"}
    responses = {r.id: [box("A" if r.id in wrong else "B")] for r in records}
    run = EvalRun([EvalSource("wemath", records, bench, "testmini.json")])
    for part in (records[:3], records[3:]):  # two batches
        batch = _batch(part)
        run.add(0, batch, list(range(len(part))), [responses[r.id][0] for r in part], reward=CombinedReward(),
                where="val")
    [result] = run.results()
    assert result.metrics == score_responses(bench, records, responses).metrics
    assert result.metrics["accuracy"] == pytest.approx(5 / 7)  # 2 of 3 and 3 of 4 rows
    # N = 2 problems; IG = 1, RM_strict = 1, IK = 0: (2 - 0.5 - 1 - 0) / 2 and (2 - 0.5 - 0 - 0) / 2
    assert result.metrics["score_strict"] == pytest.approx(0.25)
    assert result.metrics["score_loose"] == pytest.approx(0.75)
    assert result.format == 1.0
    assert log_values("val", [result])["val/accuracy"] == pytest.approx(5 / 7)
    assert log_values("val", [result])["val/wemath/score_strict"] == pytest.approx(0.25)


def test_plain_source_keeps_todays_keys_and_named_sources_average() -> None:
    records = generate_world(6, seed=0, split="val")  # levels 1, 1, 1, 1, 2, 2
    batch = _batch(records)
    # two samples per question: prompt p answers [digit, no digit] for p < 2, else [digit, digit]
    prompt_index = [p for p in range(6) for _ in range(2)]
    texts = [THINK + "\\boxed{7}" if (k % 2 == 0 or p >= 2) else "no idea" for k, p in enumerate(prompt_index)]
    reward = CombinedReward(accuracy_fn=contains_digit)
    run = EvalRun([EvalSource("", records, None, "world")])
    run.add(0, batch, prompt_index, texts, reward=reward, where="val")
    logged = log_values("val", run.results())
    # level 1: prompts 0..3 -> 1/2, 1/2, 1, 1 -> 6/8; level 2: 4/4; overall 10/12
    assert logged == pytest.approx({"val/accuracy": 10 / 12, "val/format": 10 / 12, "val/accuracy_level1": 6 / 8,
                                    "val/accuracy_level2": 1.0})
    assert list(logged)[:2] == ["val/accuracy", "val/format"]

    named = EvalRun([EvalSource("easy", records[:4], None, "world"), EvalSource("hard", records[4:], None, "x")])
    named.add(0, _batch(records[:4]), [0, 1, 2, 3], ["1", "no", "no", "no"], reward=reward, where="val")
    named.add(1, _batch(records[4:]), [0, 1], ["1", "2"], reward=reward, where="val")
    logged = log_values("val", named.results())
    assert logged["val/easy/accuracy"] == 0.25 and logged["val/hard/accuracy"] == 1.0
    assert logged["val/accuracy"] == pytest.approx((0.25 + 1.0) / 2)  # the mean of the sources, not of questions
    assert "val/format" not in logged and logged["val/hard/accuracy_level2"] == 1.0


def test_nan_reward_in_evaluation_names_the_questions() -> None:
    records = generate_world(2, seed=0, split="val")
    run = EvalRun([EvalSource("", records, None, "world")])
    reward = CombinedReward(accuracy_fn=lambda response, answer: math.nan if "x" in response else 1.0)
    with pytest.raises(ValueError, match=r"test: the reward returned NaN/inf for 1 response\(s\) of questions "
                                         r"\['world-val-s0-000001'\]"):
        run.add(0, _batch(records), [0, 1], ["1", "x"], reward=reward, where="test")


def test_a_partial_pass_logs_accuracy_when_the_benchmark_needs_whole_groups(tmp_path: Path) -> None:
    """limit_val_batches or the sanity check can cut a WeMath composite problem in two."""
    bench = get_benchmark("wemath")
    records, _ = bench.read(write_wemath(tmp_path))
    run = EvalRun([EvalSource("wemath", records, bench)])
    run.add(0, _batch(records[:2]), [0, 1], [box("B"), box("C")], reward=CombinedReward(), where="val")
    [result] = run.results()
    assert result.metrics == {"accuracy": 0.5} and not result.complete


# ------------------------------------------------------------------------------------------------------ gathering
def _gather_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        records = generate_world(4, seed=0, split="val")
        run = EvalRun([EvalSource("a", records, None, "world")])
        # rank 0 answers questions 0, 1; rank 1 answers 1 (again, differently: counts once) and 3; none answers 2
        mine = [0, 1] if rank == 0 else [1, 3]
        batch = _batch([records[i] for i in mine])
        texts = ["1", "no"] if rank == 0 else ["1", "1"]
        run.add(0, batch, [0, 1], texts, reward=CombinedReward(accuracy_fn=contains_digit), where="val")
        run.gather()
        [res] = run.results()
        torch.save({"responses": res.responses, "logged": log_values("val", [res])}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch and the package: ~15 s
def test_every_rank_gets_every_ranks_responses(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_gather_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pt") for k in (0, 1))
    assert r0 == r1
    ids = [r.id for r in generate_world(4, seed=0, split="val")]
    assert r0["responses"] == {ids[0]: ["1"], ids[1]: ["no"], ids[3]: ["1"]}  # record order, rank 0's copy of 1
    assert r0["logged"]["val/a/accuracy"] == pytest.approx(2 / 3)
