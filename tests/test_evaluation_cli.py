"""`test`, `predict` and multi-source validation through the real CLI, on benchmark fixtures in their native formats.

The policy that answers "B" to everything (`tests/helpers/policies.py`, the tiny policy taught in seconds) makes
the scores hand-workable: MathVista's fixture has one question whose choice (B) is right (1/6), WeMath's answers are
all B (every row and composite problem right), MMK12's one B of four (1/4).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diva_lightning.cli import run_cli
from diva_lightning.data.schema import QuestionRecord, write_records
from diva_lightning.evaluation.score import score_main
from tests.benchmarks.conftest import write_mathvista, write_mmk12, write_wemath

REPO = Path(__file__).resolve().parents[1]
FULL = REPO / "experiments/full.yaml"
TABLE1 = REPO / "experiments/eval/table1.yaml"
BENCHMARKS = ("mathvista", "mathverse", "mathvision", "olympiadbench", "wemath", "mmk12")


@pytest.fixture(scope="module")
def always_b_dir(tiny_policy_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.helpers.policies import train_constant_policy

    return str(train_constant_policy(tiny_policy_dir, tmp_path_factory.mktemp("always_b")))


def _bench(root: Path, *names: str) -> dict[str, Path]:
    writers = {"mathvista": write_mathvista, "wemath": write_wemath, "mmk12": write_mmk12}
    out = {}
    for name in names:
        (root / name).mkdir(parents=True)
        out[name] = writers[name](root / name)
    return out


def _sources(files: dict[str, Path]) -> str:
    return json.dumps({name: {"path": str(path), "benchmark": name} for name, path in files.items()})


def eval_args(command: str, policy: str, root: Path, *extra: str) -> list[str]:
    return [command, "--config", str(FULL), "--config", str(TABLE1), "--model.init_args.policy", policy,
            "--model.init_args.val_sampling.max_new_tokens", "12", "--data.init_args.val_batch_size", "4",
            "--trainer.logger.init_args.save_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--build_base_policy", "false", *extra]


def _rescore(name: str, data: Path, responses: Path, out: Path) -> dict[str, float]:
    score_main(["--benchmark", name, "--data", str(data), "--responses", str(responses), "--output", str(out)])
    return json.loads(out.read_text())["metrics"]


# --------------------------------------------------------------------------------------------------------- config
def test_table1_config_sets_the_papers_decoding_and_six_benchmarks(tmp_path: Path) -> None:
    cli = run_cli(["--config", str(FULL), "--config", str(TABLE1), "--trainer.logger.init_args.save_dir",
                   str(tmp_path)], run=False)
    sources = cli.datamodule.test_sources
    assert list(sources) == list(BENCHMARKS) and all(sources[n].benchmark == n for n in BENCHMARKS)
    sampling = cli.model.val_sampling
    assert (sampling.temperature, sampling.top_p, sampling.num_samples) == (0.6, 0.95, 1)
    # the training config alone keeps greedy validation: the overlay is what switches decoding
    full = run_cli(["--config", str(FULL), "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
    assert full.model.val_sampling.temperature == 0.0
    for line in TABLE1.read_text().splitlines():
        key, _, value = line.strip().partition(":")
        if value.strip() and not line.strip().startswith("#"):
            assert "#" in value, f"table1.yaml: key {key!r} has no comment"


# ---------------------------------------------------------------------------------------------------------- test
@pytest.mark.slow
def test_table1_over_two_benchmarks_with_a_baseline_row(tiny_policy_dir: str, always_b_dir: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    files = _bench(tmp_path / "data", "mathvista", "wemath")
    base = run_cli(eval_args("test", tiny_policy_dir, tmp_path / "base", "--data.init_args.test_source",
                             _sources(files)))
    base_dir = Path(base.trainer.log_dir) / "test"
    cli = run_cli(eval_args("test", always_b_dir, tmp_path / "trained", "--data.init_args.test_source",
                            _sources(files), "--eval_baseline", str(base_dir)))
    out = Path(cli.trainer.log_dir) / "test"
    printed = capsys.readouterr().out
    assert f"outputs in {out}/" in printed and "table1.md" in printed

    summary = json.loads((out / "metrics.json").read_text())
    assert summary["decoding"]["temperature"] == 0.6 and summary["decoding"]["top_p"] == 0.95
    mathvista, wemath = summary["sources"]["mathvista"]["metrics"], summary["sources"]["wemath"]["metrics"]
    assert mathvista == {"accuracy": pytest.approx(1 / 6)}  # question 2: (B) perpendicular
    assert wemath["accuracy"] == 1.0 and wemath["score_strict"] == 1.0 and wemath["CM_strict"] == 1.0
    for name, data in files.items():  # `score` on the written responses gives the same metrics
        assert _rescore(name, data, out / f"{name}.responses.jsonl", tmp_path / f"{name}.json") == \
            summary["sources"][name]["metrics"]
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert logged["test/mathvista/accuracy"] == pytest.approx(1 / 6)
    assert logged["test/wemath/score_strict"] == 1.0
    assert logged["test/accuracy"] == pytest.approx((1 / 6 + 1) / 2)

    table = (out / "table1.md").read_text().splitlines()
    assert "| model | MathVista (accuracy) | WeMath (score_strict) | Avg. |" in table
    assert f"| baseline: {tiny_policy_dir} | 0.0 | 0.0 | 0.0 |" in table
    assert f"| {always_b_dir} | 16.7 | 100.0 | 58.3 |" in table
    assert "| Δ | +16.7 | +100.0 | +58.3 |" in table
    with open(out / "table1.csv") as f:
        models = {row["model"] for row in csv.DictReader(f)}
    assert models == {always_b_dir, f"baseline: {tiny_policy_dir}"}
    png = (out / "table1.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < 200_000


# ------------------------------------------------------------------------------------------------------- predict
@pytest.mark.slow
def test_predict_writes_responses_that_score_reads(always_b_dir: str, tmp_path: Path) -> None:
    files = _bench(tmp_path / "data", "mmk12")
    records = [QuestionRecord(id=f"q{i}", problem=f"What is {i} + 1?", answer=str(i + 1)) for i in range(3)]
    mine = write_records(records, tmp_path / "mine.jsonl")
    with mine.open("a") as f:
        f.write(json.dumps({"id": "q9", "problem": "What is it?"}) + "\n")  # no answer: skipped, counted
    sources = {"mmk12": {"path": str(files["mmk12"]), "benchmark": "mmk12"}, "mine": {"path": str(mine)}}
    args = eval_args("predict", always_b_dir, tmp_path / "runs", "--data.init_args.predict_source",
                     json.dumps(sources), "--data.init_args.on_error", "skip",
                     "--model.init_args.val_sampling.num_samples", "2")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "diva_lightning", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    # what was loaded from where, and what was skipped, by reason
    assert f"DIVA data (predict/mmk12): {files['mmk12']}: loaded 4 of 4 rows (4 images checked)" in console
    assert f"DIVA data (predict/mine): {mine}: loaded 3 of 4 rows (0 images checked); skipped 1 (answer: 1)" in console
    written = next((tmp_path / "runs").glob("table1/version_*/predict/mmk12.responses.jsonl"))
    assert f"mmk12: 8 response(s) for 4 question(s) -> {written}" in console
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == ["1", "1", "2", "2", "3", "3", "4", "4"]
    assert _rescore("mmk12", files["mmk12"], written, tmp_path / "m.json")["accuracy"] == 0.25
    assert len((written.parent / "mine.responses.jsonl").read_text().splitlines()) == 6


# ------------------------------------------------------------------------------------------------ fit, validation
def test_fit_validates_each_named_source_by_its_rule(tiny_policy_dir: str, tmp_path: Path) -> None:
    from tests.helpers import rewards
    from tests.test_module import small_args

    files = _bench(tmp_path / "data", "mmk12")
    sources = {"world": {"path": "world"}, "mmk12": {"path": str(files["mmk12"]), "benchmark": "mmk12"}}
    args = small_args(tiny_policy_dir, tmp_path, "--data.init_args.val_source", json.dumps(sources), steps=1)
    args[args.index("tests.helpers.rewards.contains_digit")] = "tests.helpers.rewards.counting_contains_digit"
    args[args.index("--trainer.limit_val_batches") + 1] = "1.0"
    args[args.index("--trainer.val_check_interval") + 1] = "1"
    args += ["--model.init_args.val_sampling.max_new_tokens", "6"]
    rewards.GRADED.clear()
    cli = run_cli(args)
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        row = next(r for r in csv.DictReader(f) if r.get("val/accuracy"))
    world, mmk12 = float(row["val/world/accuracy"]), float(row["val/mmk12/accuracy"])
    # the reward graded the training round (2 questions x 2 prompts x 3) and the world's 8 questions (greedy: one
    # response each), not the benchmark's: the validation responses are the last 8
    assert len(rewards.GRADED) == 12 + 8
    graded = rewards.GRADED[-8:]
    assert world == pytest.approx(sum(map(rewards.contains_digit, graded, [""] * 8)) / 8)
    assert float(row["val/accuracy"]) == pytest.approx((world + mmk12) / 2)
    assert {"val/mmk12/accuracy/math", "val/mmk12/format", "val/world/format"} <= set(row)


# ------------------------------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_test_under_two_process_ddp_gathers_every_question_once(always_b_dir: str, tmp_path: Path) -> None:
    """Batch size 1 over 2 ranks: MathVista's 6 questions split 3/3, WeMath's 7 split 4/3 (rank 1 runs a padding
    batch to stay in step). MathVista's one right answer (question 2) is on rank 1: rank 0 alone would log 0."""
    files = _bench(tmp_path / "data", "mathvista", "wemath")
    args = eval_args("test", always_b_dir, tmp_path / "runs", "--data.init_args.test_source", _sources(files),
                     "--data.init_args.val_batch_size", "1", "--trainer.accelerator", "cpu",
                     "--trainer.devices", "2", "--trainer.strategy", "ddp")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "diva_lightning", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=480)
    assert done.returncode == 0, done.stderr[-3000:]
    out = next((tmp_path / "runs").glob("table1/version_*/test"))
    for name, count in (("mathvista", 6), ("wemath", 7)):
        ids = [json.loads(line)["id"] for line in (out / f"{name}.responses.jsonl").read_text().splitlines()]
        assert len(ids) == len(set(ids)) == count, name
    metrics = json.loads((out / "metrics.json").read_text())["sources"]
    assert metrics["mathvista"]["metrics"]["accuracy"] == pytest.approx(1 / 6)
    assert metrics["wemath"]["metrics"]["score_strict"] == 1.0
    with open(out.parent / "metrics.csv") as f:
        row = next(r for r in csv.DictReader(f) if r.get("test/accuracy"))
    assert float(row["test/mathvista/accuracy"]) == pytest.approx(1 / 6)
    assert float(row["test/accuracy"]) == pytest.approx((1 / 6 + 1) / 2)
