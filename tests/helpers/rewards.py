"""A reward with spread for an untrained policy (its answers are never right): 1.0 if the response has a digit.

Used where a test needs non-zero advantages and real gradient steps from the tiny random model.
"""


def contains_digit(response: str, answer: str) -> float:
    return 1.0 if any(ch.isdigit() for ch in response) else 0.0


GRADED: list[str] = []  # every response counting_contains_digit has graded, in order


def counting_contains_digit(response: str, answer: str) -> float:
    """contains_digit that also records each response it grades (tests count the responses evaluated)."""
    GRADED.append(response)
    return contains_digit(response, answer)
