"""`python -m diva_lightning augment` end to end: plain questions in, DIVA-ready records out, and they train."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diva_lightning.cli import main, run_cli
from diva_lightning.data.schema import load_records_with_report
from diva_lightning.data.world import generate_world, render_tensor, write_world
from diva_lightning.teacher import Request, VLLMTeacher
from diva_lightning.teacher.augment import select
from diva_lightning.teacher.vllm import chat_messages
from tests.test_module import small_args


def _plain(tmp: Path, n: int) -> Path:
    records = [replace(r, variants=[], think_steps=[]) for r in generate_world(n, seed=2, split="train")]
    return write_world(records, tmp, "plain")


def test_augment_command_with_ids_writes_records_and_the_table(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    data = _plain(tmp_path, 6)
    out = tmp_path / "aug.jsonl"
    main(["augment", "--data", str(data), "--output", str(out), "--teacher", "WorldTeacher", "--k", "3",
          "--ids", "world-train-s2-000001,world-train-s2-000004", "--verify-paraphrases", "--no-progress"])
    records, _ = load_records_with_report(out)
    assert [r.id for r in records] == ["world-train-s2-000001", "world-train-s2-000004"]
    assert all(len(r.variants) == 3 for r in records)
    printed = capsys.readouterr().out
    table = [line.split() for line in printed.splitlines()]
    assert ["item", "outcome", "count", "share"] in table
    assert ["variants", "kept", "6", "100.0%"] in table
    steps_kept = sum(r.meta["augment"]["counts"]["think_steps"]["kept"] for r in records)
    assert ["think_steps", "kept", str(steps_kept), f"{steps_kept / 2:.1%}"] in table
    assert "2 question(s) in" in printed and "s/question" in printed


def test_authors_parquet_in_jsonl_out(tmp_path: Path) -> None:
    """The authors' layout: one {bytes, path} image dict per row, `variant`/`step2`, their extra fields."""
    records = generate_world(3, seed=5, split="train")
    rows = [{"id": r.id, "problem": r.problem, "answer": r.answer, "images": {"bytes": r.images[0], "path": None},
             "variant": [], "step2": [], "difficulty": 5, "category": "origin_problem", **r.meta} for r in records]
    columns = list(dict.fromkeys(k for row in rows for k in row))  # the families' meta keys differ
    pq.write_table(pa.table({k: [row.get(k) for row in rows] for k in columns}), tmp_path / "official.parquet")
    out = tmp_path / "aug.jsonl"
    main(["augment", "--data", str(tmp_path / "official.parquet"), "--output", str(out), "--teacher",
          "diva_lightning.teacher.WorldTeacher", "--only", "variants", "--no-progress"])
    loaded, report = load_records_with_report(out, inline_images=True)
    assert report.skipped == 0 and [r.id for r in loaded] == [r.id for r in records]
    for before, after in zip(records, loaded):
        assert after.images == before.images and len(after.variants) == 5 and after.think_steps == []
        assert after.meta["category"] == "origin_problem" and "variant" not in after.meta
        assert after.meta["augment"]["settings"]["tasks"] == ["variants"]
        assert after.meta["augment"]["counts"]["think_steps"] == {"kept": 0, "rejected": {}}


def test_select_by_id_file_and_limit(tmp_path: Path) -> None:
    records = generate_world(5, seed=2, split="train")
    ids = tmp_path / "ids.txt"
    ids.write_text("world-train-s2-000003\n\nworld-train-s2-000000\n")
    assert [r.id for r in select(records, str(ids), None)] == ["world-train-s2-000000", "world-train-s2-000003"]
    assert [r.id for r in select(records, None, 2)] == ["world-train-s2-000000", "world-train-s2-000001"]
    assert select(records, "world-train-s2-000004", 0) == []


def test_bad_invocations_fail_clearly(tmp_path: Path) -> None:
    data = _plain(tmp_path, 2)
    with pytest.raises(SystemExit):
        main(["augment", "--data", str(data), "--output", str(tmp_path / "o.jsonl")])  # no teacher
    with pytest.raises(ValueError, match="1 id.s. not in the data: nope"):
        main(["augment", "--data", str(data), "--output", str(tmp_path / "o.jsonl"), "--teacher", "WorldTeacher",
              "--ids", "nope,world-train-s2-000000"])


def test_vllm_teacher_messages_and_missing_extra() -> None:
    record = generate_world(1, seed=0, split="train")[0]
    image = render_tensor(record)
    request = Request("revise", (("user", f"Solve: {record.problem} Steps please."), ("assistant", "<step1>a</step1>"),
                                 ("user", "The correct answer to this question is: 2")), (image,), record)
    messages = chat_messages(request, system="Be brief.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    before, after = record.problem.split("<image>")
    parts = messages[1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url"] + (["text"] if after else [])
    assert parts[0]["text"] == f"Solve: {before}" and parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert messages[2:] == [{"role": "assistant", "content": "<step1>a</step1>"},
                            {"role": "user", "content": "The correct answer to this question is: 2"}]
    text_only = Request("paraphrase", (("user", f"Reword: {record.problem}"),), (), record, count=2)
    assert chat_messages(text_only) == [{"role": "user", "content": f"Reword: {record.problem}"}]
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'diva-lightning\[vllm\]'"):
            VLLMTeacher("any/model")


@pytest.mark.slow
def test_world_teacher_records_train(tiny_policy_dir: str, tmp_path: Path) -> None:
    """Plain world questions -> augment (world teacher) -> a short real `fit` on the file. The plain file's
    planned paraphrases fall back to the original; the augmented file's do not."""
    data = _plain(tmp_path, 16)
    out = tmp_path / "aug.jsonl"
    main(["augment", "--data", str(data), "--output", str(out), "--teacher", "WorldTeacher", "--no-progress"])

    def fit(source: Path) -> Any:
        return run_cli(small_args(tiny_policy_dir, tmp_path / source.stem, "--data.init_args.train_source", str(source),
                                  "--data.init_args.val_source", str(source), steps=3))

    cli = fit(out)
    rec = next(c for c in cli.trainer.callbacks if type(c).__name__ == "Recorder")
    assert len(rec.outputs) == 3
    assert set(rec.tables[-1]) <= {r.id for r in load_records_with_report(out)[0]}
    assert cli.datamodule.fallbacks == 0  # every planned paraphrase existed
    assert fit(data).datamodule.fallbacks > 0  # the same plan on the plain file could not be built
