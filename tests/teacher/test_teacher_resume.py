"""The output survives: a torn or half-written batch is cut and redone, and resuming equals not stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from diva_lightning.data.schema import load_records_with_report
from diva_lightning.data.world import generate_world, write_world
from diva_lightning.teacher import AugmentSettings, WorldTeacher
from diva_lightning.teacher.augment import augment_main, run_augment
from diva_lightning.teacher.writer import AugmentWriter

REPO = Path(__file__).resolve().parents[2]


def _plain_file(tmp: Path, n: int) -> Path:
    records = [replace(r, variants=[], think_steps=[]) for r in generate_world(n, seed=7, split="train")]
    return write_world(records, tmp, "plain")


def _rows(path: Path) -> list[dict[str, Any]]:
    """Output rows without the wall-clock timestamp and the image folder (named after the file)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row["augment"].pop("time")
        row["images"] = [Path(p).name for p in row["images"]]
    return rows


def _run(data: Path, out: Path, limit: int | None = None) -> AugmentWriter:
    records, _ = load_records_with_report(data)
    return run_augment(records[:limit], data.parent, out, WorldTeacher(), AugmentSettings(k=3), seed=1,
                       batch_size=3, progress=False, log=lambda _: None)


def test_output_loads_back_as_records_with_images_copied(tmp_path: Path) -> None:
    data = _plain_file(tmp_path / "in", 5)
    out = tmp_path / "out" / "aug.jsonl"
    _run(data, out)
    source, _ = load_records_with_report(data, inline_images=True)
    loaded, report = load_records_with_report(out, inline_images=True)
    assert report.skipped == 0 and [r.id for r in loaded] == [r.id for r in source]
    for before, after in zip(source, loaded):
        assert after.images == before.images  # same bytes, now in out/aug_images/
        assert len(after.variants) == 3 and after.problem == before.problem and after.answer == before.answer
        assert after.meta["augment"]["teacher"] == "diva_lightning.teacher.WorldTeacher"
        assert after.meta["augment"]["prompt_version"] == "diva-teacher-v1"
        assert after.meta["family"] == before.meta["family"]  # the input's own meta is kept
    assert sorted(p.name for p in (tmp_path / "out" / "aug_images").iterdir())[0] == "000001_0.png"


def test_resume_after_a_torn_batch_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    data = _plain_file(tmp_path, 10)
    whole = tmp_path / "whole.jsonl"
    _run(data, whole)
    lines = whole.read_bytes().splitlines(keepends=True)
    # a crash while writing batch 2 (rows 4-6): rows 4 and 5 made it, row 6 is torn in half
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    writer = AugmentWriter(cut)
    assert writer.dropped == 3 and list(writer.provenance) == [json.loads(x)["id"] for x in lines[:3]]
    assert cut.read_bytes() == b"".join(lines[:3])  # the file itself was cut back
    _run(data, cut)
    assert _rows(cut) == _rows(whole)


def test_resume_skips_finished_ids_and_a_limit_is_a_prefix(tmp_path: Path) -> None:
    """A trial with --limit (a multiple of the batch size: batches are fixed slices) grows into the full run."""
    data = _plain_file(tmp_path, 10)
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    _run(data, whole)
    first = _run(data, part, limit=6)
    assert len(first.provenance) == 6
    before = part.read_text()
    _run(data, part)
    assert part.read_text().startswith(before)  # appended, earlier rows untouched
    assert _rows(part) == _rows(whole)


def test_resume_refuses_to_mix_runs_and_foreign_files(tmp_path: Path) -> None:
    data = _plain_file(tmp_path, 3)
    out = tmp_path / "out.jsonl"
    _run(data, out)
    records, _ = load_records_with_report(data)
    with pytest.raises(ValueError, match=r"different run(.|\n)*settings: file"):
        run_augment(records, data.parent, out, WorldTeacher(), AugmentSettings(k=2), seed=1, progress=False)
    with pytest.raises(ValueError, match="line 1 is not an augment output row"):
        AugmentWriter(data)
    with pytest.raises(ValueError, match="must be a .jsonl"):
        AugmentWriter(tmp_path / "out.parquet")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_policy_dir: str, tmp_path: Path) -> None:
    """A real `python -m diva_lightning augment` with the HF teacher, SIGKILLed after its first batch."""
    data = _plain_file(tmp_path, 8)
    args = ["--data", str(data), "--teacher", "HFTeacher", "--teacher.model", tiny_policy_dir,
            "--teacher.max_new_tokens", "24", "--k", "2", "--batch-size", "2", "--seed", "3", "--no-progress"]
    killed = tmp_path / "killed.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "diva_lightning", "augment", *args, "--output", str(killed)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (killed.exists() and killed.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
            assert time.monotonic() < deadline, "no batch written in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n_before = len(AugmentWriter(killed).provenance)
    assert 2 <= n_before < 8  # killed mid-run, whole batches only
    augment_main([*args, "--output", str(killed)])
    whole = tmp_path / "whole.jsonl"
    augment_main([*args, "--output", str(whole)])
    assert _rows(killed) == _rows(whole)
