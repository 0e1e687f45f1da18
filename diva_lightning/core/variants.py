"""What a variant of a question is (:class:`VariantSpec`) and the authors' step tables: the pieces that both
variant plans read, ``core.tiers`` (the paper's and the official plan, and the dispatch over plans) and
``core.released_plan`` (the released code's draws), so that neither imports the other's module for them."""

from __future__ import annotations

from dataclasses import dataclass

from diva_lightning.core.choices import IMAGE_OPS, Tier, VariantKind, check_choice

# Official tables (authors' gen_new_item.py), keyed by integer difficulty 1..9.
OFFICIAL_V1_TARGET: dict[int, int] = {1: 9, 2: 8, 3: 7, 4: 6, 5: 6, 6: 5, 7: 5, 8: 5, 9: 4}
OFFICIAL_TARGET_MEAN: dict[int, float] = {1: 8, 2: 7.5, 3: 7, 4: 6.5, 5: 6, 6: 5.5, 7: 4.5, 8: 3.5, 9: 3}


@dataclass(frozen=True)
class VariantSpec:
    """What one variant of a question is; realised by ``diva_lightning.data``.

    Attributes:
        kind: "paraphrase" (reworded text), "image" (perturbed image), "hint" (think steps appended).
        tier: tier of the original question.
        delta: label shift; the variant's difficulty label is D + delta.
        intensity: perturbation strength in [0, 1] (image variants; 0 otherwise).
        image_ops: ops to apply, a subset of ``IMAGE_OPS`` in canonical order (image variants only).
        rotation_deg: rotation angle in degrees when "rotate" is in ``image_ops``, else 0.
        hint_steps: number of think steps to append (hint variants only).
        paraphrase_index: which stored paraphrase to use as the text, or None for the original text.
    """

    kind: VariantKind
    tier: Tier
    delta: float
    intensity: float = 0.0
    image_ops: tuple[str, ...] = ()
    rotation_deg: float = 0.0
    hint_steps: int = 0
    paraphrase_index: int | None = None

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, VariantKind)
        check_choice("tier", self.tier, Tier)
        if not 0.0 <= self.intensity <= 1.0:
            raise ValueError(f"intensity must lie in [0, 1], got {self.intensity}")
        unknown = [op for op in self.image_ops if op not in IMAGE_OPS]
        if unknown:
            raise ValueError(f"unknown image_ops {unknown}; allowed: {list(IMAGE_OPS)}")
        if self.image_ops and self.kind != "image":
            raise ValueError(f"image_ops given for a {self.kind} variant")
        if self.hint_steps < 0 or (self.hint_steps > 0 and self.kind != "hint"):
            raise ValueError(f"hint_steps={self.hint_steps} invalid for a {self.kind} variant")
        if self.rotation_deg != 0.0 and "rotate" not in self.image_ops:
            raise ValueError("rotation_deg set but 'rotate' is not in image_ops")
        if self.paraphrase_index is not None and self.paraphrase_index < 0:
            raise ValueError(f"paraphrase_index must be >= 0, got {self.paraphrase_index}")
