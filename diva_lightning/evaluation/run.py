"""Evaluation over named sources: grading by each source's rule, gathering the ranks, metrics, and the files.

`DivaGRPOModule` drives one :class:`EvalRun` per validation, test or predict pass; the logic lives here so the
system stays thin. A *source* is one entry of the data module's `val_source` / `test_source` / `predict_source`
(one DataLoader each, in order: `dataloader_idx` names the source):

- a **benchmark source** (`{name: {path: FILE, benchmark: NAME}}`) grades each response with the benchmark's
  own rule-based scorer (`Benchmark.score`) and aggregates with its own metrics (WeMath's four dimensions,
  MathVerse per version, ...); `format` is the R1 format check (`rewards.format_reward`);
- a **plain source** (our record format, or the world) is graded by the system's reward, as in training:
  `accuracy` (mean over responses: mean@k), `format`, and `accuracy_level<k>` per intrinsic level. A NaN/inf
  reward raises, naming the questions (a score over the rest would be wrong).

Logged keys (``prefix`` = val | test): one unnamed source keeps ``<prefix>/accuracy``, ``<prefix>/format`` and
``<prefix>/accuracy_level<k>``; named sources log ``<prefix>/<name>/<metric>`` for every metric and
``<prefix>/accuracy`` = the mean of the sources' ``accuracy``.

Ranks: each rank evaluates its own shard; at the end every rank's responses are gathered to every rank
(``all_gather_object``), so all ranks compute and log the same values under the same keys (no rank-dependent key
can deadlock a synchronised log; nothing is reduced twice). A question evaluated on two ranks (a sampler that pads
shards with repeats) counts once.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
import torch.distributed as dist

from diva_lightning.data.schema import QuestionRecord
from diva_lightning.evaluation import Benchmark, get_benchmark, table1_report, write_responses
from diva_lightning.evaluation.score import PROTOCOL
from diva_lightning.rewards import Reward, format_reward

log = logging.getLogger(__name__)
PLAIN_PROTOCOL = "the system's reward: accuracy part, averaged over responses"


@dataclass
class EvalSource:
    """One evaluation source: its name ("" for a single unnamed one), records, and benchmark (None: plain)."""

    name: str
    records: list[QuestionRecord] = field(default_factory=list)
    benchmark: Benchmark | None = None
    path: str | None = None

    @property
    def label(self) -> str:
        """File stem for its outputs: the name, else "world" or the data file's stem."""
        if self.name:
            return self.name
        return "world" if self.path in (None, "world") else Path(str(self.path)).stem


def sources_of(datamodule: Any, stage: str) -> list[EvalSource]:
    """The sources of `stage` (val | test | predict) from a data module with ``<stage>_sets`` ({name: records})
    and ``<stage>_sources`` ({name: Source}) like `DivaDataModule`; [] for another data module (each loader is
    then an unnamed plain source, see :meth:`EvalRun.source`)."""
    sets, specs = getattr(datamodule, f"{stage}_sets", None), getattr(datamodule, f"{stage}_sources", None)
    if not isinstance(sets, Mapping) or not isinstance(specs, Mapping):
        return []
    out = []
    for name, records in sets.items():
        spec = specs[name]
        bench = get_benchmark(spec.benchmark) if spec.benchmark is not None else None
        out.append(EvalSource(name, list(records), bench, spec.path))
    return out


@dataclass
class _Question:
    """What one question got: its responses, their scores and format checks, its intrinsic level."""

    responses: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    formats: list[float] = field(default_factory=list)
    level: int = -1


@dataclass
class SourceResult:
    """A source's outcome: responses and scores per question id (in record order), its metrics (a benchmark's:
    what ``score`` computes from the responses file), and the share of responses in the R1 format."""

    source: EvalSource
    responses: dict[str, list[str]]
    scores: dict[str, list[float]]
    metrics: dict[str, float]
    format: float | None = None

    @property
    def samples(self) -> int:
        return sum(map(len, self.responses.values()))

    @property
    def complete(self) -> bool:
        """Every record of the source has a response (False under limit_*_batches or a sanity check)."""
        return all(r.id in self.responses for r in self.source.records)


class EvalRun:
    """One validation, test or predict pass over the sources: per-response results in, per-source results out."""

    def __init__(self, sources: list[EvalSource]) -> None:
        self.sources = list(sources)
        self._questions: list[dict[str, _Question]] = [{} for _ in self.sources]

    def source(self, idx: int) -> EvalSource:
        """The source of DataLoader ``idx``; loaders beyond the known sources are unnamed plain sources."""
        while idx >= len(self.sources):
            self.sources.append(EvalSource(name=str(len(self.sources)) if self.sources else ""))
            self._questions.append({})
        return self.sources[idx]

    def add(self, idx: int, batch: Any, prompt_index: Sequence[int], responses: Sequence[str], *,
            reward: Reward | None, where: str) -> list[dict[str, str]]:
        """Grade one batch's responses (``prompt_index[i]`` is the prompt of response i) by the source's rule and
        keep them; ``reward=None`` keeps the responses ungraded (predict). Returns ``{"id", "response"}`` rows."""
        source = self.source(idx)
        ids = [batch.question_ids[p] for p in prompt_index]
        if reward is None:
            scores: list[float] = []
            formats: list[float] = []
        elif source.benchmark is not None:
            if not batch.records:
                raise ValueError(f"{where}: benchmark source {source.label!r} needs the records in the batch "
                                 "(FamilyBatch.records)")
            scores = [source.benchmark.score(batch.records[p], text) for p, text in zip(prompt_index, responses)]
            formats = [format_reward(text) for text in responses]
        else:
            scores, formats = _grade_plain(reward, list(responses), [batch.answers[p] for p in prompt_index], ids,
                                           where)
        levels = batch.level.tolist() if isinstance(batch.level, torch.Tensor) else [-1] * len(batch.question_ids)
        questions = self._questions[idx]
        for k, (qid, text) in enumerate(zip(ids, responses)):
            q = questions.setdefault(qid, _Question(level=int(levels[prompt_index[k]])))
            q.responses.append(text)
            if scores:
                q.scores.append(scores[k])
                q.formats.append(formats[k])
        return [{"id": qid, "response": text} for qid, text in zip(ids, responses)]

    def gather(self) -> None:
        """Merge every rank's questions into every rank (a no-op on one process)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, [(s.name, q) for s, q in zip(self.sources, self._questions)])
        merged: list[dict[str, _Question]] = [{} for _ in self.sources]
        for part in parts:
            for k, (_, questions) in enumerate(part):
                if k >= len(merged):  # a loader only another rank knew of
                    self.source(k)
                    merged.append({})
                for qid, q in questions.items():
                    merged[k].setdefault(qid, q)
        self._questions = merged

    def results(self, *, graded: bool = True) -> list[SourceResult]:
        """Per-source results (call :meth:`gather` first under several ranks); ``graded=False`` skips metrics."""
        out = []
        for source, questions in zip(self.sources, self._questions):
            order = [r.id for r in source.records if r.id in questions]
            known = set(order)
            order += [qid for qid in questions if qid not in known]
            responses = {qid: questions[qid].responses for qid in order}
            scores = {qid: questions[qid].scores for qid in order}
            if graded and questions:
                metrics = _metrics(source, [questions[qid] for qid in order], scores)
                fmt: float | None = fmean(f for qid in order for f in questions[qid].formats)
            else:
                metrics, fmt = {}, None
            out.append(SourceResult(source, responses, scores, metrics, fmt))
        return out


def _grade_plain(reward: Reward, responses: list[str], answers: list[str], ids: list[str], where: str
                 ) -> tuple[list[float], list[float]]:
    graded = reward(responses, answers)
    acc = graded.accuracy.to(torch.float32)
    bad = ~torch.isfinite(acc) | ~torch.isfinite(graded.reward.to(torch.float32))
    if bool(bad.any()):
        qids = sorted({ids[i] for i in bad.nonzero().flatten().tolist()})
        raise ValueError(f"{where}: the reward returned NaN/inf for {int(bad.sum())} response(s) of questions "
                         f"{qids[:20]}{' ...' if len(qids) > 20 else ''}: fix the reward function; a score over "
                         "the remaining questions would be wrong")
    return acc.tolist(), graded.format.to(torch.float32).tolist()


def _metrics(source: EvalSource, questions: list[_Question], scores: dict[str, list[float]]) -> dict[str, float]:
    if source.benchmark is None:
        out = {"accuracy": fmean(s for q in questions for s in q.scores)}
        by_level: dict[int, list[float]] = {}
        for q in questions:
            if q.level >= 1:
                by_level.setdefault(q.level, []).extend(q.scores)
        out.update({f"accuracy_level{k}": fmean(v) for k, v in sorted(by_level.items())})
        # a split composed by the difficulty skew (data.skew): accuracy on its hard / easy / middle shares
        share = {r.id: r.meta["skew"] for r in source.records if "skew" in r.meta}
        by_share: dict[str, list[float]] = {}
        for qid, qscores in scores.items():
            if qid in share:
                by_share.setdefault(str(share[qid]), []).extend(qscores)
        out.update({f"accuracy_{k}": fmean(v) for k, v in sorted(by_share.items()) if v})
        return out
    evaluated = [r for r in source.records if r.id in scores]
    try:
        out = source.benchmark.aggregate(evaluated, scores)
    except ValueError as err:
        if len(evaluated) == len(source.records):
            raise
        # a partial pass (limit_*_batches, the sanity check) can split what the metrics group (WeMath)
        log.warning("%s: %d of %d questions evaluated, too few for the benchmark's metrics (%s); logging the "
                    "mean accuracy only", source.label, len(evaluated), len(source.records), err)
        out = {"accuracy": fmean(fmean(scores[r.id]) for r in evaluated)}
    return out


def log_values(prefix: str, results: Sequence[SourceResult]) -> dict[str, float]:
    """The scalars to log for a pass (see the module docstring for the keys)."""
    scored = [r for r in results if r.metrics]
    if len(results) == 1 and results[0].source.name == "":
        return {f"{prefix}/{k}": v for r in scored for k, v in _with_format(r).items()}
    out: dict[str, float] = {}
    if scored:
        out[f"{prefix}/accuracy"] = fmean(r.metrics["accuracy"] for r in scored)
    for r in scored:
        out.update({f"{prefix}/{r.source.label}/{k}": v for k, v in _with_format(r).items()})
    return out


def _with_format(result: SourceResult) -> dict[str, float]:
    """accuracy first, then format (today's order of val/accuracy, val/format), then the other metrics."""
    fmt = {} if result.format is None else {"format": result.format}
    return {"accuracy": result.metrics["accuracy"], **fmt, **result.metrics}


# ------------------------------------------------------------------------------------------------------ outputs
def _load_baseline(path: str | Path) -> tuple[dict[str, dict[str, float]], str]:
    """``{source label: metrics}`` of an earlier `test` run: its output folder or that folder's metrics.json."""
    p = Path(path)
    file = p / "metrics.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"eval_baseline {str(path)!r}: no metrics.json there (give the test/ folder of an "
                                "earlier `python -m diva_lightning test` run, or its metrics.json)")
    data = json.loads(file.read_text(encoding="utf-8"))
    sources = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(sources, dict):
        raise ValueError(f"eval_baseline {str(file)!r}: expected the metrics.json of a test run ({{'sources': ...}})")
    return {name: entry["metrics"] for name, entry in sources.items()}, str(data.get("policy") or file)


def write_test_outputs(results: Sequence[SourceResult], out_dir: str | Path, *, policy: str,
                       decoding: Mapping[str, Any], baseline: str | Path | None = None) -> dict[str, Path]:
    """Per source ``<label>.responses.jsonl`` (re-scorable by ``score``) and ``<label>.metrics.json`` (the
    ``score`` command's layout plus policy and decoding); ``metrics.json`` with every source; ``table1.md``,
    ``table1.csv``, ``table1.png`` with the baseline's metrics as a comparison row when given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    summary: dict[str, Any] = {"policy": policy, "decoding": dict(decoding), "sources": {}}
    for res in results:
        src = res.source
        label = src.label
        responses = write_responses(out / f"{label}.responses.jsonl", res.responses)
        entry = {
            "source": src.name, "benchmark": src.benchmark.name if src.benchmark else None, "data": src.path,
            "responses": str(responses), "questions": len(res.responses), "of_questions": len(src.records),
            "samples": res.samples, "protocol": PROTOCOL if src.benchmark else PLAIN_PROTOCOL, "policy": policy,
            "decoding": dict(decoding), "metrics": res.metrics, "format": res.format,
        }
        metrics_file = out / f"{label}.metrics.json"
        metrics_file.write_text(json.dumps(entry, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        summary["sources"][label] = entry
        written[f"{label}.responses"], written[f"{label}.metrics"] = responses, metrics_file
    written["metrics"] = out / "metrics.json"
    written["metrics"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = {r.source.label: r.metrics for r in results if r.metrics}
    if table:
        base, base_policy = _load_baseline(baseline) if baseline is not None else (None, "")
        headline = {r.source.label: r.source.benchmark.headline for r in results if r.source.benchmark}
        written.update(table1_report(table, out, baseline=base, headline=headline,
                                     label=policy, baseline_label=f"baseline: {base_policy}"))
    return written


def write_predictions(results: Sequence[SourceResult], out_dir: str | Path) -> dict[str, Path]:
    """``<label>.responses.jsonl`` per source: the lines ``score`` reads (several per id with num_samples > 1)."""
    return {r.source.label: write_responses(Path(out_dir) / f"{r.source.label}.responses.jsonl", r.responses)
            for r in results}


def decoding_of(sampling: Any) -> dict[str, Any]:
    """A `SamplingConfig` as a plain dict, with the mode spelled out (greedy, sampled, mean@k)."""
    d = asdict(sampling)
    greedy = d["temperature"] <= 0
    k = d["num_samples"]
    d["mode"] = "greedy" if greedy else (f"mean@{k}" if k > 1 else "sampled")
    return d


def headline_lines(results: Sequence[SourceResult]) -> list[str]:
    """One line per source: questions, samples and the headline metric (for the console)."""
    lines = []
    for r in results:
        if not r.metrics:
            continue
        key = r.source.benchmark.headline if r.source.benchmark else "accuracy"
        value = r.metrics.get(key, math.nan)
        lines.append(f"  {r.source.label:<16} {key:<12} {100 * value:6.2f}%  ({len(r.responses)} of "
                     f"{len(r.source.records) or len(r.responses)} questions, {r.samples} responses)")
    return lines
