r"""OlympiadBench's rule-based answer judge (the logic of the official ``auto_scoring_judge.py``), on math-verify.

``judge(gold, pred, tolerances)``:

1. Both strings are cleaned: after ``\in `` if present; ``\left``/``\right``, ``$``, ``%``, degree signs removed;
   ``\approx``/``\simeq``/``\sim`` read as ``=``; primes as ``'``; full-width commas as commas; surrounding
   punctuation stripped; ``\mathrm{}``/``\mathbf{}`` unwrapped. Equal strings are correct.
2. Both are split at top-level commas (``\pm`` expands to two answers); the pieces must pair up one-to-one,
   in any order, each gold piece ``i`` with its own tolerance ``tolerances[i]`` (default 1e-8).
3. Two pieces are equal when: they are the same string; or both are intervals with the same brackets and
   equal end points (``\cup`` unions piece by piece); or both are numbers with ``|gold - pred| <= 1.01 tol``
   (also against gold/100 and gold*100, for percentages); or, unless both are equations, the right-hand sides
   are equal expressions (constants within the tolerance, otherwise ``simplify(a - b)`` below 1e-3); or both
   are equations whose ``lhs - rhs`` differ by a non-zero integer factor.

Deviation: LaTeX is read by math-verify (``latex2sympy2_extended``) instead of sympy's ``parse_latex`` (which
needs antlr at run time); answers that could make sympy evaluate for minutes are refused by
``answers.parse_expr``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from sympy import Basic, simplify

from diva_lightning.evaluation.answers import parse_expr

DEFAULT_TOLERANCE = 1e-8
_REPLACE = (("\\left", ""), ("\\right", ""), ("∶", ":"), ("，", ","), ("$", ""), ("\\approx", "="),
            ("\\simeq", "="), ("\\sim", "="), ("^\\prime", "'"), ("^{\\prime}", "'"), ("^\\circ", ""), ("%", ""))
_STRIP = "\n$,.:;^_=+`!@#$%^&*~，。 "
_ROMAN_WRAPPER = re.compile(r"\\(?:mathrm|mathbf)\{~?([^}]*)\}")
_CJK = re.compile(r"[\u4e00-\u9fff]+")


def clean(s: str) -> str:
    if "\\in " in s:
        s = s.split("\\in ", 1)[1]
    for old, new in _REPLACE:
        s = s.replace(old, new)
    return _ROMAN_WRAPPER.sub(r"\1", s.strip(_STRIP))


def split_top_level(s: str) -> list[str]:
    """Split at commas outside (), [] and {}."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(s[start:i].strip())
            start = i + 1
    parts.append(s[start:].strip())
    return [p for p in parts if p]


def _expand_pm(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        out.extend([item.replace("\\pm", "+"), item.replace("\\pm", "-")] if "\\pm" in item else [item])
    return out


def _sym(s: str) -> Basic:
    expr = parse_expr(s)
    if expr is None:
        raise ValueError(f"cannot read {s!r}")
    return expr


def _numbers_equal(gold: str, pred: str, tol: float) -> bool:
    try:
        g, p = float(gold), float(pred)
    except ValueError:
        return False
    return any(abs(candidate - p) <= tol * 1.01 for candidate in (g / 100, g, g * 100))


def _expressions_equal(gold: str, pred: str, tol: float) -> bool:
    g = _sym(gold.split("=")[1] if "=" in gold else gold)
    p = _sym(pred.split("=")[1] if "=" in pred else pred)
    if g == p:
        return True
    if bool(g.free_symbols) != bool(p.free_symbols):
        return False
    if not g.free_symbols:
        return bool(abs(complex(g.evalf()) - complex(p.evalf())) <= tol * 1.01)
    difference = simplify(g - p)
    return bool(difference.is_number and abs(complex(difference.evalf())) < 1e-3)


def _equations_equal(gold: str, pred: str) -> bool:
    if gold.count("=") != 1 or pred.count("=") != 1:
        return False
    g_lhs, g_rhs = gold.split("=")
    p_lhs, p_rhs = pred.split("=")
    g, p = simplify(_sym(g_lhs) - _sym(g_rhs)), simplify(_sym(p_lhs) - _sym(p_rhs))
    if g == 0 or p == 0:
        return False
    return any(r.is_Integer and r != 0 for r in (simplify(g / p), simplify(p / g)))


def _is_interval(s: str) -> bool:
    return s[:1] in "([" and s[-1:] in ")]" and len(s) > 1


def _intervals_equal(gold: str, pred: str, tol: float) -> bool:
    g_parts, p_parts = gold.split("\\cup"), pred.split("\\cup")
    if len(g_parts) != len(p_parts):
        return False
    for g, p in zip(g_parts, p_parts):
        g, p = g.strip(), p.strip()
        if g[:1] != p[:1] or g[-1:] != p[-1:]:
            return False
        g_ends, p_ends = g.strip("[]()").split(","), p.strip("[]()").split(",")
        if len(g_ends) != len(p_ends) or not all(_expressions_equal(a, b, tol) for a, b in zip(g_ends, p_ends)):
            return False
    return True


def pieces_equal(gold: str, pred: str, tol: float) -> bool:
    if gold == pred and gold:
        return True
    if _is_interval(gold) and _is_interval(pred):
        try:
            if _intervals_equal(gold, pred, tol):
                return True
        except (ValueError, TypeError, AttributeError):
            return False
    if _numbers_equal(gold, pred, tol):
        return True
    # The official order: expressions (unless both are equations), then equations; a failure is "not equal".
    if not ("=" in gold and "=" in pred) and _safely(_expressions_equal, gold, pred, tol):
        return True
    return _safely(_equations_equal, gold, pred)


def _safely(check: Callable[..., bool], *args: Any) -> bool:
    try:
        return check(*args)
    except (ValueError, TypeError, AttributeError, ZeroDivisionError):
        return False


def judge(gold: str, pred: str, tolerances: Sequence[float] = (DEFAULT_TOLERANCE,)) -> bool:
    """True when ``pred`` answers ``gold`` (see the module docstring); order of multiple answers is free."""
    g, p = clean(gold), clean(pred)
    if g == p:
        return bool(g)
    golds = _expand_pm(split_top_level(_CJK.sub("", g)))
    preds = _expand_pm(split_top_level(_CJK.sub("", p)))
    if not golds or len(golds) != len(preds):
        return False
    tols = list(tolerances) or [DEFAULT_TOLERANCE]
    if len(tols) == 1:
        tols = tols * len(golds)
    for i, piece in enumerate(golds):
        tol = tols[i] if i < len(tols) else DEFAULT_TOLERANCE
        match = next((j for j, candidate in enumerate(preds) if pieces_equal(piece, candidate, tol)), None)
        if match is None:
            return False
        preds.pop(match)
    return True
