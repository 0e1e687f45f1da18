"""The pure family planner: typed rows, honest fallbacks, rotation-only for text in images."""

from __future__ import annotations

import logging

import pytest
import torch

from diva_lightning.core.difficulty import DifficultyTable
from diva_lightning.data.batch import KIND_CODES
from diva_lightning.data.planner import PlannedPrompt, PlanSettings, plan_families
from diva_lightning.data.schema import QuestionRecord
from diva_lightning.data.world import generate_world
from diva_lightning.system.datamodule import DivaDataModule


def _plan(records: list[QuestionRecord], d: float, v: int = 3, seed: int = 0, **kw: object) -> list[PlannedPrompt]:
    settings = PlanSettings(num_variants=v, **kw)  # type: ignore[arg-type]
    return plan_families(records, [d] * len(records), settings, generator=torch.Generator().manual_seed(seed),
                         image_size=lambda b: (112, 112) if records[b].images else None)


def _bare(**kw: object) -> QuestionRecord:
    """A record with no paraphrases, no think steps and (by default) no image."""
    fields: dict[str, object] = {"id": "q", "problem": "What is 2+2?", "answer": "4"}
    fields.update(kw)
    return QuestionRecord(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("d", "kind", "why"), [
    (9.0, "hint", "no think steps"),          # hard tier plans hints
    (5.0, "paraphrase", "no paraphrases"),     # medium tier plans paraphrases
    (1.0, "image", "no image to perturb"),     # easy tier plans image variants
])
def test_unrealisable_variants_are_labelled_originals(d: float, kind: str, why: str) -> None:
    """Issue 11: a variant the record cannot provide is an original with delta 0, never a relabelled copy."""
    rows = _plan([_bare()], d)
    assert [r.kind for r in rows] == ["original"] * 4
    assert [r.label for r in rows] == [d] * 4  # delta 0: the question's own D, not D + delta
    assert rows[0].fallback is None
    for r in rows[1:]:
        assert r.fallback == f"{kind}: {why}" and r.fallback_kind == kind
        assert r.text == "What is 2+2?" and r.perturb is None


def test_realisable_variants_keep_their_kind_and_delta() -> None:
    rec = generate_world(1, seed=0, split="train")[0]
    hard, medium, easy = _plan([rec], 9.0), _plan([rec], 5.0), _plan([rec], 1.0)
    assert {r.kind for r in hard[1:]} == {"hint"} and all(r.label < 9.0 for r in hard[1:])
    assert {r.kind for r in medium[1:]} == {"paraphrase"} and all(r.label == 5.0 for r in medium[1:])
    assert {r.kind for r in easy[1:]} == {"image"} and all(r.label > 1.0 for r in easy[1:])
    assert all(r.fallback is None for r in hard + medium + easy)
    assert all(r.perturb is not None and "seed" in r.perturb for r in easy[1:])
    assert [r.family for r in hard] == [0] * 4


def test_image_variant_without_paraphrases_stays_an_image_variant() -> None:
    """The planner may reword an image variant; without paraphrases it perturbs the original text's image."""
    rec = generate_world(1, seed=0, split="train")[0]
    rec.variants = []
    rows = _plan([rec], 1.0, v=8)
    assert {r.kind for r in rows[1:]} == {"image"} and all(r.fallback is None for r in rows[1:])
    assert all(r.text.startswith(rec.problem) for r in rows[1:])


def test_text_in_image_records_are_rotated_only() -> None:
    """official-diva.md: an OCR question (text_in_image) is perturbed by rotation only."""
    rec = generate_world(1, seed=0, split="train")[0]
    rec.meta["text_in_image"] = True
    rows = _plan([rec], 1.0, v=12)
    for r in rows[1:]:
        assert r.perturb is not None and r.perturb["rotation_deg"] != 0
        assert r.perturb["noise_sigma"] == 0 and r.perturb["blur_kernel"] <= 1 and r.perturb["salt_pepper"] == 0


def test_settings_report_every_problem() -> None:
    problems = PlanSettings(num_variants=-1, plan="x", d_mid=10, intensity_range=(0.5, 0.2),
                            image_ops=("swirl",)).check()
    assert len(problems) == 5


def test_datamodule_counts_fallbacks_by_kind_and_warns_once(tmp_path: object, caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    from diva_lightning.data.batch import QuestionBatch
    from diva_lightning.data.schema import write_records

    path = write_records([_bare(id=f"q{i}") for i in range(2)], tmp_path / "bare.jsonl")  # type: ignore[operator]
    dm = DivaDataModule(train_source=str(path), val_source=str(path), test_source=None, questions_per_step=2,
                        num_variants=2)
    dm.setup("fit")
    dm.use_difficulty(table := DifficultyTable())
    table.update(["q0", "q1"], torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))  # both go hard: hints
    with caplog.at_level(logging.WARNING):
        for position in (0, 1):
            batch = dm.build_families(QuestionBatch(dm.train_records, [[], []], position=position), 2)
            assert batch.meta["fallbacks"] == {"hint": 4}
            assert batch.kind.tolist() == [KIND_CODES["original"]] * 6
            assert batch.is_original.tolist() == [True, False, False] * 2
    warned = [r for r in caplog.records if "cannot be built" in r.getMessage()]
    assert len(warned) == 2 and {"'q0'" in w.getMessage() or "'q1'" in w.getMessage() for w in warned} == {True}
    assert dm.fallbacks == 8


def test_records_own_difficulty_seeds_the_table(tmp_path: object) -> None:
    """docs/data.md promises a record's `difficulty` is its initial D; every question used to start at 5."""
    import lightning.pytorch as pl

    from diva_lightning.callbacks import DifficultyCallback
    from diva_lightning.data.batch import QuestionBatch
    from diva_lightning.data.schema import write_records

    records = [_bare(id="easy", difficulty=2.0), _bare(id="hard", difficulty=8.5), _bare(id="plain")]
    path = write_records(records, tmp_path / "d.jsonl")  # type: ignore[operator]
    dm = DivaDataModule(train_source=str(path), val_source=str(path), test_source=None, questions_per_step=1)
    dm.setup("fit")
    assert dm.initial_difficulties() == {"easy": 2.0, "hard": 8.5}
    callback = DifficultyCallback(initial=5.0)
    trainer = pl.Trainer(callbacks=[callback], logger=False, enable_checkpointing=False)
    trainer.datamodule = dm  # what Trainer.fit attaches before the setup hooks
    callback.setup(trainer, pl.LightningModule(), "fit")
    assert callback.table.lookup(["easy", "hard", "plain"]).tolist() == [2.0, 8.5, 5.0]
    qb = QuestionBatch(dm.train_records, [[] for _ in dm.train_records], position=0)
    assert dm.build_families(qb, 0).question_difficulty.tolist() == [2.0, 8.5, 5.0]  # planned from the callback's
    callback.table.update(["easy"], torch.tensor([0.0]), torch.tensor([1.0]))  # 2 + 4 * 0.5 = 4
    assert dm.build_families(qb, 0).question_difficulty.tolist() == [4.0, 8.5, 5.0]  # the live table, not a copy
    callback.table.seed(dm.initial_difficulties())  # seeding never overwrites a value the run has learned
    assert callback.table.lookup(["easy"]).tolist() == [4.0]


def test_paraphrase_plan_rewords_every_question_whatever_its_difficulty() -> None:
    """plan="paraphrase" (Share-GRPO): easy and hard questions get paraphrases too, labelled with their own D."""
    rec = generate_world(1, seed=0, split="train")[0]
    for d in (1.0, 5.0, 9.0):
        rows = _plan([rec], d, plan="paraphrase")
        assert [r.kind for r in rows] == ["original"] + ["paraphrase"] * 3
        assert all(r.label == d and r.fallback is None and r.perturb is None for r in rows)
        assert len({r.text for r in rows}) == 4 and all(r.text in rec.variants for r in rows[1:])
    # without stored paraphrases: labelled originals, as for any plan
    rows = _plan([_bare()], 1.0, plan="paraphrase")
    assert [r.fallback for r in rows[1:]] == ["paraphrase: no paraphrases"] * 3
