"""A reward with spread for an untrained policy (its answers are never right): 1.0 if the response has a '1'.

Used where a test needs non-zero advantages and real gradient steps from the tiny random model.
"""


def contains_one(response: str, answer: str) -> float:
    return 1.0 if "1" in response else 0.0


GRADED: list[str] = []  # every response counting_contains_one has graded, in order


def counting_contains_one(response: str, answer: str) -> float:
    """contains_one that also records each response it grades (tests count the responses evaluated)."""
    GRADED.append(response)
    return contains_one(response, answer)
