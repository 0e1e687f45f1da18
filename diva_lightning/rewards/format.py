r"""Format reward: ``<think>...</think> ... \boxed{...}`` (design.md section 2.4).

``format_reward(response)`` is 1.0 iff all of:

1. ``_FORMAT`` full-matches the response (``re.DOTALL``, so ``.`` spans newlines): optional leading
   whitespace, then ``<think>``, a reasoning part, ``</think>``, then the answer part to the end of the
   string. Neither part may contain another ``<think>`` or ``</think>`` tag (exactly one think block,
   first; a second block is a common reward hack to hide text).
2. The reasoning part contains at least one non-whitespace character.
3. The answer part contains a closed ``\boxed{...}`` (balanced braces, as the accuracy reward reads it)
   whose content is not blank. Text before and after the box is allowed.

Otherwise 0.0. Tags are case-sensitive, as the chat template emits them. The official EasyR1 pattern
``<think>.*</think>.*\\boxed\{.*\}.*`` is looser (several think blocks, an empty one, an unclosed box);
every response we accept it accepts too.
"""

from __future__ import annotations

import re

from diva_lightning.rewards.accuracy import last_boxed

_NO_TAG = r"(?:(?!</?think>).)"
_FORMAT = re.compile(rf"\s*<think>(?P<think>{_NO_TAG}*)</think>(?P<answer>{_NO_TAG}*)", re.DOTALL)


def format_reward(response: str) -> float:
    """1.0 if ``response`` is one non-empty think block followed by a boxed answer, else 0.0."""
    m = _FORMAT.fullmatch(response)
    if m is None or not m.group("think").strip():
        return 0.0
    boxed = last_boxed(m.group("answer"))
    return 1.0 if boxed is not None and boxed.strip() else 0.0
