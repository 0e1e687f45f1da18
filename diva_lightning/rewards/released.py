r"""The reward as the authors released it (``examples/reward_function/math.py`` in ``Siaaaaaa1/DIVA_GRPO_release``).

Per response (``compute_score``, math.py:32-49):

1. whitespace around ``<``, ``>`` and ``/`` is removed from the whole response first (math.py:38,
   ``\s*(<|>|/)\s*`` -> the character alone), so ``< /think >`` reads as ``</think>``; both terms see that text;
2. format = 1 iff the text fully matches ``<think>.*</think>.*\\boxed\{.*\}.*`` with ``.`` spanning newlines
   (math.py:21-24): several or empty think blocks and an unclosed box are accepted, text before ``<think>`` is not;
3. accuracy = ``mathruler.grader.grade_answer(extract_boxed_content(text), answer)`` (math.py:27-29): the last
   ``\boxed{`` (no space allowed before the brace), its content to the matching brace; no box reads as the
   string ``"None"``;
4. reward = 0.9 accuracy + 0.1 format (``format_weight`` 0.1, math.py:32 and :43).

How it differs from the project's default (:class:`~diva_lightning.rewards.CombinedReward` with math-verify and
:func:`~diva_lightning.rewards.format_reward`), measured on the project's accuracy table
(tests/rewards/test_rewards_accuracy.py): mathruler marks wrong ``B.`` for ``B``, ``(C) 15`` for ``C``, ``50\%``
for ``0.5`` (and back), ``\{2,1\}`` for ``\{1,2\}`` and ``\text{Right triangle.}`` for ``right triangle``; the
other 32 cases grade alike. The format check is looser (several or empty think blocks, an unclosed box, spaces
inside tags). mathruler uses no signals (safe in worker threads); it has no size guard, but it does not let sympy
evaluate an expression containing ``^{``, ``^(`` or a multi-digit or stacked power (``should_allow_eval``), which
keeps power towers from hanging.

Select it in a config::

    model:
      init_args:
        reward:
          class_path: diva_lightning.rewards.released.ReleasedReward
"""

from __future__ import annotations

import re

from mathruler.grader import extract_boxed_content, grade_answer

from diva_lightning.rewards.registry import CombinedReward

_SPACES = re.compile(r"\s*([<>/])\s*")
_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


def released_text(response: str) -> str:
    """The response as the released reward reads it: no whitespace around ``<``, ``>`` and ``/``."""
    return _SPACES.sub(r"\1", response)


def released_format(response: str, answer: str = "") -> float:
    """1.0 iff the released format pattern fully matches the normalised response (``answer`` is unused)."""
    return 1.0 if _FORMAT.fullmatch(released_text(response)) else 0.0


def released_accuracy(response: str, answer: str) -> float:
    """1.0 iff mathruler grades the last boxed content of the normalised response equal to ``answer``."""
    return 1.0 if grade_answer(extract_boxed_content(released_text(response)), answer) else 0.0


class ReleasedReward(CombinedReward):
    """``acc_weight * released_accuracy + format_weight * released_format`` (released weights 0.9 / 0.1).

    Args:
        acc_weight / format_weight: the weights (math.py: ``1 - format_weight`` and ``format_weight`` = 0.1).
        num_workers: grade in a thread pool of this size (0 = in the calling thread).
    """

    def __init__(self, acc_weight: float = 0.9, format_weight: float = 0.1, num_workers: int = 0) -> None:
        super().__init__(acc_weight, format_weight, released_accuracy, released_format, num_workers)

    def __repr__(self) -> str:
        return (f"ReleasedReward(acc_weight={self.acc_weight}, format_weight={self.format_weight}, "
                f"num_workers={self.num_workers})")
