r"""Answer-string helpers the benchmark scorers share: the boxed answer, LaTeX unwrapping, numbers, options.

Every scorer reads the answer from the response's last ``\boxed{}`` (``rewards.accuracy.last_boxed``): the
R1 instruction the policy is prompted with asks for it, and we have no GPT extractor to read free text.

Bounds: math-verify is called with its signal-based timeouts off (they fail outside the main thread). Answers
longer than :data:`MAX_ANSWER_CHARS` are rejected before parsing, and :func:`parse_expr` refuses exponent
towers, four-digit exponents and factorials, the inputs known to make sympy evaluate for minutes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from math_verify import parse
from sympy import Basic

from diva_lightning.rewards.accuracy import MAX_ANSWER_CHARS, choice_letter, last_boxed, named_letters

_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:[eE][-+]?\d+)?")
_FRACTION = re.compile(r"(-?)\\[dt]?frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}")
_SLASH = re.compile(r"(-?[\d.]+)\s*/\s*(-?[\d.]+)")
_BIG_EXPONENT = re.compile(r"\^\s*\{?\s*[-+]?\d{4,}")
_TOWER = re.compile(r"\^\s*(?:\{[^{}]*\^|\w+\s*\^)")  # an exponent holding another power: 10^{10^{10}}
_OPTION_LINE = re.compile(r"^\s*\(?([A-H])\)?\s*[.:：、)]\s*(.*?)\s*$")


def boxed_answer(response: str) -> str | None:
    r"""Content of the last ``\boxed{}``, stripped; None when absent, unclosed, empty or too long."""
    box = last_boxed(response)
    if box is None or not box.strip() or len(box) > MAX_ANSWER_CHARS:
        return None
    return box.strip()


def unwrap(s: str) -> str:
    r"""Drop ``$``, ``\left``/``\right`` and ``\text{...}``-style wrappers (kept: their content)."""
    s = s.strip().strip("$").strip()
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    while True:
        unwrapped = _WRAPPER.sub(r"\1", s).strip()
        if unwrapped == s:
            return s
        s = unwrapped


def strip_degrees(s: str) -> str:
    return s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "").replace("°", "").strip()


def option_key(s: str) -> str:
    r"""An option text or a boxed answer normalised as MATH-Vision's scorer does before comparing: case, spaces,
    ``$``, thin spaces, ``\dfrac``/``\tfrac`` and degree signs aside (``50^\circ`` = ``50°`` = ``50``)."""
    s = s.lower().replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = strip_degrees(unwrap(s))
    for junk in ("\\,", "\\!", "\\;", "$", " "):
        s = s.replace(junk, "")
    return s.rstrip(".")


_SEPARATOR = re.compile(r"\s*(?:;|,(?!\d{3}(?!\d))|\\q?quad|\\lor|\\vee|\bor\b|\band\b)\s*")


def alternatives(s: str) -> list[str]:
    r"""``s`` split at its top-level separators (``,`` except a thousands comma, ``;``, ``or``, ``and``,
    ``\lor``, ``\quad``); a bracketed tuple or set stays one part."""
    s = unwrap(s)
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            m = _SEPARATOR.match(s, i)
            if m and m.end() > i and (i == 0 or m.start() >= start):
                if s[start:i].strip():
                    parts.append(s[start:i].strip())
                start = m.end()
    if s[start:].strip():
        parts.append(s[start:].strip())
    return parts


def hedged(pred: str, gold: str) -> bool:
    r"""Whether a boxed answer offers several different answers where ``gold`` is one: two or more different
    option letters (``B or C``), or two or more different values (``x=4, x=3`` for 3: MATH-Vision's clean-up
    keeps the last ``=`` part, so this read as 3). A gold answer that is itself a list is never hedged against."""
    if len(named_letters(pred)) > 1 and choice_letter(gold, gold=True) is not None:
        return True
    parts = alternatives(pred)
    if len(parts) < 2 or len(alternatives(gold)) > 1 or "\\pm" in gold or "\\mp" in gold:
        return False  # one answer offered, or the gold is itself several (a list, 1 \pm \sqrt{2})
    return len({option_key(p.split("=")[-1]) for p in parts}) > 1


def text_key(s: str) -> str:
    """Case-, space- and wrapper-free form of a text answer, for exact comparison of words and options."""
    return "".join(unwrap(s).rstrip(".").split()).casefold()


def parse_number(s: str) -> float | None:
    r"""A plain number (``-3``, ``1,000``, ``2.5e3``), a numeric fraction (``\frac{3}{4}``, ``3/4``) or None."""
    s = unwrap(s).replace("\\!", "").replace("{,}", ",").strip()
    if _NUMBER.fullmatch(s) and any(c.isdigit() for c in s):
        value = float(s.replace(",", ""))
        return value if math.isfinite(value) else None
    for pattern in (_FRACTION, _SLASH):
        m = pattern.fullmatch(s)
        if m is None:
            continue
        groups = m.groups()
        sign = -1.0 if len(groups) == 3 and groups[0] == "-" else 1.0
        try:
            num, den = float(groups[-2]), float(groups[-1])
        except ValueError:
            return None
        return sign * num / den if den != 0 else None
    return None


def parse_expr(s: str) -> Basic | None:
    r"""math-verify's sympy reading of a LaTeX answer, or None (unparsable, too long, or a risky power)."""
    s = unwrap(s)
    if not s or len(s) > MAX_ANSWER_CHARS or _TOWER.search(s) or _BIG_EXPONENT.search(s) or "!" in s:
        return None
    try:
        parsed = parse(f"${s}$", parsing_timeout=None)
    except Exception:  # math-verify raises assorted parser errors on garbage
        return None
    expr = parsed[0] if parsed else None
    return expr if isinstance(expr, Basic) else None


def latex_value(s: str) -> float | None:
    r"""The numeric value of a constant expression (``\sqrt{2}``, ``\frac{\pi}{4}``, ``2^{10}``), else None."""
    plain = parse_number(s)
    if plain is not None:
        return plain
    expr = parse_expr(s)
    if expr is None or expr.free_symbols or not expr.is_number:
        return None
    try:
        value = complex(expr.evalf())
    except (TypeError, ValueError, OverflowError):
        return None
    return value.real if value.imag == 0 and math.isfinite(value.real) else None


def inline_options(text: str) -> dict[str, str]:
    """Options written one per line as ``A. text``, ``A: text`` or ``(A) text``; {} unless they run A, B, ..."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        m = _OPTION_LINE.match(line)
        if m and m.group(2):
            found.setdefault(m.group(1), m.group(2))
    letters = sorted(found)
    expected = [chr(ord("A") + i) for i in range(len(letters))]
    return found if len(letters) >= 2 and letters == expected else {}


def levenshtein(a: Sequence[str], b: Sequence[str]) -> int:
    """Edit distance (insertions, deletions, substitutions, cost 1 each) between two strings, as MathVista's scorer
    uses it, or two token sequences (the teacher's paraphrase checks)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def chosen_option(pred: str, options: Mapping[str, str]) -> str | None:
    r"""The option letter a boxed answer names: the option whose text it spells (case, spaces, degree signs and
    ``\dfrac`` aside: `option_key`), else a letter in any usual wrapper (``B``, ``(b)``, ``B.``, ``(B) 15``;
    ``rewards.choice_letter``). A box naming several letters names none (no hedging)."""
    key = option_key(pred)
    matches = [letter for letter, text in options.items() if key and option_key(text) == key]
    if len(matches) == 1:
        return matches[0]
    named = choice_letter(pred)
    return named if named is not None and (not options or named in options) else None
