"""Argument validation shared by the core math modules.

Every public function in ``core`` validates its tensors up front and raises ``ValueError`` with the
argument names, shapes and offending indices, so that a bad batch fails at the call site with a message
that says what is wrong instead of as a NaN three steps later.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

# How many offending indices an error message lists before it says "...".
_MAX_LISTED = 10


def _listed(indices: Tensor) -> str:
    """Format a 1-D index tensor for an error message, truncated to ``_MAX_LISTED`` entries."""
    values = indices.tolist()
    text = ", ".join(str(v) for v in values[:_MAX_LISTED])
    if len(values) > _MAX_LISTED:
        text += f", ... ({len(values)} in all)"
    return text


def check_1d(name: str, t: Tensor) -> None:
    """Raise ``ValueError`` unless ``t`` is a 1-D tensor."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")


def check_float(name: str, t: Tensor) -> None:
    """Raise ``ValueError`` unless ``t`` has a floating dtype."""
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")


def check_int_ids(name: str, t: Tensor) -> None:
    """Raise ``ValueError`` unless ``t`` is a 1-D integer tensor (group ids).

    Ids must be integers so that grouping is exact; map strings or other hashables first with
    :func:`contiguous_ids`.
    """
    check_1d(name, t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(
            f"{name} must be an integer tensor of group ids, got dtype {t.dtype}; "
            "map arbitrary ids with diva_lightning.core.contiguous_ids"
        )


def check_finite(name: str, t: Tensor) -> None:
    """Raise ``ValueError`` naming the indices where ``t`` is NaN or infinite."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = bad.nonzero()
        idx = where[:, 0] if t.dim() == 1 else where
        if t.dim() == 1:
            raise ValueError(f"{name} has NaN or infinite values at indices [{_listed(idx)}]")
        raise ValueError(f"{name} has {int(bad.sum())} NaN or infinite values, first at {where[0].tolist()}")


def check_same_length(**named: Tensor) -> None:
    """Raise ``ValueError`` unless all given 1-D tensors have the same length, naming every length."""
    lengths = {name: int(t.shape[0]) for name, t in named.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"length mismatch: {listed}")


def contiguous_ids(ids: Sequence[Hashable]) -> Tensor:
    """Map arbitrary hashable ids to contiguous ``int64`` ids in first-seen order.

    Example: ``["q7", "q2", "q7"] -> tensor([0, 1, 0])``.

    Returns:
        Tensor[N] of dtype int64.
    """
    mapping: dict[Hashable, int] = {}
    out = [mapping.setdefault(i, len(mapping)) for i in ids]
    return torch.tensor(out, dtype=torch.int64)
