"""A procedural visual-counting world for testing DIVA-GRPO end to end with a tiny policy.

An image is a ``grid x grid`` board of ``cell_px``-pixel cells (28 px = one merged Qwen2.5-VL vision
token per cell), each empty or holding one large filled shape (square, circle, triangle) in one of four
saturated colours on white. Question families:

- ``count_color``: "How many red shapes are in <image>?" (integer)
- ``count_shape``: "How many circles are in <image>?" (integer)
- ``count_plus``: count of a colour plus a number given in the text (integer)
- ``compare``: "Are there more red or blue shapes ...? (A) red (B) blue (C) equal" (choice)

The intrinsic level (1..``max_level``) sets how many targets and distractors the board holds, so it
really changes how often a small model is right; the think steps count by content (shape by shape or
colour by colour, with a running total: see :func:`solve`), so a hint that reveals the first steps leaves
less to count. Level, family, query and the board itself are in ``meta`` (``render_tensor`` redraws the
image from them).

Split disjointness: the split of a board is a hash of its cell contents (80/10/10 buckets), and a
generator for split ``s`` rejects boards whose bucket is not ``s``. So no image (hence no
(family, board) pair) can appear in two splits, whatever seeds are used; ids are also prefixed with
the split. Within one call the (family, query, board) triples are unique.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from diva_lightning.data.schema import QuestionRecord, write_records
from diva_lightning.data.variants import HINT_PREFIX, rotation_notice

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 200, 30),
}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (255, 255, 255)
FAMILIES = ("count_color", "count_shape", "count_plus", "compare")
SPLITS = ("train", "val", "test")
_SPLIT_BUCKETS = {"train": (0, 800), "val": (800, 900), "test": (900, 1000)}  # of 1000 hash buckets
_MAX_TRIES = 2000

# Original problem first, then the paraphrases; every template holds exactly one <image>.
_CHOICES = "(A) {a} (B) {b} (C) equal"
TEMPLATES: dict[str, tuple[str, ...]] = {
    "count_color": (
        "How many {color} shapes are in <image>?",
        "Count the {color} shapes in <image>.",
        "<image> How many shapes are {color}?",
        "Look at <image>. How many {color} shapes are there?",
        "What is the number of {color} shapes in <image>?",
        "In <image>, count the shapes that are {color}.",
    ),
    "count_shape": (
        "How many {shape}s are in <image>?",
        "Count the {shape}s in <image>.",
        "<image> How many shapes are {shape}s?",
        "Look at <image>. How many {shape}s are there?",
        "What is the number of {shape}s in <image>?",
        "In <image>, count the shapes that are {shape}s.",
    ),
    "count_plus": (
        "How many {color} shapes are in <image>? Add {add} to that number.",
        "Count the {color} shapes in <image>, then add {add}.",
        "<image> Take the number of {color} shapes and add {add}.",
        "Look at <image>. What is {add} more than the number of {color} shapes?",
        "What is the number of {color} shapes in <image> plus {add}?",
        "In <image>, count the {color} shapes and add {add} to the count.",
    ),
    "compare": tuple(t + " " + _CHOICES for t in (
        "Are there more {a} or {b} shapes in <image>?",
        "In <image>, which are more: {a} shapes or {b} shapes?",
        "<image> Compare the {a} and {b} shapes. Which are more?",
        "Look at <image>. Are {a} shapes or {b} shapes more?",
        "Count the {a} and the {b} shapes in <image>. Which color has more?",
        "Which color has more shapes in <image>, {a} or {b}?",
    )),
}

Board = list[list[str]]  # [grid][grid] of "" or "<color> <shape>"


@lru_cache(maxsize=16)
def shape_mask(shape: str, cell_px: int = 28) -> torch.Tensor:
    """Boolean ``[cell_px, cell_px]`` mask of a shape centred in its cell with a margin of cell/7."""
    m = cell_px // 7
    c = (cell_px - 1) / 2
    y, x = torch.meshgrid(torch.arange(cell_px, dtype=torch.float32),
                          torch.arange(cell_px, dtype=torch.float32), indexing="ij")
    inside = (y >= m) & (y < cell_px - m) & (x >= m) & (x < cell_px - m)
    if shape == "square":
        return inside
    if shape == "circle":
        return (y - c) ** 2 + (x - c) ** 2 <= ((cell_px - 2 * m) / 2) ** 2
    if shape == "triangle":  # apex up: the half width grows linearly down to the base
        half = (y - m + 0.5) / 2
        return inside & ((x - c).abs() <= half)
    raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=16)
def _pil_mask(shape: str, cell_px: int) -> Image.Image:
    mask = shape_mask(shape, cell_px).to(torch.uint8).mul(255).flatten().tolist()
    return Image.frombytes("L", (cell_px, cell_px), bytes(mask))


def _objects(board: Board) -> list[tuple[int, int, str, str]]:
    return [(r, c, *cell.split(" ")) for r, row in enumerate(board) for c, cell in enumerate(row) if cell]


def render_png(board: Board, cell_px: int = 28) -> bytes:
    """The board as PNG bytes (lossless, so decoding gives back exactly :func:`render_board`)."""
    size = len(board) * cell_px
    img = Image.new("RGB", (size, size), BACKGROUND)
    for r, c, color, shape in _objects(board):
        box = (c * cell_px, r * cell_px, (c + 1) * cell_px, (r + 1) * cell_px)
        img.paste(COLORS[color], box, _pil_mask(shape, cell_px))
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=1)  # speed over size: these images are tiny anyway
    return out.getvalue()


def render_board(board: Board, cell_px: int = 28) -> torch.Tensor:
    """The board as a float tensor ``[3, H, W]`` in ``[0, 1]`` without PNG encoding (the fast path).

    Vectorised: a colour code per pixel is built for all cells at once, then looked up in a palette.
    """
    grid = len(board)
    shape_code = torch.tensor([[SHAPES.index(c.split(" ")[1]) + 1 if c else 0 for c in row] for row in board])
    color_code = torch.tensor([[list(COLORS).index(c.split(" ")[0]) + 1 if c else 0 for c in row]
                               for row in board])  # [G, G], 0 = empty
    masks = torch.stack([torch.zeros(cell_px, cell_px, dtype=torch.bool)]
                        + [shape_mask(s, cell_px) for s in SHAPES])  # [S + 1, px, px]
    ink = masks[shape_code]  # [G, G, px, px]
    code = torch.where(ink, color_code[:, :, None, None], 0)  # [G, G, px, px]
    code = code.permute(0, 2, 1, 3).reshape(grid * cell_px, grid * cell_px)  # [H, W]
    palette = torch.tensor([BACKGROUND, *COLORS.values()], dtype=torch.float32) / 255.0  # [C + 1, 3]
    return palette[code].permute(2, 0, 1).contiguous()  # [3, H, W]


def render_tensor(record: QuestionRecord) -> torch.Tensor:
    """Redraw a world record's image from its meta: ``[3, H, W]`` float in ``[0, 1]``."""
    return render_board(record.meta["cells"], record.meta["cell_px"])


def _level_ranges(level: int, max_level: int, n_cells: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(targets lo/hi, distractors lo/hi), growing smoothly with the level. On a 4 x 4 board:
    level 1 = 1-2 targets, no distractors; 2 = 1-3 / 0-1; 3 = 2-5 / 1-2; 4 = 3-8 / 2-4; 5 = 5-10 / 3-6.
    (A linear ramp put distractors and up to 4 targets at level 2 already, and the base policy's accuracy
    fell from 0.92 at level 1 to a flat ~0.43 over levels 2-4.)"""
    frac = (level - 1) / (max_level - 1) if max_level > 1 else 0.0
    t_lo = min(1 + round(frac**2 * n_cells / 4), n_cells)
    t_hi = min(2 + round(frac**1.3 * n_cells / 2), n_cells)
    return (t_lo, t_hi), (round(frac**2 * n_cells * 3 / 16), round(frac**1.5 * n_cells * 3 / 8))


def _draw_question(rng: random.Random, family: str, level: int, max_level: int, grid: int
                   ) -> tuple[dict[str, Any], Board]:
    """Draw the query (meta fields) and a board for one question."""
    n_cells = grid * grid
    (t_lo, t_hi), (d_lo, d_hi) = _level_ranges(level, max_level, n_cells)
    n_targets = rng.randint(t_lo, t_hi)
    n_distract = rng.randint(min(d_lo, n_cells - n_targets), min(d_hi, n_cells - n_targets))
    colors, shapes = list(COLORS), list(SHAPES)
    query: dict[str, Any]
    if family in ("count_color", "count_plus"):
        color = rng.choice(colors)
        others = [x for x in colors if x != color]
        targets = [f"{color} {rng.choice(shapes)}" for _ in range(n_targets)]
        distract = [f"{rng.choice(others)} {rng.choice(shapes)}" for _ in range(n_distract)]
        query = {"color": color}
        if family == "count_plus":
            query["add"] = rng.randint(1, 2 + level)
    elif family == "count_shape":
        shape = rng.choice(shapes)
        others = [x for x in shapes if x != shape]
        targets = [f"{rng.choice(colors)} {shape}" for _ in range(n_targets)]
        distract = [f"{rng.choice(colors)} {rng.choice(others)}" for _ in range(n_distract)]
        query = {"shape": shape}
    elif family == "compare":
        a, b = rng.sample(colors, 2)
        others = [x for x in colors if x not in (a, b)]
        verdict = rng.choice("ABC")  # balanced answers, so guessing one letter scores 1/3
        if verdict == "C":
            n_targets = n_targets + 1 if n_targets % 2 and n_targets < t_hi else n_targets - n_targets % 2
            n_targets = max(n_targets, 2)
            n_a = n_b = n_targets // 2
        else:
            n_small = rng.randint(0, (n_targets - 1) // 2)
            n_a, n_b = n_targets - n_small, n_small
            if verdict == "B":
                n_a, n_b = n_b, n_a
        n_distract = min(n_distract, n_cells - n_a - n_b)
        targets = [f"{a} {rng.choice(shapes)}" for _ in range(n_a)] + \
                  [f"{b} {rng.choice(shapes)}" for _ in range(n_b)]
        distract = [f"{rng.choice(others)} {rng.choice(shapes)}" for _ in range(n_distract)]
        query = {"colors": [a, b]}
    else:
        raise ValueError(f"unknown family {family!r} (expected one of {FAMILIES})")
    cells = [""] * n_cells
    for pos, obj in zip(rng.sample(range(n_cells), len(targets) + len(distract)), targets + distract):
        cells[pos] = obj
    return query, [cells[r * grid:(r + 1) * grid] for r in range(grid)]


def solve(family: str, query: dict[str, Any], board: Board) -> tuple[str, list[str]]:
    """The answer and the think steps; the last step ends with the answer (``Total N.`` for counts,
    ``so X.`` for compare).

    The steps decompose the count by *content*, not by position: ``count_color`` counts its colour
    shape by shape, ``count_shape`` its shape colour by colour, each with a running total; ``compare``
    counts each colour, then compares. Every step names what it counts ("red circles: 2."), so it can
    be checked against the image without knowing where the cells are, which is what a small
    vision-language model can learn (row-by-row steps need position-selective attention over the image
    tokens, and the tiny policy never learned that: it emitted the same row pattern for every board).
    """
    def count(color: Any = None, shape: Any = None) -> int:
        return sum(1 for row in board for cell in row if cell
                   and (color is None or cell.split(" ")[0] == color)
                   and (shape is None or cell.split(" ")[1] == shape))

    steps: list[str] = []
    if family == "compare":
        a, b = query["colors"]
        n_a, n_b = count(color=a), count(color=b)
        steps += [f"{a} shapes: {n_a}.", f"{b} shapes: {n_b}."]
        answer, sign = ("A", ">") if n_a > n_b else ("B", "<") if n_b > n_a else ("C", "=")
        steps.append(f"{n_a} {sign} {n_b}, so {answer}.")
        return answer, steps
    total = 0
    if family == "count_shape":
        parts = [(c, query["shape"]) for c in COLORS]
    elif family in ("count_color", "count_plus"):
        parts = [(query["color"], s) for s in SHAPES]
    else:
        raise ValueError(f"unknown family {family!r} (expected one of {FAMILIES})")
    for color, shape in parts:
        n = count(color=color, shape=shape)
        total += n
        steps.append(f"{color} {shape}s: {n}. Total {total}.")
    if family == "count_plus":
        total += int(query["add"])
        steps.append(f"Add {query['add']}. Total {total}.")
    return str(total), steps


def board_split(board: Board) -> str:
    """The split a board belongs to, from a hash of its contents (stable across runs and machines)."""
    bucket = int.from_bytes(hashlib.sha256(repr(board).encode()).digest()[:8], "big") % 1000
    return next(s for s, (lo, hi) in _SPLIT_BUCKETS.items() if lo <= bucket < hi)


def generate_world(n: int, *, seed: int, split: str = "train", levels: Sequence[int] = (1, 2, 3, 4, 5),
                   max_level: int = 5, grid: int = 4, cell_px: int = 28,
                   families: Sequence[str] = FAMILIES) -> list[QuestionRecord]:
    """Draw ``n`` questions, cycling through families then levels; deterministic in (seed, split, args).

    Images are PNG bytes; ``difficulty`` is left at the neutral 5 (the dynamic table owns it) and the
    intrinsic level is ``meta["level"]``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not levels or any(not 1 <= lv <= max_level for lv in levels):
        raise ValueError(f"levels must lie in 1..{max_level}, got {tuple(levels)}")
    unknown = set(families) - set(FAMILIES)
    if unknown or not families:
        raise ValueError(f"unknown families {sorted(unknown)} (expected some of {FAMILIES})")
    rng = random.Random(f"diva-world:{seed}:{split}")
    seen: set[str] = set()
    records: list[QuestionRecord] = []
    for i in range(n):
        family = families[i % len(families)]
        level = levels[(i // len(families)) % len(levels)]
        for _ in range(_MAX_TRIES):
            query, board = _draw_question(rng, family, level, max_level, grid)
            key = repr((family, sorted(query.items()), board))
            if board_split(board) == split and key not in seen:
                break
        else:
            raise RuntimeError(f"no new {family} question at level {level} for split {split!r} after "
                               f"{_MAX_TRIES} draws: the content space is exhausted; lower n or raise grid")
        seen.add(key)
        answer, steps = solve(family, query, board)
        a, b = query.get("colors", ("", ""))
        fields = {k: v for k, v in query.items() if k != "colors"}
        texts = [t.format(a=a, b=b, **fields) for t in TEMPLATES[family]]
        records.append(QuestionRecord(
            id=f"world-{split}-s{seed}-{i:06d}", problem=texts[0], answer=answer,
            images=[render_png(board, cell_px)], variants=texts[1:], think_steps=steps,
            answer_type="choice" if family == "compare" else "integer",
            meta={"family": family, "level": level, "grid": grid, "cell_px": cell_px, "cells": board,
                  **query}))
    return records


def write_world(records: Sequence[QuestionRecord], out_dir: str | Path, name: str = "world") -> Path:
    """Write ``<out_dir>/<name>.jsonl`` plus PNG files in the real-data format; returns the JSONL path."""
    return write_records(records, Path(out_dir) / f"{name}.jsonl")


def format_response(record: QuestionRecord, after_hint: int = 0) -> str:
    """The SFT target: ``<think> step1 step2 ... </think> \\boxed{answer}``.

    ``after_hint=k``: the target for a prompt that already shows the first ``k`` steps as a hint. The
    response goes on from the hint (steps k+1..n) instead of repeating it: the next step needs only the
    hint's last running total, which a tiny model retrieves reliably, while re-copying every hinted number
    is an induction task it mostly failed at (it recounted from the image instead, and the hint bought
    nothing on hard questions).
    """
    if not 0 <= after_hint < len(record.think_steps):
        raise ValueError(f"after_hint must lie in 0..{len(record.think_steps) - 1}, got {after_hint}")
    return f"<think> {' '.join(record.think_steps[after_hint:])} </think> \\boxed{{{record.answer}}}"


def world_corpus(records: Sequence[QuestionRecord]) -> list[str]:
    """Every text the policy will read or write (problems, paraphrases, steps, responses, hint and
    rotation phrasing), for training the tiny tokenizer."""
    texts: list[str] = [f"{HINT_PREFIX} "] + [rotation_notice(d) for d in (1, 30, 45, 90, 135, 180, 270)]
    for r in records:
        texts += [r.problem, *r.variants, *r.think_steps, format_response(r)]
    return texts
