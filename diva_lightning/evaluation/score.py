"""``python -m diva_lightning score``: grade saved responses on a benchmark's native file, without a model.

    python -m diva_lightning score --benchmark mathvista --data MathVista/testmini.json \\
        --responses runs/x/mathvista.responses.jsonl [--output metrics.json]

Prints what was loaded (and skipped, by reason), a metric table, and writes the metrics as JSON (by default
next to the responses file, ``<responses>.metrics.json``). Every question needs a response and every response
id must be a question: a mismatch is an error listing the ids, unless ``--missing-as-wrong`` (a question
without a response scores 0) or ``--ignore-unknown`` (responses to unknown ids are left out) is given; either
way the ids are counted and listed in the output.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from diva_lightning.core.choices import OnError
from diva_lightning.data.schema import QuestionRecord, RecordError
from diva_lightning.evaluation.base import Benchmark, describe_load
from diva_lightning.evaluation.responses import read_responses

PROTOCOL = "rule-based scoring of the last \\boxed{} answer (no GPT judge); see diva_lightning/evaluation/"


@dataclass
class ScoreResult:
    """Scores of one responses file: the metrics, each question's sample scores, and the id mismatches."""

    metrics: dict[str, float]
    per_record: dict[str, list[float]]
    samples: int
    missing: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def score_responses(benchmark: Benchmark, records: Sequence[QuestionRecord],
                    responses: Mapping[str, Sequence[str]], *, missing_as_wrong: bool = False,
                    ignore_unknown: bool = False) -> ScoreResult:
    """Grade every response; ValueError listing mismatched ids unless the matching flag allows them."""
    ids = {r.id for r in records}
    missing = [r.id for r in records if not responses.get(r.id)]
    unknown = [i for i in responses if i not in ids]
    errors = []
    if missing and not missing_as_wrong:
        errors.append(f"{len(missing)} question(s) have no response (--missing-as-wrong scores them 0): "
                      f"{_preview(missing)}")
    if unknown and not ignore_unknown:
        errors.append(f"{len(unknown)} response id(s) are not questions of the data file (--ignore-unknown "
                      f"leaves them out): {_preview(unknown)}")
    if errors:
        raise ValueError("\n".join(errors))
    per_record = {r.id: [benchmark.score(r, text) for text in responses.get(r.id, [])] for r in records}
    samples = sum(map(len, per_record.values()))
    per_record = {i: scores or [0.0] for i, scores in per_record.items()}  # --missing-as-wrong
    return ScoreResult(benchmark.aggregate(records, per_record), per_record, samples, missing, unknown)


def _preview(ids: Sequence[str], limit: int = 20) -> str:
    return ", ".join(map(repr, ids[:limit])) + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def format_table(metrics: Mapping[str, float]) -> str:
    width = max(len("metric"), *(len(k) for k in metrics))
    lines = [f"{'metric':<{width}}  {'value':>8}", f"{'-' * width}  {'-' * 8}"]
    lines += [f"{k:<{width}}  {100 * v:>7.2f}%" for k, v in metrics.items()]
    return "\n".join(lines)


def _parser() -> ArgumentParser:
    """jsonargparse, as every command of `python -m diva_lightning` (options may come from a --config file too)."""
    from diva_lightning.evaluation import BENCHMARKS

    p = ArgumentParser(prog="python -m diva_lightning score", default_env=False,
                       description="Grade saved responses on a benchmark's native file, without a model.")
    p.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options.")
    p.add_argument("--benchmark", required=True, choices=list(BENCHMARKS), help="which benchmark's rules")
    p.add_argument("--data", required=True, type=Path, help="the benchmark's native file (.json/.jsonl/.parquet)")
    p.add_argument("--responses", required=True, type=Path, help='JSONL of {"id": ..., "response": ...}')
    p.add_argument("--output", type=Path | None, default=None, help="metrics JSON (default: <responses>.metrics.json)")
    p.add_argument("--on-error", type=OnError, default="raise",
                   help="bad data rows: fail listing them all (default), or skip and count them")
    p.add_argument("--missing-as-wrong", action="store_true", help="score questions without a response as 0")
    p.add_argument("--ignore-unknown", action="store_true", help="leave out responses whose id is no question")
    return p


def score_main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m diva_lightning score`` (see the module docstring)."""
    from diva_lightning.evaluation import get_benchmark

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    bench = get_benchmark(args.benchmark)
    try:
        records, report = bench.read(args.data, on_error=args.on_error)
        print(describe_load(bench.name, report), flush=True)
        responses = read_responses(args.responses)
        print(f"responses: {sum(map(len, responses.values()))} line(s) for {len(responses)} id(s) from "
              f"{args.responses}", flush=True)
        result = score_responses(bench, records, responses, missing_as_wrong=args.missing_as_wrong,
                                 ignore_unknown=args.ignore_unknown)
    except (RecordError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if result.missing:
        print(f"{len(result.missing)} question(s) without a response scored 0 (--missing-as-wrong)")
    if result.unknown:
        print(f"{len(result.unknown)} response id(s) not in the data left out (--ignore-unknown)")
    print(f"\n{bench.title}: {len(records)} question(s), {result.samples} scored sample(s); {PROTOCOL}")
    print(format_table(result.metrics))
    output = args.output or args.responses.with_suffix(".metrics.json")
    payload = {"benchmark": bench.name, "data": str(args.data), "responses": str(args.responses),
               "questions": len(records), "skipped_rows": report.skipped, "samples": result.samples,
               "missing_ids": result.missing, "unknown_ids": result.unknown, "protocol": PROTOCOL,
               "metrics": result.metrics}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nmetrics written to {output}")
