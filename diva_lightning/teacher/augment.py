"""``python -m diva_lightning augment``: fill ``variants`` and ``think_steps`` with a local teacher.

    python -m diva_lightning augment --data questions.jsonl --output augmented.jsonl --teacher CHECKPOINT
    python -m diva_lightning augment --data world.jsonl --output out.jsonl --teacher WorldTeacher

Reads a record file (our JSONL/parquet or the authors' parquet), asks the teacher for paraphrases and
think steps batch by batch, keeps what passes the checks (``teacher.checks``), and appends each batch to
the output with its provenance (``augment`` field: teacher, prompt version, sampling, settings, seed,
time, status, kept/rejected counts). Re-running with the same output resumes: finished ids are skipped,
and batches are fixed slices of the selected records with seeds derived from their ids, so a resumed
run writes what an uninterrupted one would have (up to the timestamps). Ends with the kept/rejected table.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
from tqdm import tqdm

from diva_lightning.core.choices import AugmentTask, OnError
from diva_lightning.data.schema import QuestionRecord, decode_image, load_records_with_report
from diva_lightning.teacher.base import Teacher
from diva_lightning.teacher.pipeline import TASKS, AugmentSettings, augment_batch, derive_seed
from diva_lightning.teacher.prompts import PROMPT_VERSION
from diva_lightning.teacher.report import format_table
from diva_lightning.teacher.writer import AugmentWriter

# provenance fields that must agree between the rows already in an output and a run that appends to it
_RUN_KEYS = ("teacher", "teacher_class", "prompt_version", "sampling", "settings", "seed")


def build_parser() -> ArgumentParser:
    settings = AugmentSettings()  # the settings' defaults, declared once there
    p = ArgumentParser(prog="python -m diva_lightning augment", default_env=False,
                       description="Fill variants and think_steps of a record file with a local teacher "
                                   "(docs/teacher.md).")
    p.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options.")
    p.add_argument("--data", type=str, required=True, help="Input records (.jsonl or .parquet).")
    p.add_argument("--output", type=str, required=True,
                   help="Output .jsonl (appended per batch; an existing one is resumed).")
    p.add_argument("--teacher", type=Teacher | str | None, default=None,
                   help="A checkpoint path or hub id (the HF teacher), or a teacher class_path: "
                        "diva_lightning.teacher.HFTeacher, VLLMTeacher, WorldTeacher.")
    p.add_argument("--k", type=int, default=settings.k, help="Paraphrases wanted per question.")
    p.add_argument("--only", type=AugmentTask | None, default=None,
                   help="Make only 'variants' or only 'think_steps' (default: both).")
    p.add_argument("--attempts", type=int, default=settings.attempts,
                   help="Rounds of asking; later rounds ask only for what is still missing.")
    p.add_argument("--min-steps", type=int, default=settings.min_steps, help="Fewest think steps accepted.")
    p.add_argument("--max-steps", type=int, default=settings.max_steps, help="Most think steps accepted.")
    p.add_argument("--max-similarity", type=float, default=settings.max_similarity,
                   help="Reject a paraphrase at least this similar (word edit similarity) to the problem "
                        "or to a kept paraphrase.")
    p.add_argument("--verify-paraphrases", action=ActionYesNo(no_prefix="no-"), default=settings.verify_paraphrases,
                   help="The teacher solves each paraphrase; kept only if its answer grades correct.")
    p.add_argument("--batch-size", type=int, default=8, help="Questions per batch (the unit of output and resume).")
    p.add_argument("--seed", type=int, default=0, help="Seed of all sampling (per batch, derived with the ids).")
    p.add_argument("--limit", type=int | None, default=None, help="Only the first N selected questions.")
    p.add_argument("--ids", type=str | None, default=None,
                   help="Only these ids: comma-separated, or a file with one id per line.")
    p.add_argument("--on-error", type=OnError, default="raise",
                   help="Bad input rows: fail listing all problems (raise) or skip and count them (skip).")
    p.add_argument("--progress", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="Show a progress bar on stderr (--no-progress: none).")
    return p


def select(records: list[QuestionRecord], ids: str | None, limit: int | None) -> list[QuestionRecord]:
    """The records to augment, in file order: those named by ``ids`` (all must exist), at most ``limit``."""
    if ids is not None:
        path = Path(ids)
        wanted = ([line.strip() for line in path.read_text().splitlines()] if path.is_file()
                  else [i.strip() for i in ids.split(",")])
        wanted_set = {i for i in wanted if i}
        unknown = sorted(wanted_set - {r.id for r in records})
        if unknown:
            raise ValueError(f"--ids: {len(unknown)} id(s) not in the data: {', '.join(unknown[:20])}")
        records = [r for r in records if r.id in wanted_set]
    if limit is not None:
        if limit < 0:
            raise ValueError(f"--limit must be >= 0, got {limit}")
        records = records[:limit]
    return records


def _run_fields(teacher: Teacher, settings: AugmentSettings, seed: int) -> dict[str, Any]:
    return {"teacher": teacher.teacher_id, "teacher_class": f"{type(teacher).__module__}.{type(teacher).__name__}",
            "prompt_version": PROMPT_VERSION, "sampling": teacher.settings(), "settings": settings.as_dict(),
            "seed": seed}


def _check_compatible(writer: AugmentWriter, run: dict[str, Any]) -> None:
    if not writer.provenance:
        return
    first_id, first = next(iter(writer.provenance.items()))
    diff = [k for k in _RUN_KEYS if first.get(k) != run[k]]
    if diff:
        lines = [f"  {k}: file {first.get(k)!r} vs this run {run[k]!r}" for k in diff]
        raise ValueError(f"{writer.path} was written by a different run (row {first_id!r}); resuming would mix "
                         "them. Use a new --output or the same settings:\n" + "\n".join(lines))


def run_augment(records: Sequence[QuestionRecord], source_dir: str | Path, output: str | Path, teacher: Teacher,
                settings: AugmentSettings, *, seed: int = 0, batch_size: int = 8, progress: bool = True,
                log: Callable[[str], object] = print) -> AugmentWriter:
    """Augment ``records`` into ``output`` (resuming it); returns the writer (its ``provenance`` has every row)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    writer = AugmentWriter(output)
    if writer.dropped:
        log(f"[augment] {output}: cut {writer.dropped} row(s) of an unfinished batch; they are redone")
    run = _run_fields(teacher, settings, seed)
    _check_compatible(writer, run)
    done = set(writer.provenance)
    batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
    todo = [[r for r in b if r.id not in done] for b in batches]
    n_todo = sum(len(b) for b in todo)
    if len(records) > n_todo:
        log(f"[augment] resuming {output}: {len(records) - n_todo} of {len(records)} selected questions done")
    bar = tqdm(total=len(records), initial=len(records) - n_todo, unit="q", desc="augment", file=sys.stderr,
               disable=not progress, dynamic_ncols=True, smoothing=0.1)
    start = time.perf_counter()
    kept_var = kept_steps = 0
    for batch in (b for b in todo if b):
        batch_seed = derive_seed(seed, *(r.id for r in batch))
        images = [[decode_image(ref, source_dir) for ref in r.images] for r in batch]
        results = augment_batch(teacher, batch, images, settings, seed=batch_seed)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        provenance = [{**run, "batch_seed": batch_seed, "batch_rows": len(batch), "time": stamp,
                       "status": res.status(settings), "counts": res.counts()} for res in results]
        writer.append([res.augmented() for res in results], provenance, source_dir)
        kept_var += sum(len(res.variants) for res in results)
        kept_steps += sum(res.think_steps is not None for res in results)
        bar.update(len(batch))
        bar.set_postfix(variants=kept_var, steps=kept_steps, refresh=False)
    bar.close()
    elapsed = time.perf_counter() - start
    if n_todo:
        log(f"[augment] {n_todo} question(s) in {elapsed:.1f} s ({elapsed / n_todo:.3f} s/question) "
            f"with {run['teacher']}")
    return writer


def resolve_teacher(teacher: Teacher | str) -> Teacher:
    """``--teacher``'s value: a teacher component as given, or a checkpoint path / hub id for the HF teacher."""
    if isinstance(teacher, Teacher):
        return teacher
    from diva_lightning.teacher.hf import HFTeacher

    return HFTeacher(teacher)


def augment_main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m diva_lightning augment`` (see the module docstring and ``--help``)."""
    parser = build_parser()
    cfg = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if cfg.teacher is None:
        parser.error("choose a teacher: --teacher CHECKPOINT (HF generate), or --teacher WorldTeacher for the "
                     "embedded world, or a class_path (see --help)")
    settings = AugmentSettings(k=cfg.k, attempts=cfg.attempts, min_steps=cfg.min_steps, max_steps=cfg.max_steps,
                               max_similarity=cfg.max_similarity, verify_paraphrases=cfg.verify_paraphrases,
                               tasks=(cfg.only,) if cfg.only else TASKS)
    records, report = load_records_with_report(cfg.data, on_error=cfg.on_error)
    if report.skipped:
        print(f"[augment] {cfg.data}: skipped {report.skipped} bad row(s) of {report.rows}", flush=True)
    records = select(records, cfg.ids, cfg.limit)
    teacher = resolve_teacher(parser.instantiate(cfg).teacher)
    writer = run_augment(records, Path(cfg.data).parent, cfg.output, teacher, settings, seed=cfg.seed,
                         batch_size=cfg.batch_size, progress=cfg.progress)
    print(f"\n[augment] {writer.path}: {len(writer.provenance)} rows\n{format_table(writer.provenance)}", flush=True)
