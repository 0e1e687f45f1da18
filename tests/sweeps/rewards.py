"""Test reward with spread for an untrained policy: 1.0 when the response's character codes sum to 0 mod 4.

Random responses are right about a quarter of the time: groups have spread, and a family's accuracy is far
enough from 0.5 that its difficulty leaves the medium band after one step (so variants get other labels)."""


def code_sum_mod4(response: str, answer: str) -> float:
    return float(sum(map(ord, response)) % 4 == 0)
