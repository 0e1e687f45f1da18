"""Calibration report of a base policy on the procedural world's validation split.

`python -m tools.calibrate --policy embedded --out DIR [--n N --seed S]` (``--skew``: the difficulty
skew's hard and easy shares, see :func:`skew_main`)

writes ``DIR/calibration.md`` (tables), ``DIR/calibration.csv`` (one row per condition x level) and
``DIR/calibration.png`` (accuracy per level; accuracy per variant condition). It answers the questions the
DIVA premise rests on, in this world: does accuracy span the range across intrinsic levels (so both
all-right and all-wrong groups occur), do hints rescue hard questions, do image perturbations hurt easy
ones, and do paraphrases leave accuracy alone?

Every variant is built the way the RL data module builds it: the text by ``data.variants.render_variant``
from a real ``core.tiers.VariantSpec`` (paraphrase, hint, rotation notice), the image by
``data.perturb.params_for`` + ``data.perturb.apply_perturbations`` (Kornia). Conditions:

- ``original``, ``paraphrase`` (paraphrase ``i % 5`` of question i), ``blank`` (image replaced by white:
  the text-only floor, which shows that vision matters);
- ``<op>@<t>`` for each image op and intensity t in :data:`INTENSITIES` (one op at a time; rotation angle
  drawn with the planner's rule for that intensity);
- ``plan@D``: the variant ``plan_variants(D, 1)`` really produces for an easy question of difficulty D
  (D = 1 is the strongest: intensity 0.6, two ops);
- ``hint<k>``: the first k think steps appended (k = 1, 2, 3).

The grading is the RL reward's: ``rewards.accuracy_reward`` and ``rewards.format_reward``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from diva_lightning.core.seeding import stable_seed
from diva_lightning.core.tiers import IMAGE_OPS, VariantSpec, plan_variants, rotation_angle
from diva_lightning.data.perturb import PerturbParams, apply_perturbations, params_for
from diva_lightning.data.schema import QuestionRecord, decode_image
from diva_lightning.data.skew import SkewConfig
from diva_lightning.data.variants import render_variant
from diva_lightning.data.world import generate_world
from diva_lightning.models.policy import PolicyBundle, load_policy
from diva_lightning.rewards import accuracy_reward, format_reward
from diva_lightning.rollout.hf import HFGenerateEngine

INTENSITIES: tuple[float, ...] = (0.2, 0.4, 0.6)  # the planner's intensity_range is (0.2, 0.6)
HINT_STEPS: tuple[int, ...] = (1, 2, 3)
PLAN_DIFFICULTIES: tuple[float, ...] = (1.0, 3.0)
EASY_LEVELS: tuple[int, ...] = (1, 2)
HARD_LEVELS: tuple[int, ...] = (4, 5)


@dataclass(frozen=True)
class Condition:
    """One way of presenting a question: ``kind`` in original|paraphrase|blank|image|plan|hint."""

    name: str
    kind: str
    op: str = ""
    intensity: float = 0.0
    hint_steps: int = 0
    plan_difficulty: float = 0.0
    plan_intensity: tuple[float, float] | None = None  # the planner's intensity_range (None: the planner's default)
    plan_ops: tuple[str, ...] | None = None  # the planner's image_ops (None: all)


def standard_conditions() -> list[Condition]:
    """The full calibration grid (see the module docstring), in report order."""
    conds = [Condition("original", "original"), Condition("paraphrase", "paraphrase"),
             Condition("blank", "blank")]
    conds += [Condition(f"{op}@{t:g}", "image", op=op, intensity=t) for op in IMAGE_OPS for t in INTENSITIES]
    conds += [Condition(f"plan@{d:g}", "plan", plan_difficulty=d) for d in PLAN_DIFFICULTIES]
    conds += [Condition(f"hint{k}", "hint", hint_steps=k) for k in HINT_STEPS]
    return conds


def variant_spec(cond: Condition, index: int, *, seed: int) -> VariantSpec | None:
    """The ``VariantSpec`` that realises ``cond`` for question ``index`` (None: original or blank)."""
    g = torch.Generator().manual_seed(stable_seed("spec", seed, cond.name, index))
    if cond.kind in ("original", "blank"):
        return None
    if cond.kind == "paraphrase":
        return VariantSpec("paraphrase", "medium", 0.0, paraphrase_index=index % 5)
    if cond.kind == "hint":
        return VariantSpec("hint", "hard", -1.0, hint_steps=cond.hint_steps)
    if cond.kind == "image":
        rot = rotation_angle(cond.intensity, g) if cond.op == "rotate" else 0.0
        return VariantSpec("image", "easy", 1.0, cond.intensity, (cond.op,), rot)
    if cond.kind == "plan":
        planner = {} if cond.plan_intensity is None else {"intensity_range": cond.plan_intensity}
        (spec,) = plan_variants(cond.plan_difficulty, 1, generator=g, allowed_ops=cond.plan_ops, **planner)
        return spec
    raise ValueError(f"unknown condition kind {cond.kind!r}")


def condition_inputs(records: Sequence[QuestionRecord], cond: Condition, *, seed: int
                     ) -> tuple[list[str], list[Tensor]]:
    """Problems and images (one [3, H, W] in [0, 1] per record) of ``records`` under ``cond``."""
    problems: list[str] = []
    images: list[Tensor] = []
    perturb: list[dict[str, float]] = []
    for i, rec in enumerate(records):
        img = decode_image(rec.images[0], None)
        spec = variant_spec(cond, i, seed=seed)
        problems.append(rec.problem if spec is None else render_variant(rec, spec).prompt)
        images.append(torch.ones_like(img) if cond.kind == "blank" else img)
        params: dict[str, float] = {}
        if spec is not None and spec.kind == "image":
            params = params_for(spec, image_size=(int(img.shape[-2]), int(img.shape[-1])))
            params["seed"] = stable_seed("perturb", seed, cond.name, rec.id)  # the image's own noise key
        perturb.append(params)
    return problems, apply_perturbations(images, PerturbParams.from_list(perturb))


@dataclass(frozen=True)
class Sample:
    """One graded response."""

    condition: str
    level: int
    family: str
    question_id: str
    correct: float
    formatted: float


def grade(responses: Sequence[str], answers: Sequence[str]) -> tuple[list[float], list[float]]:
    """(accuracy, format) rewards per response, exactly as the RL reward computes them."""
    return [accuracy_reward(r, a) for r, a in zip(responses, answers)], [format_reward(r) for r in responses]


def evaluate(bundle: PolicyBundle, records: Sequence[QuestionRecord], conditions: Sequence[Condition], *,
             seed: int = 0, do_sample: bool = False, temperature: float = 1.0, max_new_tokens: int = 72,
             batch_size: int = 64, progress: Callable[[str], None] | None = None) -> list[Sample]:
    """Generate one response per (record, condition) and grade it. Greedy unless ``do_sample``."""
    engine = HFGenerateEngine()
    out: list[Sample] = []
    for c_i, cond in enumerate(conditions):
        t0 = time.perf_counter()
        problems, images = condition_inputs(records, cond, seed=seed)
        texts: list[str] = []
        for s in range(0, len(records), batch_size):
            inputs = bundle.encode(problems[s:s + batch_size], [[im] for im in images[s:s + batch_size]])
            roll = engine.generate(bundle, inputs, num_generations=1, temperature=temperature,
                                   max_new_tokens=max_new_tokens, do_sample=do_sample,
                                   seed=stable_seed("sample", seed, cond.name, s))
            texts += roll.texts
        acc, fmt = grade(texts, [r.answer for r in records])
        out += [Sample(cond.name, int(r.meta.get("level", -1)), str(r.meta.get("family", "")), r.id, a, f)
                for r, a, f in zip(records, acc, fmt)]
        if progress is not None:
            progress(f"[{c_i + 1}/{len(conditions)}] {cond.name:>16}: accuracy {sum(acc) / len(acc):.3f}, "
                     f"format {sum(fmt) / len(fmt):.3f} ({time.perf_counter() - t0:.1f}s)")
    return out


@dataclass(frozen=True)
class Cell:
    """Mean accuracy / format rate of the samples of one (condition, level) cell; level -1 = all."""

    condition: str
    level: int
    n: int
    accuracy: float
    format_rate: float


def aggregate(samples: Sequence[Sample], *, levels: Sequence[int] | None = None) -> list[Cell]:
    """Cells per condition (in first-seen order) for each level in ``levels`` (default: all seen) plus
    level -1 (all levels pooled)."""
    conds = list(dict.fromkeys(s.condition for s in samples))
    lvls = sorted({s.level for s in samples}) if levels is None else list(levels)
    cells = []
    for c in conds:
        for lv in [*lvls, -1]:
            sel = [s for s in samples if s.condition == c and (lv == -1 or s.level == lv)]
            n = len(sel)
            cells.append(Cell(c, lv, n, sum(s.correct for s in sel) / n if n else math.nan,
                              sum(s.formatted for s in sel) / n if n else math.nan))
    return cells


def accuracy_of(samples: Sequence[Sample], condition: str, levels: Sequence[int] | None = None) -> float:
    """Mean accuracy of ``condition`` over ``levels`` (all when None); NaN without samples."""
    sel = [s.correct for s in samples if s.condition == condition and (levels is None or s.level in levels)]
    return sum(sel) / len(sel) if sel else math.nan


@dataclass(frozen=True)
class Effects:
    """The DIVA premise in numbers (accuracy points, 0-100): signed change versus ``original``."""

    hint_on_hard: float  # best hint condition on HARD_LEVELS
    perturb_on_easy: float  # strongest planned perturbation (plan@1) on EASY_LEVELS
    paraphrase_all: float  # paraphrase on all levels


def effects(samples: Sequence[Sample]) -> Effects:
    """Compute :class:`Effects` from graded samples (conditions missing give NaN)."""
    def delta(cond: str, levels: Sequence[int] | None) -> float:
        return 100 * (accuracy_of(samples, cond, levels) - accuracy_of(samples, "original", levels))

    hints = [delta(f"hint{k}", HARD_LEVELS) for k in HINT_STEPS]
    hints = [h for h in hints if not math.isnan(h)]
    return Effects(max(hints) if hints else math.nan, delta(f"plan@{PLAN_DIFFICULTIES[0]:g}", EASY_LEVELS),
                   delta("paraphrase", None))


# --------------------------------------------------------------------------------------------- report files
def write_csv(cells: Sequence[Cell], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(Cell.__dataclass_fields__))
        w.writeheader()
        w.writerows(asdict(c) for c in cells)


def markdown_table(cells: Sequence[Cell], title: str, *, header: str = "") -> str:
    """A condition x level table of ``accuracy`` (with n per cell) and the pooled format rate."""
    levels = sorted({c.level for c in cells if c.level != -1})
    conds = list(dict.fromkeys(c.condition for c in cells))
    by = {(c.condition, c.level): c for c in cells}
    cols = [f"L{lv}" for lv in levels] + ["all", "format"]
    lines = [f"### {title}", "", header, "", "| condition | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for cond in conds:
        vals = [f"{by[cond, lv].accuracy:.2f} (n={by[cond, lv].n})" for lv in [*levels, -1]]
        lines.append(f"| {cond} | " + " | ".join(vals) + f" | {by[cond, -1].format_rate:.2f} |")
    return "\n".join(lines) + "\n"


def plot(greedy: Sequence[Cell], sampled: Sequence[Cell] | None, path: Path) -> None:
    """Left: accuracy per level (greedy, sampled). Right: accuracy of each condition, all levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2.6]})
    for cells, label in ((greedy, "greedy"), (sampled, "sampled T=1")):
        orig = [c for c in cells or [] if c.condition == "original" and c.level != -1]
        if orig:
            ax1.plot([c.level for c in orig], [c.accuracy for c in orig], marker="o", label=label)
    blank = [c for c in greedy if c.condition == "blank" and c.level != -1]
    if blank:
        ax1.plot([c.level for c in blank], [c.accuracy for c in blank], ls="--", c="gray",
                 label="blank image")
    ax1.set(xlabel="intrinsic level", ylabel="accuracy", ylim=(0, 1), title="original questions")
    ax1.legend()
    pooled = [c for c in greedy if c.level == -1]
    colors = {"original": "k", "paraphrase": "tab:blue", "blank": "gray", "plan": "tab:red",
              "hint": "tab:green"}
    bar_colors = [colors.get(c.condition.rstrip("0123456789").split("@")[0], "tab:orange") for c in pooled]
    ax2.bar(range(len(pooled)), [c.accuracy for c in pooled], color=bar_colors)
    ax2.axhline(next((c.accuracy for c in pooled if c.condition == "original"), 0), c="k", lw=0.8, ls=":")
    ax2.set_xticks(range(len(pooled)), [c.condition for c in pooled], rotation=60, ha="right", fontsize=8)
    ax2.set(ylabel="accuracy (greedy, all levels)", ylim=(0, 1), title="variants (image ops at intensity t)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(out_dir: str | Path, greedy: Sequence[Sample], sampled: Sequence[Sample] | None = None, *,
                 meta: str = "") -> dict[str, Path]:
    """Write calibration.md / .csv / .png under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g_cells = aggregate(greedy)
    s_cells = aggregate(sampled) if sampled else None
    paths = {"md": out / "calibration.md", "csv": out / "calibration.csv", "png": out / "calibration.png"}
    rows = [Cell(f"{c.condition}", c.level, c.n, c.accuracy, c.format_rate) for c in g_cells]
    if s_cells:
        rows += [Cell(f"sampled:{c.condition}", c.level, c.n, c.accuracy, c.format_rate) for c in s_cells]
    write_csv(rows, paths["csv"])
    eff = effects(greedy)
    parts = ["# Calibration of the base policy", "", meta, "",
             f"- hint on hard levels {HARD_LEVELS} (best of hint1-3): {eff.hint_on_hard:+.1f} points",
             f"- strongest planned perturbation (plan@1) on easy levels {EASY_LEVELS}: "
             f"{eff.perturb_on_easy:+.1f} points",
             f"- paraphrase, all levels: {eff.paraphrase_all:+.1f} points", "",
             markdown_table(g_cells, "Greedy decoding", header="accuracy per intrinsic level (n per cell)")]
    if s_cells:
        parts.append(markdown_table(s_cells, "Sampled, temperature 1.0", header="one sample per question"))
    paths["md"].write_text("\n".join(parts))
    plot(g_cells, s_cells, paths["png"])
    return paths


# ------------------------------------------------------------------------------------- the difficulty skew's shares
SKEWED_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "skewed.yaml"
GOALS_FILE = Path(__file__).resolve().with_name("skew_goals.yaml")


@dataclass(frozen=True)
class SkewedRun:
    """The settings of the skewed run the shares are calibrated for, as its shipped config gives them."""

    intensity_range: tuple[float, float]  # data.init_args.intensity_range
    image_ops: tuple[str, ...]  # data.init_args.image_ops
    skew: SkewConfig  # data.init_args.world.skew


def skewed_run(config: str | Path = SKEWED_CONFIG) -> SkewedRun:
    """Read :class:`SkewedRun` from a skewed config (default: the shipped ``experiments/skewed.yaml``); a missing
    field is an error naming the file and the field, not a silent default."""
    body = yaml.safe_load(Path(config).read_text()) or {}
    data = (body.get("data") or {}).get("init_args") or {}
    world = data.get("world") or {}
    missing = [f"data.init_args.{k}" for k in ("intensity_range", "image_ops") if k not in data]
    missing += [] if "skew" in world else ["data.init_args.world.skew"]
    if missing:
        raise ValueError(f"{config}: missing {missing} (the calibration takes the skewed run's planner from there)")
    lo, hi = data["intensity_range"]
    return SkewedRun((float(lo), float(hi)), tuple(data["image_ops"]), SkewConfig(**world["skew"]))


@dataclass(frozen=True)
class SkewGoals:
    """What the skew's shares must show (issue 14), read from ``tools/skew_goals.yaml`` by :func:`load_goals`."""

    hard_p_below: float  # the hard share's re-measured accuracy is below this
    easy_p_above: float  # the easy share's re-measured accuracy is above this
    hint_gain: float  # points: the best hint on the hard share gains at least this (same questions)
    perturb_drop: float  # points (negative): the run planner's weaker variant on the easy share costs at least this


def load_goals(path: str | Path = GOALS_FILE) -> SkewGoals:
    """:class:`SkewGoals` from a YAML file holding exactly its four fields."""
    body = yaml.safe_load(Path(path).read_text()) or {}
    fields = list(SkewGoals.__dataclass_fields__)
    if sorted(body) != sorted(fields):
        raise ValueError(f"{path}: needs exactly the fields {fields}, got {sorted(body)}")
    return SkewGoals(**{k: float(body[k]) for k in fields})


def skew_conditions(share: str, intensity_range: tuple[float, float] | None = None,
                    image_ops: tuple[str, ...] | None = None) -> list[Condition]:
    """The conditions a share is re-measured under: hints for the hard share; for the easy share a blank image, the
    planner's own variants at D = 1 and D = 3 with the run's settings (``run_plan@D``; ``intensity_range`` and
    ``image_ops``, by default :func:`skewed_run`'s) and with the defaults (``plan@1``: the planner's default
    intensity range, every op), and each op alone at intensity 0.6 and 1.0."""
    if share == "hard":
        return [Condition("original", "original")] + [Condition(f"hint{k}", "hint", hint_steps=k) for k in HINT_STEPS]
    if share != "easy":
        raise ValueError(f"share must be 'hard' or 'easy', got {share!r}")
    if intensity_range is None or image_ops is None:
        run = skewed_run()
        intensity_range = run.intensity_range if intensity_range is None else intensity_range
        image_ops = run.image_ops if image_ops is None else image_ops
    return ([Condition("original", "original"), Condition("blank", "blank")]
            + [Condition(f"run_plan@{d:g}", "plan", plan_difficulty=d, plan_intensity=intensity_range,
                         plan_ops=tuple(image_ops)) for d in (1.0, 3.0)]
            + [Condition("plan@1", "plan", plan_difficulty=1.0)]
            + [Condition(f"{op}@{t:g}", "image", op=op, intensity=t) for op in IMAGE_OPS for t in (0.6, 1.0)])


def _hintable(records: Sequence[QuestionRecord], k: int) -> list[QuestionRecord]:
    return [r for r in records if len(r.think_steps) > k]


def skew_samples(bundle: PolicyBundle, records: Sequence[QuestionRecord], share: str, *, samples: int, seed: int,
                 max_new_tokens: int, temperature: float = 1.0,
                 conditions: Sequence[Condition] | None = None,
                 progress: Callable[[str], None] | None = None) -> list[Sample]:
    """``samples`` sampled responses (at ``temperature``: the rollouts' and the success table's) per question and
    condition of ``share``; a hint condition uses the questions with more think steps than it reveals (a hint never
    gives the answer away)."""
    out: list[Sample] = []
    for cond in skew_conditions(share) if conditions is None else conditions:
        pool = _hintable(records, cond.hint_steps) if cond.kind == "hint" else list(records)
        if pool:
            out += evaluate(bundle, pool * samples, [cond], seed=seed, do_sample=True, temperature=temperature,
                            max_new_tokens=max_new_tokens, progress=progress)
    return out


def by_table_count(samples: Sequence[Sample], counts: dict[str, int], samples_per_question: int) -> list[str]:
    """Markdown rows: the re-measured accuracy of the unchanged questions, grouped by their right answers in the
    success table (does a stricter selection, e.g. 0 of 16, reach the goal?)."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        if s.condition == "original":
            groups.setdefault(counts[s.question_id], []).append(s)
    rows = [f"| table: {k} of {samples_per_question} right | {len({s.question_id for s in g})} | "
            f"{sum(s.correct for s in g) / len(g):.3f} |" for k, g in sorted(groups.items())]
    return ["| questions | n | re-measured p |", "|---|---|---|", *rows, ""]


def skew_report(out_dir: str | Path, by_share: dict[str, list[Sample]], *, meta: str,
                table_counts: tuple[dict[str, int], int] | None = None, temperature: float = 1.0,
                goals: SkewGoals | None = None) -> dict[str, Path]:
    """``calibration_skew.md`` / ``.csv`` / ``.png``: re-measured accuracy of the hard and easy shares under their
    conditions, the effects against the ``goals`` (default: :func:`load_goals`'s), per family (and, given the
    table's counts, by count)."""
    goals = load_goals() if goals is None else goals
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "calibration_skew.md", "csv": out / "calibration_skew.csv",
             "png": out / "calibration_skew.png"}
    rows: list[dict[str, object]] = []
    lines = ["# Calibration of the difficulty skew's shares", "", meta, ""]
    verdicts = []
    for share, samples in by_share.items():
        conds = list(dict.fromkeys(s.condition for s in samples))
        fams = sorted({s.family for s in samples})
        lines += [f"## {share} share", "", "| condition | all | " + " | ".join(fams) + " | n |",
                  "|---" * (len(fams) + 3) + "|"]
        for c in conds:
            sel = [s for s in samples if s.condition == c]
            acc = sum(s.correct for s in sel) / len(sel)
            per = []
            for f in fams:
                fs = [s.correct for s in sel if s.family == f]
                per.append(f"{sum(fs) / len(fs):.2f}" if fs else "-")
                if fs:
                    rows.append({"share": share, "condition": c, "family": f, "n": len(fs),
                                 "accuracy": sum(fs) / len(fs)})
            rows.append({"share": share, "condition": c, "family": "all", "n": len(sel), "accuracy": acc})
            lines.append(f"| {c} | {acc:.3f} | " + " | ".join(per) + f" | {len(sel)} |")
        lines.append("")
        if table_counts is not None:
            lines += by_table_count(samples, *table_counts)
        base = accuracy_of(samples, "original")
        if share == "hard":
            best = max((c for c in conds if c.startswith("hint")), key=lambda c: _paired(samples, c),
                       default=None)
            gain = 100 * _paired(samples, best) if best else math.nan
            p_goal = goals.hard_p_below
            verdicts.append(f"- hard: p = {base:.3f} (goal < {p_goal:g}: {'met' if base < p_goal else 'NOT met'}); "
                            f"best hint {best}: {gain:+.1f} points on the same questions (goal >= "
                            f"+{goals.hint_gain:g}: {'met' if gain >= goals.hint_gain else 'NOT met'})")
        else:
            worst = min((c for c in conds if c != "original"), key=lambda c: _paired(samples, c), default=None)
            drop = 100 * _paired(samples, worst) if worst else math.nan
            run = [c for c in conds if c.startswith("run_plan@")]
            # the verdict is on what the run's planner makes (its weakest variant), else the strongest condition
            judged = max((100 * _paired(samples, c) for c in run), default=drop)
            run_text = ", ".join(f"{c} {100 * _paired(samples, c):+.1f}" for c in run)
            plan_text = f"{run_text} points (the run's planner); " if run else ""
            p_goal = goals.easy_p_above
            verdicts.append(f"- easy: p = {base:.3f} (goal > {p_goal:g}: {'met' if base > p_goal else 'NOT met'}); "
                            f"{plan_text}strongest single condition {worst}: {drop:+.1f} points; goal <= "
                            f"{goals.perturb_drop:g}"
                            f"{' on the weaker of the run planner variants' if run else ''}: "
                            f"{'met' if judged <= goals.perturb_drop else 'NOT met'}")
        lines.append("")
    lines[4:4] = ["## Preconditions", "", *verdicts, ""]
    paths["md"].write_text("\n".join(lines))
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["share", "condition", "family", "n", "accuracy"])
        w.writeheader()
        w.writerows(rows)
    _skew_plot(by_share, paths["png"], goals, temperature)
    return paths


def _paired(samples: Sequence[Sample], condition: str) -> float:
    """Accuracy change of ``condition`` against ``original`` on the questions both were asked (hints skip
    questions with too few steps)."""
    asked = {s.question_id for s in samples if s.condition == condition}
    cond = [s.correct for s in samples if s.condition == condition]
    orig = [s.correct for s in samples if s.condition == "original" and s.question_id in asked]
    return (sum(cond) / len(cond) - sum(orig) / len(orig)) if cond and orig else math.nan


def _skew_plot(by_share: dict[str, list[Sample]], path: Path, goals: SkewGoals, temperature: float = 1.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_share), figsize=(6 * len(by_share), 4.2), squeeze=False)
    for ax, (share, samples) in zip(axes[0], by_share.items()):
        conds = list(dict.fromkeys(s.condition for s in samples))
        accs = [accuracy_of(samples, c) for c in conds]
        ax.bar(range(len(conds)), accs, color=["k" if c == "original" else "tab:green" if c.startswith("hint")
                                               else "tab:red" for c in conds])
        goal = goals.hard_p_below if share == "hard" else goals.easy_p_above
        ax.axhline(goal, ls=":", c="gray", label=f"p goal {'<' if share == 'hard' else '>'} {goal}")
        ax.set_xticks(range(len(conds)), conds, rotation=60, ha="right", fontsize=8)
        ax.set(ylim=(0, 1), ylabel=f"accuracy (sampled, T={temperature:g})",
               title=f"{share} share (re-measured, held-out)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def skew_main(args: argparse.Namespace) -> dict[str, Path]:
    """The ``--skew`` report: the run's planner and skew from ``--config`` unless given on the command line."""
    from diva_lightning.data.success import table_for

    t0 = time.perf_counter()
    run = skewed_run(args.config)
    goals = load_goals(args.goals)
    skew = run.skew
    args.table = skew.table if args.table is None else args.table
    intensity_range = run.intensity_range if args.intensity_range is None else tuple(args.intensity_range)
    image_ops = run.image_ops if args.image_ops is None else tuple(args.image_ops)
    table = table_for(args.table)
    pool = generate_world(table.pools["val"], seed=table.world_seed, split="val")  # held out from training
    table_t = table.temperature
    temperature = table_t if args.temperature is None else args.temperature
    if temperature != table_t:
        print(f"note: sampling at temperature {temperature:g}, but the table was measured at {table_t:g}", flush=True)
    bundle = load_policy(args.policy)
    by_share: dict[str, list[Sample]] = {}
    for share in ("hard", "easy"):
        chosen = [r for r in pool if table.share_of(r.id, skew) == share][: args.per_share]
        print(f"{share}: {len(chosen)} validation questions (table p {'<' if share == 'hard' else '>'} "
              f"{skew.hard_below if share == 'hard' else skew.easy_above}); {args.samples} fresh samples each",
              flush=True)
        by_share[share] = skew_samples(bundle, chosen, share, samples=args.samples, seed=args.seed + 1,
                                       max_new_tokens=args.max_new_tokens, temperature=temperature,
                                       conditions=skew_conditions(share, intensity_range, image_ops),
                                       progress=lambda m: print(m, flush=True))
    meta = (f"policy `{args.policy}`, success table `{args.table}` ({table.samples} samples per question, weights "
            f"{table.weights_sha256[:12]}...). The shares are chosen from the world's validation pool by the table "
            f"and re-measured here with {args.samples} fresh samples per question and condition (temperature "
            f"{temperature:g}, {args.max_new_tokens} new tokens): a question picked for a measured p of 0/16 regresses "
            f"towards its true rate, so these are the honest numbers. {time.perf_counter() - t0:.0f} s.")
    paths = skew_report(args.out, by_share, meta=meta, table_counts=(table.successes, table.samples),
                        temperature=temperature, goals=goals)
    print(paths["md"].read_text(), flush=True)
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    p = argparse.ArgumentParser(prog="python -m tools.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="embedded", help="'embedded' (the shipped base policy) or a checkpoint dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=250, help="validation questions (cycled over families x levels)")
    p.add_argument("--seed", type=int, default=0, help="world seed (the RL configs' data.world.seed)")
    p.add_argument("--max_new_tokens", type=int, default=72)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no_sampled", action="store_true", help="skip the temperature-1 pass")
    p.add_argument("--skew", action="store_true", help="calibrate the difficulty skew's hard and easy shares "
                   "(data.skew) instead: writes calibration_skew.md/.csv/.png")
    p.add_argument("--config", default=str(SKEWED_CONFIG),
                   help="--skew: the skewed run's config, read for its planner and skew (data.init_args)")
    p.add_argument("--goals", default=str(GOALS_FILE), help="--skew: the shares' goals (a YAML of SkewGoals' fields)")
    p.add_argument("--table", default=None,
                   help="--skew: success table ('embedded' or a success.json; default: --config's skew.table)")
    p.add_argument("--samples", type=int, default=8, help="--skew: fresh samples per question and condition")
    p.add_argument("--per_share", type=int, default=60, help="--skew: at most this many questions per share")
    p.add_argument("--intensity_range", type=float, nargs=2, default=None,
                   help="--skew: the planner's intensity range for its own variants (run_plan@D); default: "
                        "--config's data.init_args.intensity_range")
    p.add_argument("--image_ops", nargs="+", default=None, choices=list(IMAGE_OPS),
                   help="--skew: the planner's image ops; default: --config's data.init_args.image_ops")
    p.add_argument("--temperature", type=float, default=None,
                   help="--skew: sampling temperature (default: the one the success table was measured at)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.skew:
        return skew_main(args)
    t0 = time.perf_counter()
    bundle = load_policy(args.policy)
    records = generate_world(args.n, seed=args.seed, split="val")  # never the train split

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"calibrating {args.policy} on {len(records)} validation questions (seed {args.seed})")
    greedy = evaluate(bundle, records, standard_conditions(), seed=args.seed,
                      max_new_tokens=args.max_new_tokens, progress=log)
    sampled = None
    if not args.no_sampled:
        log("sampled pass (temperature 1.0): original, paraphrase, plan@1, hint1")
        conds = [c for c in standard_conditions() if c.name in ("original", "paraphrase", "plan@1", "hint1")]
        sampled = evaluate(bundle, records, conds, seed=args.seed, do_sample=True,
                           max_new_tokens=args.max_new_tokens, progress=log)
    meta = (f"policy `{args.policy}`, {len(records)} questions of the world's validation split (seed "
            f"{args.seed}), max_new_tokens {args.max_new_tokens}, {time.perf_counter() - t0:.0f} s.")
    paths = write_report(args.out, greedy, sampled, meta=meta)
    log(f"wrote {', '.join(str(v) for v in paths.values())}")
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
