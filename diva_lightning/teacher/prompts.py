r"""What the teacher is asked: paraphrases, think steps in two turns, and a plain solve.

The scheme follows the authors' teacher (reference: official-diva.md, "Teacher"); the wording is ours.

- **Paraphrases** are asked for from the text alone (the image is not sent, as the authors did), K at a
  time, each in numbered ``<variantN>...</variantN>`` tags, keeping every ``<image>`` tag.
- **Think steps** take two turns of one conversation. Turn 1 sends the image and the problem and asks for
  3-5 steps in ``<stepN>...</stepN>`` tags and a ``\boxed{}`` answer. Turn 2 tells the teacher the correct
  answer and asks it to revise the steps so that they lead there, without stating the answer and without
  reasoning backwards from it, and to box the answer again; the revised steps are what we keep.
- **Solve** (``--verify-paraphrases``): the teacher answers a paraphrase with the image; it must box the
  ground truth for the paraphrase to be kept.

``PROMPT_VERSION`` is written into every output row's provenance; change it whenever a prompt's wording
changes, so rows made with different prompts can be told apart (and a resumed run refuses to mix them).
"""

from __future__ import annotations

IMAGE_TAG = "<image>"
PROMPT_VERSION = "diva-teacher-v1"
VARIANT_TAG = "variant"
STEP_TAG = "step"


def _image_rule(n_images: int) -> str:
    if n_images == 0:
        return f"contain no {IMAGE_TAG} tag, like the original"
    times = "once" if n_images == 1 else f"exactly {n_images} times"
    return (f"contain the tag {IMAGE_TAG} {times}, where the original has it (it stands for an image that "
            "you are not shown)")


def paraphrase_prompt(problem: str, k: int) -> str:
    """Ask for ``k`` paraphrases of ``problem`` (text only), each in ``<variantN>`` tags."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    last = f"<{VARIANT_TAG}{k}> ... </{VARIANT_TAG}{k}>"
    return (
        f"Write {k} distinct rewordings of the problem below. Each rewording must:\n"
        "1. have exactly the same correct answer as the original;\n"
        "2. use clearly different wording or sentence structure, not a light edit of the original;\n"
        "3. keep every number, condition and answer option needed to solve it, and neither state nor hint "
        "at the answer;\n"
        f"4. {_image_rule(problem.count(IMAGE_TAG))}.\n"
        f"Put each rewording between numbered tags, <{VARIANT_TAG}1> ... </{VARIANT_TAG}1> up to {last}, "
        "and write nothing else.\n\n"
        f"Problem: {problem}"
    )


def steps_prompt(problem: str, *, min_steps: int = 3, max_steps: int = 5) -> str:
    r"""Turn 1 of the think steps (sent with the image): steps in ``<stepN>`` tags, then ``\boxed{}``."""
    return (
        f"Solve the problem below in {min_steps} to {max_steps} short reasoning steps. Put each step between "
        f"numbered tags, <{STEP_TAG}1> ... </{STEP_TAG}1>, <{STEP_TAG}2> ... </{STEP_TAG}2>, and so on. "
        "After the steps, give the final answer in \\boxed{}.\n\n"
        f"Problem: {problem}"
    )


def revise_prompt(answer: str, *, min_steps: int = 3, max_steps: int = 5) -> str:
    r"""Turn 2 of the think steps: the correct answer is given; revise the steps without stating it."""
    return (
        f"The correct answer to this question is: {answer}\n"
        "Revise your steps so that they lead to this answer. Write "
        f"{min_steps} to {max_steps} steps in the same numbered <{STEP_TAG}N> ... </{STEP_TAG}N> tags. The steps "
        "must not state the final answer and must not reason backwards from it: each step has to follow from "
        "the problem and the image alone, so that a student who reads them still has to finish the last "
        "step. After the steps, give the final answer in \\boxed{}."
    )


def solve_prompt(problem: str) -> str:
    r"""A plain solve (sent with the image), used to verify a paraphrase: the answer goes in ``\boxed{}``."""
    return f"{problem}\n\nSolve the problem and give the final answer in \\boxed{{}}."
