"""The procedural world: determinism, split disjointness, schema validity, answers that match the
pixels (recounted by an independent classifier), think steps, and level-controlled difficulty."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from diva_lightning.data.schema import QuestionRecord, decode_image, load_records
from diva_lightning.data.world import (
    COLORS,
    FAMILIES,
    SHAPES,
    board_split,
    format_response,
    generate_world,
    render_tensor,
    world_corpus,
    write_world,
)

CELL = 28


@pytest.fixture(scope="module")
def train() -> list[QuestionRecord]:
    return generate_world(200, seed=7)


def classify_cell(cell: torch.Tensor) -> str:
    """Independent reading of one ``[3, 28, 28]`` cell: colour by dominant channels, shape by area.

    Areas of the drawn shapes: square 20x20 = 400, circle of radius 10 ~ 314, triangle ~ 200.
    """
    ink = (cell < 0.95).any(dim=0)  # [28, 28] non-white pixels
    area = int(ink.sum())
    if area == 0:
        return ""
    r, g, b = (float(cell[ch][ink].mean()) for ch in range(3))
    if r > 0.6 and g > 0.6:
        color = "yellow"
    elif r > 0.6:
        color = "red"
    elif g > b:
        color = "green"
    else:
        color = "blue"
    shape = "square" if area > 360 else "circle" if area > 260 else "triangle"
    return f"{color} {shape}"


def read_board(image: torch.Tensor, grid: int) -> list[list[str]]:
    return [[classify_cell(image[:, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]) for c in range(grid)]
            for r in range(grid)]


def answer_from_board(record: QuestionRecord, board: list[list[str]]) -> str:
    """Recompute the answer from a board read off the pixels and the question's own words."""
    objects = [cell.split(" ") for row in board for cell in row if cell]
    family, meta = record.meta["family"], record.meta
    if family == "count_shape":
        assert f"{meta['shape']}s" in record.problem
        return str(sum(s == meta["shape"] for _, s in objects))
    if family == "compare":
        a, b = meta["colors"]
        assert f"(A) {a} (B) {b} (C) equal" in record.problem
        n_a, n_b = (sum(c == x for c, _ in objects) for x in (a, b))
        return "A" if n_a > n_b else "B" if n_b > n_a else "C"
    assert meta["color"] in record.problem
    n = sum(c == meta["color"] for c, _ in objects)
    if family == "count_plus":
        assert f"Add {meta['add']} " in record.problem
        n += meta["add"]
    return str(n)


def test_same_seed_same_world_and_different_seed_different_world() -> None:
    a, b = generate_world(40, seed=3), generate_world(40, seed=3)
    assert a == b  # includes the PNG bytes
    c = generate_world(40, seed=4)
    assert [r.images for r in a] != [r.images for r in c]
    assert {r.id for r in a}.isdisjoint(r.id for r in c)


def test_splits_never_share_an_image_or_an_id() -> None:
    worlds = {s: generate_world(120, seed=0, split=s) for s in ("train", "val", "test")}
    worlds["train2"] = generate_world(120, seed=1, split="train")
    boards = {s: {repr(r.meta["cells"]) for r in recs} for s, recs in worlds.items()}
    for s in ("val", "test"):
        assert boards[s].isdisjoint(boards["train"] | boards["train2"])
    assert boards["val"].isdisjoint(boards["test"])
    for s, recs in worlds.items():
        assert all(board_split(r.meta["cells"]) == s.rstrip("2") for r in recs)
        assert all(r.id.startswith(f"world-{s.rstrip('2')}-") for r in recs)
    # Within one call no (family, query, board) repeats.
    keys = [repr(sorted(r.meta.items())) for r in worlds["train"]]
    assert len(set(keys)) == len(keys)


def test_written_world_loads_through_the_real_data_loader(tmp_path: Path,
                                                          train: list[QuestionRecord]) -> None:
    path = write_world(train, tmp_path)
    assert load_records(path, inline_images=True) == train  # validates every record, raising on any problem
    assert len(list((tmp_path / "world_images").glob("*.png"))) == len(train)


def test_answers_match_the_pixels_and_the_fast_renderer(train: list[QuestionRecord]) -> None:
    for record in train:
        image = decode_image(record.images[0])
        grid = record.meta["grid"]
        assert image.shape == (3, grid * CELL, grid * CELL)
        assert torch.equal(render_tensor(record), image)  # fast path draws exactly the PNG's pixels
        board = read_board(image, grid)
        assert board == record.meta["cells"]
        assert answer_from_board(record, board) == record.answer


def test_think_steps_count_by_content_as_read_from_the_pixels(train: list[QuestionRecord]) -> None:
    """Every step names what it counts; the count is re-read from the decoded image, not from meta."""
    for record in train:
        steps, board = record.think_steps, read_board(decode_image(record.images[0]), record.meta["grid"])
        objects = [cell.split(" ") for row in board for cell in row if cell]
        if record.meta["family"] == "compare":
            a, b = record.meta["colors"]
            n_a, n_b = (sum(c == x for c, _ in objects) for x in (a, b))
            sign = ">" if n_a > n_b else "<" if n_a < n_b else "="
            assert steps == [f"{a} shapes: {n_a}.", f"{b} shapes: {n_b}.", f"{n_a} {sign} {n_b}, so {record.answer}."]
            continue
        counted = steps[:-1] if record.meta["family"] == "count_plus" else steps
        running = 0
        for step in counted:
            color, shape, n, total = re.fullmatch(r"(\w+) (\w+)s: (\d+)\. Total (\d+)\.", step).groups()
            assert int(n) == sum(o == [color, shape] for o in objects), (record.id, step)
            running += int(n)
            assert int(total) == running
        if record.meta["family"] == "count_color":
            assert [s.split(" ")[1] for s in counted] == [f"{x}s:" for x in SHAPES]
        if record.meta["family"] == "count_shape":
            assert [s.split(" ")[0] for s in counted] == list(COLORS)
        if record.meta["family"] == "count_plus":
            assert steps[-1] == f"Add {record.meta['add']}. Total {running + record.meta['add']}."
        assert re.search(r"Total (\d+)\.$", steps[-1]).group(1) == record.answer


def test_level_sets_the_number_of_targets_and_distractors() -> None:
    world = generate_world(400, seed=11, families=("count_color",))
    by_level: dict[int, list[tuple[int, int]]] = {}
    for r in world:
        objects = [c for row in r.meta["cells"] for c in row if c]
        n_target = sum(c.startswith(r.meta["color"] + " ") for c in objects)
        by_level.setdefault(r.meta["level"], []).append((n_target, len(objects) - n_target))
    assert sorted(by_level) == [1, 2, 3, 4, 5]
    # Level 1: 1-2 targets, no distractors.
    assert all(1 <= t <= 2 and d == 0 for t, d in by_level[1])
    means = [sum(t + d for t, d in by_level[lv]) / len(by_level[lv]) for lv in range(1, 6)]
    assert means == sorted(means) and means[-1] > 3 * means[0]
    assert max(d for _, d in by_level[5]) > 0


def test_record_fields_variants_and_answer_balance(train: list[QuestionRecord]) -> None:
    assert Counter(r.meta["family"] for r in train) == {f: 50 for f in FAMILIES}
    for r in train:
        assert len(r.variants) >= 5 and len(set(r.variants + [r.problem])) == len(r.variants) + 1
        assert all(v.count("<image>") == 1 for v in [r.problem, *r.variants])
        assert r.difficulty == 5.0 and 1 <= r.meta["level"] <= 5
        assert r.answer_type == ("choice" if r.meta["family"] == "compare" else "integer")
    letters = Counter(r.answer for r in train if r.meta["family"] == "compare")
    assert set(letters) == {"A", "B", "C"} and min(letters.values()) >= 8


def test_format_response_and_corpus(train: list[QuestionRecord]) -> None:
    record = train[0]
    response = format_response(record)
    match = re.fullmatch(r"<think> (.+) </think> \\boxed\{(.+)\}", response)
    assert match and match.group(2) == record.answer
    assert match.group(1) == " ".join(record.think_steps)
    # After a k-step hint the target goes on from step k+1 (the hint is in the prompt, not repeated).
    k = len(record.think_steps) - 1
    last = f"<think> {record.think_steps[-1]} </think> \\boxed{{{record.answer}}}"
    assert format_response(record, after_hint=k) == last
    with pytest.raises(ValueError, match="after_hint"):
        format_response(record, after_hint=k + 1)
    corpus = world_corpus(train)
    assert response in corpus and record.problem in corpus and record.variants[-1] in corpus
    assert any(t.startswith("Hint:") for t in corpus) and any("rotated by 45 degrees" in t for t in corpus)


def test_bigger_grid_and_bad_arguments() -> None:
    (record,) = generate_world(1, seed=0, grid=6, levels=(5,))
    assert len(record.meta["cells"]) == 6 and len(record.think_steps) == 3  # count_color: one step per shape
    assert decode_image(record.images[0]).shape == (3, 168, 168)
    with pytest.raises(ValueError, match="split"):
        generate_world(1, seed=0, split="dev")
    with pytest.raises(ValueError, match="levels"):
        generate_world(1, seed=0, levels=(6,))
    with pytest.raises(ValueError, match="families"):
        generate_world(1, seed=0, families=("sum",))
