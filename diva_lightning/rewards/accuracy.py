r"""Accuracy reward: the last ``\boxed{...}`` of a response graded against the answer with math-verify.

Rules (design.md section 2.4):

- The *last* ``\boxed{`` opener decides. Its content runs to the matching brace (balanced, ``\{``/``\}``
  are escaped literals and do not count). If that last box never closes (a truncated response) there is
  no answer: 0.0, we do not fall back to an earlier box. No box, an empty box, or an empty gold answer
  also give 0.0.
- Multiple choice: when the gold answer is a single capital letter A-Z (optionally ``(B)``, ``B.``,
  ``B)``, ``B:``, ``\text{(B)}``, ``\textbf{B}``, ``$B$``), the question is multiple choice. The box
  must then name one letter in any of those forms, case-insensitively (``(b)`` counts as B: models
  often lower-case), optionally followed by the option text (``(C) 15`` is C). Letters are compared as
  strings; math-verify is not consulted, so ``B`` never equals a symbol ``b`` in an expression.
- No hedging (issue 22): a box that names two or more different letters (``B or A``, ``B and C``,
  ``B, C``, ``(B)(C)``, ``(C) 15 or (D) 20``) names no choice and scores 0.0 (otherwise a policy learns to
  list letters and collects the reward of each). The same letter twice (``B or b``) is one answer.
- Words: when the gold answer is a plain word or phrase (two or more letters, spaces, hyphens,
  apostrophes; e.g. ``yes``, ``right triangle``), the box must spell it, ignoring case, whitespace,
  ``\text{}`` wrappers and a final period. math-verify would read a word as a product of symbols and
  accept any anagram (``sey`` == ``yes``). A gold ``xy`` is therefore a word too: ``yx`` scores 0.
- Everything else: both strings are wrapped in ``$...$`` and parsed by math-verify, which then equates
  ``\frac{1}{2}`` and ``0.5``, ``45^\circ`` and ``45``, ``50\%`` and ``0.5``, ``x=3`` and ``3``,
  ``6\text{ cm}`` and ``6``, ``\{1,2\}`` and ``\{2,1\}`` (without the ``$``, bare answers often do not
  parse). Wrong or unparsable answers give 0.0.

Thread safety and time bounds: math-verify's own timeouts use ``signal.alarm``, which raises outside the
main thread (thread pools, dataloader workers) and would also race with other alarms. We always pass
``parsing_timeout=None`` / ``timeout_seconds=None`` and bound the work ourselves:

1. a box longer than :data:`MAX_ANSWER_CHARS` characters (or a gold answer that long) scores 0.0
   without parsing;
2. before ``verify``, a size guard walks both parsed expressions and scores 0.0 if any number in them
   could exceed :data:`MAX_DIGITS` decimal digits (power towers such as ``9^{9^{9^9}}`` or ``(10^{100})!``
   make sympy evaluate astronomically large integers and hang for minutes; they are never correct
   answers to our questions).

These bound the known pathological inputs; sympy's ``simplify`` on a short but adversarial expression is
not formally bounded. For a hard wall-clock guarantee, call the reward in a subprocess.
"""

from __future__ import annotations

import logging
import math
import re
from functools import lru_cache

from math_verify import parse, verify
from sympy import Basic, Integer, Number, Rational
from sympy.functions.combinatorial.factorials import factorial
from sympy.matrices import MatrixBase

MAX_ANSWER_CHARS = 512
MAX_DIGITS = 10_000

# math-verify logs a warning the first time timeouts are disabled; that is our deliberate choice.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_BOX_OPEN = re.compile(r"\\boxed\s*\{")
# One option letter, in the wrappers models and datasets use: (B)  B  B.  B)  B:  optionally followed by
# the option's text after whitespace.
_CHOICE = re.compile(r"^\(?\s*([A-Za-z])\s*\)?\s*[.:)]?(?:\s+.*)?$", re.DOTALL)
_GOLD_CHOICE = re.compile(r"^\(?\s*([A-Z])\s*\)?\s*[.:)]?$")
_GOLD_WORD = re.compile(r"^[A-Za-z][A-Za-z\s'-]*[A-Za-z]$")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def last_boxed(response: str) -> str | None:
    r"""Content of the last ``\boxed{...}``, or None if there is none or it never closes."""
    matches = list(_BOX_OPEN.finditer(response))
    if not matches:
        return None
    start = matches[-1].end()
    depth, i = 1, start
    while i < len(response):
        ch = response[i]
        if ch == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return response[start:i]
        i += 1
    return None


def _strip_wrappers(s: str) -> str:
    r"""Drop surrounding ``$``, whitespace and ``\text{...}``-style wrappers (repeatedly, for nesting)."""
    s = s.strip().strip("$").strip()
    while True:
        unwrapped = _TEXT_WRAPPER.sub(r"\1", s).strip()
        if unwrapped == s:
            return s
        s = unwrapped


def _word_key(s: str) -> str:
    r"""Case- and whitespace-free form of a word answer: ``\text{Right  Triangle.}`` -> ``righttriangle``."""
    return "".join(_strip_wrappers(s).rstrip(".").split()).lower()


def choice_letter(s: str, *, gold: bool = False) -> str | None:
    """The option letter (upper case) that ``s`` names, or None.

    A response naming several different letters (a hedge) names none: None.
    ``gold=True`` is the strict test for an answer key (one capital letter, no option text), so that an
    answer like ``x`` or ``a`` stays a math answer.
    """
    s = _strip_wrappers(s)
    m = (_GOLD_CHOICE if gold else _CHOICE).match(s)
    if m is None or (not gold and len(named_letters(s)) > 1):
        return None  # no letter, or a hedge naming several
    return m.group(1).upper()


# Further letters a box names besides its leading choice: any parenthesised letter, or a letter standing alone
# right after a connector (``B or C``, ``b/c``, ``B \text{ or } C``). A capital elsewhere in the option text is
# not a second choice: points, angles and units (``(B) Point P``, ``B. 3 N``, ``(B) \angle A``) stay one answer.
_OTHER_LETTER = re.compile(r"\(\s*([A-Za-z])\s*\)"
                           r"|(?:[,;/&]|\bor\b|\band\b)[\s}]*([A-Za-z])(?![A-Za-z0-9])")


def named_letters(s: str) -> set[str]:
    """Every option letter (upper case) that ``s`` names: its leading choice and any other letter it lists."""
    s = _strip_wrappers(s)
    m = _CHOICE.match(s)
    letters = {m.group(1).upper()} if m else set()
    letters.update((a or b).upper() for a, b in _OTHER_LETTER.findall(s))
    return letters


@lru_cache(maxsize=8192)
def _parse(s: str) -> tuple[object, ...]:
    """math-verify parse of ``$s$`` (cached: a gold answer is graded G times per step). Immutable result."""
    return tuple(parse(f"${s}$", parsing_timeout=None))


def _log10_bound(expr: object) -> float:
    """An upper bound of log10 |value| over the numbers ``expr`` can evaluate to (0 for symbols).

    Conservative on purpose: any operand is treated as large, and negative exponents as positive (an
    exact rational 2**-(10**9) is just as expensive).
    """
    if isinstance(expr, MatrixBase):
        return max((_log10_bound(e) for e in expr), default=0.0)
    if not isinstance(expr, Basic):
        return 0.0
    if isinstance(expr, Integer):
        return math.log10(abs(int(expr))) if expr != 0 else 0.0  # already evaluated: size is known
    if isinstance(expr, Rational):
        return _log10_bound(Integer(expr.p)) + _log10_bound(Integer(expr.q))
    if isinstance(expr, Number):  # Float, and oo / zoo / nan, which are cheap to compare
        v = abs(float(expr))
        return math.log10(v) if math.isfinite(v) and v > 1 else 0.0
    args = [_log10_bound(a) for a in expr.args]
    if expr.is_Pow:
        base, exp = args
        if exp > 15:
            return math.inf if base > 0 or expr.args[0].free_symbols else 0.0
        return max(base, math.log10(2)) * 10**exp
    if isinstance(expr, factorial):
        if args[0] > 15:
            return math.inf
        n = 10 ** args[0]
        return n * math.log10(max(n, 2))
    if expr.is_Mul:
        return sum(args)
    return max(args, default=0.0) + math.log10(max(len(args), 1))


def _safe(parsed: tuple[object, ...]) -> bool:
    return all(_log10_bound(p) <= MAX_DIGITS for p in parsed)


def accuracy_reward(response: str, answer: str) -> float:
    r"""1.0 if the last ``\boxed{}`` of ``response`` equals ``answer``, else 0.0 (see module docstring)."""
    pred = last_boxed(response)
    gold = answer.strip()
    if pred is None or not pred.strip() or not gold:
        return 0.0
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return 0.0
    gold_letter = choice_letter(gold, gold=True)
    if gold_letter is not None:
        return 1.0 if choice_letter(pred) == gold_letter else 0.0
    if _GOLD_WORD.match(_strip_wrappers(gold)):
        return 1.0 if _word_key(pred) == _word_key(gold) else 0.0
    gold_parsed = _parse(gold.strip("$").strip())
    pred_parsed = _parse(pred.strip().strip("$"))
    if not gold_parsed or not pred_parsed or not (_safe(gold_parsed) and _safe(pred_parsed)):
        return 0.0
    return 1.0 if verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None) else 0.0
