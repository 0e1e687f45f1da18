"""The authors' DIVA training parquet loads unchanged and trains (issue 12 item 6).

The file is written here in exactly their layout (../shared/reference/official-diva.md): `images` as ONE
`{bytes, path}` struct, `variant` / `step2` (or the newer generator's `variants` / `think_steps`), `step1`,
`answer1`, `answer2`, `correct_think`, `difficulty` as int64, `category`, `subject`, `text_in_image`.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diva_lightning.cli import run_cli
from diva_lightning.data.schema import RecordError, load_records
from diva_lightning.data.world import generate_world

REPO = Path(__file__).resolve().parents[2]
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
AUTHORS_SCHEMA = pa.schema([
    ("id", pa.string()), ("problem", pa.string()), ("answer", pa.string()), ("images", IMAGE),
    ("variant", pa.list_(pa.string())), ("step1", pa.list_(pa.string())), ("step2", pa.list_(pa.string())),
    ("answer1", pa.string()), ("answer2", pa.string()), ("correct_think", pa.bool_()),
    ("difficulty", pa.int64()), ("category", pa.string()), ("subject", pa.string()),
    ("text_in_image", pa.bool_()),
])


def authors_parquet(path: Path, n: int, *, newer_names: bool = False, image_list: bool = False) -> Path:
    """World questions written as the authors' training rows."""
    rows = []
    for k, r in enumerate(generate_world(n, seed=5)):
        image = {"bytes": r.images[0], "path": f"{r.id}.png"}
        rows.append({
            "id": r.id, "problem": r.problem, "answer": r.answer, "images": [image] if image_list else image,
            "variants" if newer_names else "variant": r.variants,
            "step1": r.think_steps[:1], "think_steps" if newer_names else "step2": r.think_steps,
            "answer1": r.answer, "answer2": r.answer, "correct_think": True, "difficulty": 5,
            "category": "origin_problem", "subject": "counting", "text_in_image": k % 2 == 0 if k < 4 else None,
        })
    schema = AUTHORS_SCHEMA
    if newer_names or image_list:
        fields = {"variant": "variants", "step2": "think_steps"} if newer_names else {}
        schema = pa.schema([pa.field(fields.get(f.name, f.name),
                                     pa.list_(IMAGE) if f.name == "images" and image_list else f.type)
                            for f in AUTHORS_SCHEMA])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.mark.parametrize("layout", [{}, {"newer_names": True}, {"image_list": True}])
def test_authors_rows_load_unchanged(tmp_path: Path, layout: dict[str, bool]) -> None:
    world = generate_world(6, seed=5)
    records = load_records(authors_parquet(tmp_path / "train.parquet", 6, **layout))
    assert [r.id for r in records] == [w.id for w in world]
    for r, w in zip(records, world):
        assert (r.problem, r.answer, r.images, r.variants, r.think_steps) == (
            w.problem, w.answer, w.images, w.variants, w.think_steps)
        assert r.difficulty == 5.0
        assert r.meta["category"] == "origin_problem" and r.meta["subject"] == "counting"
        assert r.meta["step1"] == w.think_steps[:1] and r.meta["correct_think"] is True
    # text_in_image: kept as a bool where present (null in parquet = absent)
    assert [r.meta.get("text_in_image") for r in records] == [True, False, True, False, None, None]


def test_authors_rows_with_wrongly_typed_fixed_fields_are_refused(tmp_path: Path) -> None:
    table = pa.Table.from_pylist([{"id": "a", "problem": "<image>", "answer": "1",
                                   "images": {"bytes": generate_world(1, seed=0)[0].images[0], "path": "a.png"},
                                   "difficulty": "5", "text_in_image": "false", "level": "Level 3"}])
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(RecordError) as info:
        load_records(tmp_path / "bad.parquet")
    assert [(p.row, p.record_id, p.field) for p in info.value.problems] == [
        (1, "a", "difficulty"), (1, "a", "level"), (1, "a", "text_in_image")]


@pytest.mark.slow
def test_authors_parquet_trains_for_two_steps(tiny_policy_dir: str, tmp_path: Path) -> None:
    data = authors_parquet(tmp_path / "train.parquet", 8)
    cli = run_cli([
        "fit", "--config", str(REPO / "experiments/full.yaml"), "--model.init_args.policy", tiny_policy_dir,
        "--build_base_policy", "false", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.init_args.train_source", str(data), "--data.init_args.val_source", str(data),
        "--data.init_args.questions_per_step", "2", "--model.init_args.num_generations", "2",
        "--model.init_args.train_sampling.max_new_tokens", "8",
    ])
    assert cli.trainer.global_step == 2
    dm = cli.datamodule
    assert len(dm.train_records) == 8 and len(dm.images) == 8
    assert dm.train_records[0].meta["text_in_image"] is True
