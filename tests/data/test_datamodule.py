"""DivaDataModule with the real world, the real difficulty table, planner, text edits and Kornia."""

from __future__ import annotations

import torch

from diva_lightning.core.difficulty import DifficultyTable
from diva_lightning.data.batch import KIND_CODES, TIER_CODES
from diva_lightning.data.perturb import apply_perturbations
from diva_lightning.data.sources import WorldConfig
from diva_lightning.system.datamodule import DivaDataModule


def _dm(**kw: object) -> DivaDataModule:
    dm = DivaDataModule(world=WorldConfig(train_size=64, val_size=16, test_size=16, seed=1),
                        questions_per_step=3, **kw)  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def _table_easy_medium_hard(ids: list[str]) -> DifficultyTable:
    table = DifficultyTable()
    one = torch.ones(1, dtype=torch.float64)
    for _ in range(2):  # linear rule, eta 4: all right twice -> 5-2-2 = 1; all wrong twice -> 5+2+2 = 9
        table.update([ids[0]], one, one)
        table.update([ids[2]], one * 0, one)
    return table


def test_families_follow_the_three_tiers() -> None:
    dm = _dm(num_variants=1)
    qb = dm.question_batch(0)
    ids = [r.id for r in qb.records]
    dm.use_difficulty(_table_easy_medium_hard(ids))
    fb = dm.build_families(qb, num_variants=1)
    assert len(fb) == 6 and fb.family_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert fb.is_original.tolist() == [True, False] * 3
    assert fb.question_difficulty.tolist() == [1.0, 1.0, 5.0, 5.0, 9.0, 9.0]
    assert fb.tier.tolist() == [TIER_CODES[t] for t in ("easy",) * 2 + ("medium",) * 2 + ("hard",) * 2]
    # easy -> image variant, harder label; medium -> paraphrase, same label; hard -> hint, easier label
    assert fb.kind.tolist()[1::2] == [KIND_CODES["image"], KIND_CODES["paraphrase"], KIND_CODES["hint"]]
    assert fb.difficulty[1] > 1.0 and fb.difficulty[3] == 5.0 and fb.difficulty[5] < 9.0
    assert "Hint:" in fb.problems[5] and fb.problems[5].startswith(qb.records[2].problem)
    assert fb.problems[3] in qb.records[1].variants
    assert fb.answers[0::2] == fb.answers[1::2] == [r.answer for r in qb.records]
    # only the easy question's variant image is perturbed
    assert (~fb.perturb.is_identity()).tolist() == [False, True, False, False, False, False]


def test_perturbation_runs_after_transfer_and_only_on_variants() -> None:
    dm = _dm(num_variants=1)
    qb = dm.question_batch(0)
    dm.use_difficulty(_table_easy_medium_hard([r.id for r in qb.records]))
    fb = dm.build_families(qb, num_variants=1)
    before = [img.clone() for img in fb.images]
    out = dm.on_after_batch_transfer(fb.to("cpu"), 0)
    changed = [not torch.equal(a, b) for a, b in zip(before, out.images)]
    assert changed == [False, True, False, False, False, False]
    assert torch.equal(out.images[0], before[0])  # the original is bit-exact
    # keyed per image: perturbing the variant alone gives the same pixels as in the batch
    alone = apply_perturbations([before[1]], fb.perturb.select(torch.tensor([1])))
    assert torch.equal(alone[0], out.images[1])


def test_v0_is_a_plain_grpo_stream_and_plans_are_deterministic() -> None:
    dm = _dm(num_variants=0)
    fb = dm.build_families(dm.question_batch(0), num_variants=0)
    assert fb.is_original.all() and len(fb) == 3
    a, b = _dm(num_variants=2, seed=7), _dm(num_variants=2, seed=7)
    fa, fb2 = a.build_families(a.question_batch(5), 2), b.build_families(b.question_batch(5), 2)
    assert fa.problems == fb2.problems and torch.equal(fa.difficulty, fb2.difficulty)
    c = _dm(num_variants=2, seed=8)
    assert [r.id for r in c.question_batch(5).records] != [r.id for r in a.question_batch(5).records]


def test_stream_covers_each_pass_once_and_resumes_from_position() -> None:
    dm = _dm()
    per_epoch = dm.batches_per_epoch
    assert per_epoch == 64 // 3
    seen = [r.id for k in range(per_epoch) for r in dm.question_batch(k).records]
    assert len(seen) == len(set(seen)) == per_epoch * 3  # no question twice within a pass
    # consuming batch 4 moves the position; a fresh module restored from state_dict continues there
    dm.trainer = None
    dm.position = 5
    resumed = _dm()
    resumed.load_state_dict(dm.state_dict())
    it = iter(resumed.train_dataloader())
    assert [r.id for r in next(it).records] == [r.id for r in dm.question_batch(5).records]
    assert sum(1 for _ in it) == per_epoch - 6  # the rest of this pass, no more


def test_bad_arguments_are_reported_together() -> None:
    import pytest

    with pytest.raises(ValueError) as err:
        DivaDataModule(questions_per_step=0, num_variants=-1, plan="random", image_ops=["swirl"])
    for name in ("questions_per_step", "num_variants", "plan must be one of tiers, official", "image_ops"):
        assert name in str(err.value)


def test_world_composition_is_configurable_and_checked() -> None:
    """data.world.families / levels reach the generator (the same questions generate_world draws), bad values are
    errors naming the field, and a skewed world refuses them (its table's ids name the default composition)."""
    import pytest

    from diva_lightning.data.skew import SkewConfig
    from diva_lightning.data.world import generate_world

    world = WorldConfig(train_size=8, val_size=4, test_size=0, families=["compare", "count_plus"], levels=[1, 2])
    dm = DivaDataModule(world=world, questions_per_step=2, num_generations=2)
    dm.setup("fit")
    assert dm.train_records == generate_world(8, seed=0, split="train", families=("compare", "count_plus"),
                                              levels=(1, 2))
    assert {r.meta["family"] for r in dm.train_records + dm.val_records} == {"compare", "count_plus"}
    assert {r.meta["level"] for r in dm.train_records} == {1, 2}
    with pytest.raises(ValueError) as err:
        DivaDataModule(world=WorldConfig(families=["count_all"], levels=[0, 6]))
    assert "world.families must be a non-empty list" in str(err.value) and "['count_all']" in str(err.value)
    assert "world.levels must be a non-empty list of levels in 1..5; got [0, 6]" in str(err.value)
    with pytest.raises(ValueError, match="world.skew composes splits from a success table"):
        DivaDataModule(world=WorldConfig(levels=[1], skew=SkewConfig(hard=0.5)))


def test_side_stream_draws_its_own_stream_and_resumes_from_the_saved_position() -> None:
    dm = _dm(num_variants=1)
    drawn = [dm.side_stream.draw("cpu") for _ in range(3)]
    assert dm.position == 0 and dm.side_stream.position == 3  # the training stream is untouched
    assert [b.meta["position"] for b in drawn] == [-1, -2, -3]  # plans and noise never repeat a training batch's
    assert drawn[0].question_ids != dm.build_families(dm.question_batch(0), 1).question_ids
    # the positions and the fallback count; the difficulty table is DifficultyCallback's to save
    assert dm.state_dict() == {"position": 0, "extra_position": 3, "fallbacks": 0}
    resumed = _dm(num_variants=1)
    resumed.load_state_dict({"position": 0, "extra_position": 1, "fallbacks": 0})
    again = resumed.side_stream.draw("cpu")
    assert (again.question_ids, again.problems) == (drawn[1].question_ids, drawn[1].problems)
    assert torch.equal(again.difficulty, drawn[1].difficulty)
    assert all(torch.equal(a, b) for a, b in zip(again.images, drawn[1].images, strict=True))
