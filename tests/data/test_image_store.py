"""Images keyed by (data file, id), each file's paths resolved against its own folder (issue 16 item 2).

The two bugs this pins: train and val files in different folders (training images were looked up in the val
folder), and train and val files sharing ids (validation silently used training images).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from diva_lightning.data.images import ImageError, ImageStore
from diva_lightning.data.schema import QuestionRecord, RecordError, load_records, write_records
from diva_lightning.system.datamodule import DivaDataModule
from tests.data.corpus import solid_png, truncated

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _split(folder: Path, color: tuple[int, int, int], ids: list[str], bad: str | None = None) -> Path:
    """A data file in its own folder whose images (same relative names in every split) are one colour."""
    (folder / "img").mkdir(parents=True)
    rows = []
    for rid in ids:
        data = truncated(solid_png(color, (64, 64))) if rid == bad else solid_png(color)
        (folder / "img" / f"{rid}.png").write_bytes(data)
        rows.append(json.dumps({"id": rid, "problem": "Which colour is <image>?", "answer": "1",
                                "images": [f"img/{rid}.png"]}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _color(image: torch.Tensor) -> tuple[int, int, int]:
    r, g, b = (image[:, 0, 0] * 255).round().int().tolist()
    return r, g, b


def test_files_in_different_folders_with_shared_ids_never_share_images(tmp_path: Path) -> None:
    ids = ["q1", "q2", "q3", "q4"]
    dm = DivaDataModule(train_source=str(_split(tmp_path / "train", RED, ids)),
                        val_source=str(_split(tmp_path / "val", BLUE, ids)),
                        test_source=str(_split(tmp_path / "test", GREEN, ids)),
                        questions_per_step=2, val_batch_size=4)
    dm.setup("fit")
    dm.setup("test")
    train_batch = dm.question_batch(0)
    assert {_color(imgs[0]) for imgs in train_batch.images} == {RED}
    (val_batch,) = list(dm.val_dataloader()[0])  # one loader per validation source
    assert [r.id for r in val_batch.records] == ids and {_color(i[0]) for i in val_batch.images} == {BLUE}
    (test_batch,) = list(dm.test_dataloader()[0])
    assert {_color(i[0]) for i in test_batch.images} == {GREEN}
    assert len(dm.images) == 12  # 4 ids x 3 files, decoded at load; none decoded again
    assert dm.train_records[0].data_file == str((tmp_path / "train" / "data.jsonl").resolve())


def test_skip_mode_skips_and_counts_bad_images_in_train_val_and_test(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    ids = ["a", "b", "c"]
    files = {s: _split(tmp_path / s, RED, ids, bad="b") for s in ("train", "val", "test")}
    dm = DivaDataModule(train_source=str(files["train"]), val_source=str(files["val"]),
                        test_source=str(files["test"]), questions_per_step=2, on_error="skip")
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
        dm.setup("test")
    for records in (dm.train_records, dm.val_records, dm.test_records):
        assert [r.id for r in records] == ["a", "c"]
    for path in files.values():
        assert f"{path}: loaded 2 of 3 rows (3 images checked); skipped 1 (images: 1)" in caplog.text
    # raise mode: the same file stops the run in setup, before any model or batch, naming row, id and file
    with pytest.raises(RecordError, match=r"data.jsonl:row 2 \(id 'b'\): field 'images': item 0 'img/b.png': "
                                          "cannot decode image"):
        DivaDataModule(train_source=str(files["train"]), questions_per_step=2).setup("fit")


def test_records_built_in_code_are_decoded_on_first_use_with_the_same_checks(tmp_path: Path) -> None:
    store = ImageStore(max_pixels=100)
    (tmp_path / "p.png").write_bytes(solid_png(RED, (8, 8)))
    a = QuestionRecord("same", "<image>", "1", [solid_png(BLUE, (5, 5))])
    b = QuestionRecord("same", "<image>", "1", ["p.png"], data_file=str(tmp_path / "x.jsonl"))
    c = QuestionRecord("same", "<image>", "1", [solid_png(GREEN, (5, 5))])  # same id, no file, other image
    assert _color(store.get(a)[0]) == BLUE and _color(store.get(b)[0]) == RED  # same id, other file
    assert _color(store.get(c)[0]) == GREEN and _color(store.get(a)[0]) == BLUE
    assert len(store) == 3 and store.nbytes == 3 * 25 * 2 + 3 * 64
    big = QuestionRecord("big", "<image>", "1", [solid_png(RED, (20, 20))])
    with pytest.raises(ImageError, match=r"record 'big': field 'images': item 0 <\d+ inline bytes>: 20x20 = 400 "
                                         r"pixels is over the limit of 100"):
        store.get(big)


def test_writing_records_elsewhere_keeps_their_image_paths_resolvable(tmp_path: Path) -> None:
    source = _split(tmp_path / "src", RED, ["a"])
    records = load_records(source)
    out = write_records(records, tmp_path / "elsewhere" / "copy.jsonl")
    again = load_records(out)
    assert again[0].images == ["../src/img/a.png"]
    assert _color(ImageStore().get(again[0])[0]) == RED
