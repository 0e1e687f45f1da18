"""Host-side text edits that turn a question into one of its variants (design.md section 4).

The image edits themselves run on the accelerator (``data/perturb.py``); this module only changes the
prompt text:

- ``paraphrase``: the problem is replaced by ``record.variants[paraphrase_index % len(variants)]``
  (any kind starts from that paraphrase when ``paraphrase_index`` is set, else from the problem).
- ``hint``: a ``Hint:`` line with the first ``hint_steps`` think steps is appended. The count is
  clamped to ``len(think_steps) - 1`` when there are at least two steps, so a hint never gives the whole
  solution away.
- ``image``: the problem is kept; when ``"rotate"`` is among the ops a sentence says by how much the
  image was rotated (official behaviour, official wording).

When a spec cannot be applied as asked (no paraphrases, no think steps, a paraphrase without index)
the original problem is used and :class:`VariantText` says why in ``fallback``; :func:`variant_prompt`
logs each such fallback, so no variant silently turns into the original question.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from diva_lightning.data.schema import QuestionRecord

logger = logging.getLogger(__name__)

HINT_PREFIX = "Hint:"
# Official DIVA wording (verl/utils/dataset.py, gen_rotate).
ROTATION_NOTICE = ("This image has been rotated by {deg} degrees. "
                   "Please mentally rotate it back and solve the problem.")


class VariantSpecLike(Protocol):
    """The fields of ``core.tiers.VariantSpec`` this module reads (any object with them will do)."""

    @property
    def kind(self) -> str: ...  # "paraphrase" | "image" | "hint"

    @property
    def image_ops(self) -> Sequence[str]: ...

    @property
    def rotation_deg(self) -> float: ...

    @property
    def hint_steps(self) -> int: ...

    @property
    def paraphrase_index(self) -> int | None: ...


@dataclass(frozen=True)
class VariantText:
    """The prompt of a variant; ``fallback`` names why the spec was not applied as asked (else None)."""

    prompt: str
    fallback: str | None = None


def format_degrees(deg: float) -> str:
    """``45.0 -> "45"``, ``12.5 -> "12.5"``: whole angles read as integers, like the official text."""
    return str(int(deg)) if float(deg).is_integer() else f"{deg:g}"


def rotation_notice(deg: float) -> str:
    """The sentence appended to the problem of a rotated-image variant."""
    return ROTATION_NOTICE.format(deg=format_degrees(deg))


def hint_step_count(requested: int, available: int) -> int:
    """How many think steps a hint reveals: at most ``available - 1`` when ``available >= 2``."""
    cap = available - 1 if available >= 2 else available
    return max(0, min(requested, cap))


def _base_text(record: QuestionRecord, index: int | None) -> VariantText:
    """The text a variant starts from: paraphrase ``index`` (mod the number stored) or the problem."""
    if index is None:
        return VariantText(record.problem)
    if not record.variants:
        return VariantText(record.problem, fallback="no paraphrases")
    return VariantText(record.variants[index % len(record.variants)])


def render_variant(record: QuestionRecord, spec: VariantSpecLike) -> VariantText:
    """Build the prompt text of ``spec`` applied to ``record`` (see the module docstring).

    Any kind starts from paraphrase ``spec.paraphrase_index`` when it is set (the planner may reword an
    image or hint variant too), else from the original problem.
    """
    base = _base_text(record, spec.paraphrase_index)
    if spec.kind == "paraphrase":
        if spec.paraphrase_index is None:
            return VariantText(record.problem, fallback="paraphrase_index is None")
        return base
    if spec.kind == "hint":
        k = hint_step_count(spec.hint_steps, len(record.think_steps))
        if k == 0:
            why = "no think steps" if not record.think_steps else f"hint_steps={spec.hint_steps}"
            return VariantText(base.prompt, fallback=why)
        return VariantText(f"{base.prompt}\n{HINT_PREFIX} {' '.join(record.think_steps[:k])}", base.fallback)
    if spec.kind == "image":
        # A rotation by a whole turn leaves the image as it was, so there is nothing to announce.
        if "rotate" in spec.image_ops and float(spec.rotation_deg) % 360.0 != 0.0:
            return VariantText(f"{base.prompt} {rotation_notice(spec.rotation_deg)}", base.fallback)
        return base
    if spec.kind == "original":  # plan="released": an extra copy of the question
        return VariantText(record.problem)
    if spec.kind == "only_vision":  # plan="released"; drawing the text into the image is not implemented
        return VariantText(record.problem, fallback="drawing the problem into the image is not implemented")
    raise ValueError(f"unknown variant kind {spec.kind!r} (expected paraphrase, image, hint, original or only_vision)")


def variant_prompt(record: QuestionRecord, spec: VariantSpecLike) -> str:
    """The prompt text of a variant; a fallback to the original problem is logged as a warning."""
    text = render_variant(record, spec)
    if text.fallback is not None:
        logger.warning("variant %s of %r fell back to the original problem: %s", spec.kind, record.id,
                       text.fallback)
    return text.prompt
