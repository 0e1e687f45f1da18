r"""The checks a teacher's output must pass before it is kept ("checks, not trust").

Each check returns ``None`` (pass) or the name of the reason it failed; the names are the rows of the
run's kept/rejected table.

**Paraphrase** (in this order, the first failure is the reason):

- ``image_tags``: it must hold as many ``<image>`` tags as the problem (we do not repair a missing tag, as
  the authors did by prepending one: a tag in the wrong place changes what the question refers to).
- ``contains_answer``: it must not mention the answer more often than the problem does, and must not
  contain a ``\boxed{}`` (see :func:`answer_mentions`). "More often than the problem" keeps questions such
  as "add 3" with answer 3 from being rejected for repeating their own data.
- ``near_copy``: its similarity to the problem must be below ``max_similarity`` (see :func:`similarity`).
- ``duplicate``: its similarity to a paraphrase already kept for the question must be below it too.

**Think steps** (the teacher's second, answer-aware turn):

- ``no_answer`` / ``wrong_answer``: the reply's last ``\boxed{}`` must grade correct against the ground
  truth with the training accuracy reward (``rewards.accuracy_reward``); a missing box is ``no_answer``.
- ``malformed_steps``: the steps must be one clean run ``<step1>..<stepN>`` (no gap, nothing unclosed,
  empty or repeated).
- ``step_count``: ``min_steps <= N <= max_steps``.
- ``states_answer``: the steps must not give the answer away (see :func:`states_answer`).

**Similarity** is the word-level edit similarity ``1 - lev(a, b) / max(|a|, |b|)`` over lower-cased word
tokens (``\w+``, with ``<image>`` as one token; punctuation ignored). It is 1 for equal texts and 0 for
texts with nothing in place in common; one inserted word in an 8-word question gives 0.875, two changed
words 0.75. The default threshold 0.75 therefore asks that more than a quarter of the words change, in
the spirit of the authors' "significantly different wording". The embedded world's own paraphrases are at
most 0.69 from their original (measured over its templates). An edit distance (not a bag of words) is
used so that a reordered sentence counts as different wording, which it is.

Known limits, by design of a cheap string check: a paraphrase that spells a numeric answer in words
("three" for 3) or restates it as an equivalent expression passes ``contains_answer``; an honest
intermediate value that happens to equal the answer at the very end of the last step fails
``states_answer``. ``--verify-paraphrases`` catches paraphrases that changed the answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from diva_lightning.evaluation.answers import levenshtein
from diva_lightning.rewards import accuracy_reward, choice_letter, last_boxed

IMAGE_TAG = "<image>"
DEFAULT_MAX_SIMILARITY = 0.75
_WORD = re.compile(r"<image>|\w+")
_BOXED = re.compile(r"\\boxed\s*\{")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)$")
# "answer is X", "answer: X", "the correct option is X" (X is checked separately)
_ANSWER_PHRASE = re.compile(r"\b(?:answer|option|choice)\b\s*(?:is|:|=|would be|should be|must be)\s*",
                            re.IGNORECASE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens, ``<image>`` kept as one token, punctuation dropped."""
    return _WORD.findall(text.lower())


def edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (insert, delete, substitute: cost 1 each)."""
    return levenshtein(a, b)


def similarity(a: str, b: str) -> float:
    """Word-level edit similarity in [0, 1]: ``1 - lev(words(a), words(b)) / max(len)`` (1 for two empties)."""
    wa, wb = words(a), words(b)
    longest = max(len(wa), len(wb))
    return 1.0 if longest == 0 else 1.0 - edit_distance(wa, wb) / longest


def _answer_pattern(answer: str) -> re.Pattern[str]:
    """How the answer is found in text: a choice letter as a capital standing alone (not an option label
    ``(B)``/``B)``, not the article "A" before a lower-case word), a number not inside a longer number,
    anything else as a case-insensitive whole-word phrase."""
    gold = answer.strip()
    letter = choice_letter(gold, gold=True)
    if letter is not None:
        return re.compile(rf"(?<![\w(]){letter}(?![\w)])(?!\s+[a-z])")
    if _NUMBER.match(gold):
        return re.compile(rf"(?<![\w.]){re.escape(gold)}(?!\w|\.\d)")
    return re.compile(rf"(?<!\w){re.escape(gold)}(?!\w)", re.IGNORECASE)


def answer_mentions(text: str, answer: str) -> int:
    """How many times ``text`` mentions ``answer`` (see :func:`_answer_pattern`); 0 for a blank answer."""
    if not answer.strip():
        return 0
    return len(_answer_pattern(answer).findall(text))


def leaks_answer(text: str, problem: str, answer: str) -> bool:
    r"""True if ``text`` holds a ``\boxed{}`` or mentions the answer more often than ``problem`` does."""
    return bool(_BOXED.search(text)) or answer_mentions(text, answer) > answer_mentions(problem, answer)


def check_paraphrase(text: str, problem: str, answer: str, kept: Sequence[str], *,
                     max_similarity: float = DEFAULT_MAX_SIMILARITY) -> str | None:
    """None if the paraphrase passes, else the reason (module docstring, in that order)."""
    if text.count(IMAGE_TAG) != problem.count(IMAGE_TAG):
        return "image_tags"
    if leaks_answer(text, problem, answer):
        return "contains_answer"
    if similarity(text, problem) >= max_similarity:
        return "near_copy"
    if any(similarity(text, other) >= max_similarity for other in kept):
        return "duplicate"
    return None


def states_answer(steps: Sequence[str], answer: str) -> bool:
    r"""True if the steps give the answer away: a ``\boxed{}`` in any step, an "answer is X" phrase naming
    it, or a last step that ends with it (its final token grades correct with the accuracy reward, so
    ``so B.``, ``Total 7.`` or ``= $\frac{1}{2}$`` against 0.5 all count). Earlier steps may hold
    intermediate values equal to the answer: those are data, not the conclusion."""
    if any(_BOXED.search(s) for s in steps):
        return True
    for step in steps:
        for m in _ANSWER_PHRASE.finditer(step):
            named = step[m.end():].split(maxsplit=1)
            if named and _grades_as(named[0], answer):
                return True
    return bool(steps) and _grades_as(steps[-1].split()[-1] if steps[-1].split() else "", answer)


def _grades_as(token: str, answer: str) -> bool:
    """Whether one token, without wrapping punctuation and ``$``, grades as the answer."""
    token = token.strip("()[]$.,;:!?")
    return bool(token) and accuracy_reward(f"\\boxed{{{token}}}", answer) == 1.0


def check_steps(reply: str, steps: list[str] | None, answer: str, *, min_steps: int = 3,
                max_steps: int = 5) -> str | None:
    """None if the second-turn reply's steps pass, else the reason (module docstring, in that order).

    Args:
        reply: the whole second-turn reply (its last box is graded).
        steps: its steps as one clean run (``parsing.Tagged.contiguous``), or None when they were not.
    """
    if last_boxed(reply) is None:
        return "no_answer"
    if accuracy_reward(reply, answer) != 1.0:
        return "wrong_answer"
    if steps is None:
        return "malformed_steps"
    if not min_steps <= len(steps) <= max_steps:
        return "step_count"
    if states_answer(steps, answer):
        return "states_answer"
    return None
