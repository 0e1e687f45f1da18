"""The `score` command end to end (a real subprocess), its id checks, and the responses file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diva_lightning.evaluation import read_responses, write_responses
from diva_lightning.evaluation.score import score_main

from .conftest import box, write_mathvista, write_wemath

REPO = Path(__file__).resolve().parents[2]

# MathVista fixture (conftest): per-row sample scores and means
RESPONSES = [
    ("1", box("14")), ("1", box("15")),                   # 1/2
    ("2", box("B")),                                      # 1
    ("3", box("1.5")),                                    # 1
    ("4", "I think it is 0.25 but will not box it."),     # 0
    ("5", box("[2007, 2008]")), ("5", box("[2007, 2008]")), ("5", box("2008")),  # 2/3
    ("6", box("1,000")),                                  # 1
]
ACCURACY = (0.5 + 1 + 1 + 0 + 2 / 3 + 1) / 6  # = 25/36


@pytest.mark.parametrize("how", [pytest.param("subprocess", marks=pytest.mark.slow), "in-process"])
def test_score_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    """`python -m diva_lightning score` (a real process; ~10 s of imports, so slow) and the same through
    `cli.main` in this process (fast tier)."""
    data = write_mathvista(tmp_path / "MathVista")
    responses = write_responses(tmp_path / "run" / "mathvista.responses.jsonl", RESPONSES)
    out = tmp_path / "run" / "metrics.json"
    args = ["score", "--benchmark", "mathvista", "--data", str(data), "--responses", str(responses),
            "--output", str(out)]
    if how == "subprocess":
        done = subprocess.run([sys.executable, "-m", "diva_lightning", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        stdout = done.stdout
    else:
        from diva_lightning.cli import main

        main(args)
        stdout = capsys.readouterr().out
    assert f"mathvista: loaded 6 question(s) from {data} (none skipped)" in stdout
    assert f"responses: 9 line(s) for 6 id(s) from {responses}" in stdout
    assert "MathVista: 6 question(s), 9 scored sample(s)" in stdout
    assert re.search(r"^accuracy +69\.44%$", stdout, re.MULTILINE), stdout
    payload = json.loads(out.read_text())
    assert payload["metrics"] == pytest.approx({"accuracy": ACCURACY})
    assert (payload["questions"], payload["samples"], payload["missing_ids"], payload["unknown_ids"]) == (6, 9, [], [])


def test_missing_and_unknown_ids_are_errors_unless_a_flag_counts_them(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = write_mathvista(tmp_path)
    partial = [(i, r) for i, r in RESPONSES if i not in ("4", "6")] + [("77", box("1"))]
    responses = write_responses(tmp_path / "r.jsonl", partial)
    args = ["--benchmark", "mathvista", "--data", str(data), "--responses", str(responses)]
    with pytest.raises(SystemExit) as exit_info:
        score_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "2 question(s) have no response (--missing-as-wrong scores them 0): '4', '6'" in err
    assert "1 response id(s) are not questions of the data file (--ignore-unknown leaves them out): '77'" in err

    score_main([*args, "--missing-as-wrong", "--ignore-unknown"])
    out = capsys.readouterr().out
    assert "2 question(s) without a response scored 0 (--missing-as-wrong)" in out
    assert "1 response id(s) not in the data left out (--ignore-unknown)" in out
    payload = json.loads((tmp_path / "r.metrics.json").read_text())  # default: next to the responses
    assert payload["metrics"]["accuracy"] == pytest.approx((0.5 + 1 + 1 + 0 + 2 / 3 + 0) / 6)
    assert (payload["missing_ids"], payload["unknown_ids"], payload["samples"]) == (["4", "6"], ["77"], 7)


def test_bad_data_rows_fail_or_are_skipped_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = json.loads(write_wemath(tmp_path).read_text())
    rows[0]["answer"] = "Z"  # composite 2steps_1 loses a row, so its other two rows go too
    (tmp_path / "testmini.json").write_text(json.dumps(rows))
    responses = write_responses(tmp_path / "r.jsonl", [(r["ID"] + "|" + r["key"], box("B")) for r in rows[3:]])
    args = ["--benchmark", "wemath", "--data", str(tmp_path / "testmini.json"), "--responses", str(responses)]
    with pytest.raises(SystemExit):
        score_main(args)
    assert "row 1: field 'answer': 'Z' is not one of the option letters A, B, C, D, E" in capsys.readouterr().err
    score_main([*args, "--on-error", "skip", "--output", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert "wemath: loaded 4 question(s)" in out
    assert "skipped 3 row(s) (bad field 'key': 2, bad field 'answer': 1)" in out
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert (metrics["accuracy"], metrics["score_strict"], metrics["CM_strict"]) == (1.0, 1.0, 1.0)


def test_responses_file_round_trip_and_line_errors(tmp_path: Path) -> None:
    path = write_responses(tmp_path / "r.jsonl", {"a": ["x", "y"], "b": ["z"]})
    assert read_responses(path) == {"a": ["x", "y"], "b": ["z"]}
    path.write_text('{"id": 5, "response": "ok", "sample": 0}\n\n{"id": "b"}\nnot json\n')
    with pytest.raises(ValueError) as err:
        read_responses(path)
    assert str(err.value).splitlines()[1:] == [
        f'{path}:line 3: expected {{"id": str, "response": str}}, got {{"id": "b"}}',
        f"{path}:line 4: invalid JSON: Expecting value at column 1",
    ]
