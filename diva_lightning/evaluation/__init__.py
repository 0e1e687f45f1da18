"""The paper's six evaluation benchmarks: native-file readers, rule-based scorers, metrics, and Table 1.

    bench = get_benchmark("mathvista")
    records, report = bench.read("data/MathVista/testmini.json")      # on_error="raise" | "skip"
    scores = {r.id: [bench.score(r, response) for response in responses[r.id]] for r in records}
    metrics = bench.aggregate(records, scores)                        # {"accuracy": ...}

Responses files (``{"id", "response"}`` JSON lines) are written and read by :mod:`.responses`; the ``score``
command is :func:`.score.score_main`; :func:`.report.table1_report` writes the Table-1-form report. Scoring is
rule-based everywhere (no GPT judge); each module's docstring lists where it departs from the official scorer.
"""

from diva_lightning.evaluation import mathverse, mathvision, mathvista, mmk12, olympiadbench, wemath
from diva_lightning.evaluation.base import Benchmark, describe_load
from diva_lightning.evaluation.report import table1_report
from diva_lightning.evaluation.responses import read_responses, write_responses

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (mathvista.BENCHMARK, mathverse.BENCHMARK, mathvision.BENCHMARK, olympiadbench.BENCHMARK,
              wemath.BENCHMARK, mmk12.BENCHMARK)
}
"""Registry by name, in the paper's Table 1 order."""


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name`` (case-insensitive): one of :data:`BENCHMARKS`."""
    try:
        return BENCHMARKS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "describe_load",
    "get_benchmark",
    "read_responses",
    "table1_report",
    "write_responses",
]
