"""The sweep end to end with real `fit` subprocesses on the untrained tiny policy (slow: each cell is a fit).

- every row really switches its component off: on the resolved config.yaml the CLI wrote into the run folder,
  and on what the run logged (metrics.csv columns, and each step's advantages recomputed from a trace);
- a second invocation on the finished study trains nothing and only rewrites the report;
- two workers on one SQLite file split the cells, none run twice;
- a worker SIGKILLed mid-cell is replaced by a restarted one that completes the matrix.
"""

from __future__ import annotations

import collections
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from diva_lightning.core.advantage import diva_advantages
from sweeps._common import REPO
from sweeps.claim import open_storage

pytestmark = pytest.mark.slow
ABLATE = str(REPO / "sweeps" / "ablate.py")


def tiny(policy: str) -> list[str]:
    """Small-budget overrides for every fit (the row's own G and V are kept: they are what is ablated)."""
    sets = [f"--model.init_args.policy={policy}", "--build_base_policy=false",
            # 2 questions seen every step: by step 2 their difficulty has moved, so variants carry other labels
            "--data.init_args.questions_per_step=2", "--data.init_args.world.train_size=2",
            "--data.init_args.world.val_size=4", "--data.init_args.val_batch_size=4",
            "--model.init_args.train_sampling.max_new_tokens=8", "--model.init_args.val_sampling.max_new_tokens=8",
            "--model.init_args.reward.init_args.accuracy_fn=tests.sweeps.rewards.code_sum_mod4",
            "--trainer.callbacks+=tests.sweeps.trace.AdvantageTrace"]
    return [f"--set={s}" for s in sets]


def ablate(out: Path, policy: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, ABLATE, "--out", str(out), *args, *tiny(policy)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 420) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(f"sqlite:///{out / 'study.db'}")
    return optuna.load_study(study_name="diva-ablate", storage=storage).get_trials()


def complete_cells(out: Path) -> collections.Counter[tuple[str, int]]:
    return collections.Counter((t.params["row"], t.params["seed"]) for t in trials(out)
                               if t.state == TrialState.COMPLETE)


def _run_dir(out: Path, row: str) -> Path:
    (d,) = (out / "runs" / row).iterdir()
    return d


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_rows_switch_off_their_component_and_rerun_only_reports(tiny_policy_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    log = finish(ablate(out, tiny_policy_dir, "--seeds", "0", "--steps", "3", "--val-every", "3"))
    assert "[ablate] 6/6 done" in log
    cfg = {row: yaml.safe_load((_run_dir(out, row) / "config.yaml").read_text()) for row in
           ("full", "no_variants", "no_difficulty_weighting", "no_rrb", "no_gl_balance", "grpo")}
    adv = {row: c["model"]["init_args"]["advantage"] for row, c in cfg.items()}
    nvar = {row: c["data"]["init_args"]["num_variants"] for row, c in cfg.items()}
    assert (nvar["full"], nvar["no_variants"], nvar["grpo"]) == (1, 0, 0)
    assert adv["full"]["init_args"] | {} == adv["no_variants"]["init_args"]  # only the data changed
    assert adv["no_difficulty_weighting"]["init_args"]["difficulty_weighting"] is False
    assert adv["no_rrb"]["init_args"]["rrb"] is None
    assert adv["no_gl_balance"]["init_args"]["batch_norm"] is False
    assert adv["grpo"]["class_path"].endswith("GRPOAdvantage")
    assert not any("DifficultyCallback" in c["class_path"] for c in cfg["grpo"]["trainer"]["callbacks"])

    # Logged evidence. GRPO tracks no difficulty; without variants a family is its prompt, so the family and
    # prompt zero-spread rates coincide on every step and no family is ever rescued by a variant.
    assert not any(k.startswith("difficulty/") for k in _metrics(_run_dir(out, "grpo"))[0])
    assert any(k.startswith("difficulty/hist_") for k in _metrics(_run_dir(out, "full"))[0])
    for row in ("no_variants", "grpo"):
        steps = [r for r in _metrics(_run_dir(out, row)) if r.get("frac_reward_zero_std")]
        assert len(steps) == 3
        assert all(r["frac_family_zero_std"] == r["frac_reward_zero_std"] for r in steps)
        assert all(float(r.get("variant_rescue_rate") or 0) == 0 for r in steps)
    # The advantage rows: each step's logged advantages equal the estimator under the resolved arguments, and
    # differ from what the switched-on component would have given on the same rewards (else the test proves nothing).
    for row, key, on_value in (("no_rrb", "rrb", "range"), ("no_gl_balance", "batch_norm", True),
                               ("no_difficulty_weighting", "difficulty_weighting", True)):
        kwargs = {k: v for k, v in adv[row]["init_args"].items()}
        trace = torch.load(_run_dir(out, row) / "trace.pt")
        assert len(trace) == 3
        differs = False
        for s in trace:
            inputs = (s["rewards"], s["prompt_ids"], s["family_ids"], s["difficulty"])
            torch.testing.assert_close(diva_advantages(*inputs, **kwargs).float(), s["advantages"])
            differs |= not torch.allclose(diva_advantages(*inputs, **(kwargs | {key: on_value})).float(),
                                          s["advantages"])
        assert differs, f"{row}: the trace cannot tell {key} on from off"

    # Second invocation: no fit, same trials, report rewritten.
    before = {p: p.stat().st_mtime for p in (out / "runs").rglob("metrics.csv")}
    report = out / "report.md"
    stamp = report.stat().st_mtime
    time.sleep(0.05)
    log2 = finish(ablate(out, tiny_policy_dir, "--seeds", "0", "--steps", "3", "--val-every", "3"), timeout=120)
    assert "[ablate] start" not in log2 and "6/6 done" in log2
    assert {p: p.stat().st_mtime for p in (out / "runs").rglob("metrics.csv")} == before
    assert report.stat().st_mtime > stamp and len(trials(out)) == 6


def test_two_workers_split_cells_without_repeats(tiny_policy_dir: str, tmp_path: Path) -> None:
    out, args = tmp_path / "sweep", ["--rows", "full", "grpo", "--seeds", "0", "1", "--steps", "1",
                                     "--val-every", "1", "--poll", "0.5"]
    procs = [ablate(out, tiny_policy_dir, *args, "--no-report") for _ in range(2)]
    logs = [finish(p) for p in procs]
    assert complete_cells(out) == collections.Counter({(r, s): 1 for r in ("full", "grpo") for s in (0, 1)})
    assert len(trials(out)) == 4  # no duplicate, failed or retried trial
    assert len(list((out / "logs").iterdir())) == 4  # four fits in all
    assert all("[ablate] start" in log for log in logs)  # both workers ran cells


def test_killed_worker_is_replaced_and_the_matrix_completes(tiny_policy_dir: str, tmp_path: Path) -> None:
    out, args = tmp_path / "sweep", ["--rows", "full", "--seeds", "0", "1", "--steps", "1", "--val-every", "1",
                                     "--heartbeat-interval", "1", "--grace-period", "4", "--poll", "0.5"]
    first = ablate(out, tiny_policy_dir, *args, "--no-report")
    deadline = time.monotonic() + 120
    while not (out / "logs").exists() or not any((out / "logs").iterdir()):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.2)
    time.sleep(2.0)  # the fit is under way
    first.send_signal(signal.SIGKILL)
    first.wait()
    log = finish(ablate(out, tiny_policy_dir, *args))
    assert complete_cells(out) == collections.Counter({("full", 0): 1, ("full", 1): 1})
    failed = [t for t in trials(out) if t.state == TrialState.FAIL]
    assert len(failed) == 1  # the killed cell, failed as stale and re-enqueued
    retry = next(t for t in trials(out) if t.user_attrs.get("retry_of") == failed[0].number)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["retry_reason"].startswith("stale")
    assert "[ablate] 2/2 done" in log and (out / "table2.csv").exists()
