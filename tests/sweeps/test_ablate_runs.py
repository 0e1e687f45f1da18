"""The sweep end to end: worker processes (`python sweeps/ablate.py`) running real `fit` jobs of the untrained tiny
policy (slow: each cell is a fit), on the journal file and on a real PostgreSQL server (tests/sweeps/conftest.py).

- every row really switches its component off: on the resolved config.yaml the CLI wrote into the run folder,
  and on what the run logged (metrics.csv columns, and each step's advantages recomputed from a trace);
- two workers started together split the cells and no cell runs twice; a later invocation only rewrites the report;
- a worker SIGKILLed mid-cell: the next invocation says what it waits for, and runs the cell again after the grace;
- a cell launched as 2 "nodes" x 1 process (two torchrun agents, localhost rendezvous, DDP on CPU) is scored.
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
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from diva_lightning.core.advantage import DivaSettings, diva_advantages
from sweeps._common import REPO
from sweeps.study import cell_of, open_storage

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]
ABLATE = str(REPO / "sweeps" / "ablate.py")
# Two "nodes" of one process each on this machine: two torchrun agents meeting at a localhost rendezvous. Each is
# waited for by pid: `wait -n` returns 127 (bash 5.2) when both have exited before it is called.
TWO_NODES = ("p=; for node in 0 1; do {torchrun} --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d "
             "--rdzv-endpoint 127.0.0.1:{port} --rdzv-id cell -m diva_lightning {args} & p=\"$p $!\"; done; "
             "for q in $p; do wait $q || exit; done")


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
    return subprocess.Popen([sys.executable, ABLATE, "--out", str(out), *tiny(policy), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 420) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def trials(out: Path, storage: str | None = None) -> list[optuna.trial.FrozenTrial]:
    url = storage or f"journal:{out / 'study.journal'}"
    return optuna.load_study(study_name="diva-ablate", storage=open_storage(url)).get_trials()


def complete_cells(trials: list[optuna.trial.FrozenTrial]) -> collections.Counter[tuple[str, int]]:
    done = [cell_of(t) for t in trials if t.state == TrialState.COMPLETE]
    return collections.Counter((c.row, c.seed) for c in done if c is not None)


@pytest.fixture(params=["journal", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The study's storage URL: the journal file (the default) or a database of a real PostgreSQL server."""
    if request.param == "journal":
        return f"journal:{tmp_path / 'shared' / 'study.journal'}"
    return str(request.getfixturevalue("postgres_url"))


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
            torch.testing.assert_close(diva_advantages(*inputs, DivaSettings(**kwargs)).float(), s["advantages"])
            differs |= not torch.allclose(diva_advantages(*inputs, DivaSettings(**(kwargs | {key: on_value}))).float(),
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




def test_two_workers_share_the_cells_and_a_rerun_only_reports(tiny_policy_dir: str, tmp_path: Path,
                                                              storage: str) -> None:
    """Two invocations started together (both race to create the study): every cell runs once, in one of them."""
    args = ["--storage", storage, "--rows", "full", "grpo", "--seeds", "0", "1", "--steps", "1", "--val-every", "1",
            "--poll", "0.5"]
    procs = [ablate(tmp_path / f"w{i}", tiny_policy_dir, *args, "--no-report") for i in range(2)]
    logs = [finish(p) for p in procs]
    done = trials(tmp_path, storage)
    assert complete_cells(done) == collections.Counter({(r, s): 1 for r in ("full", "grpo") for s in (0, 1)})
    # Nothing failed or was retried; at most a worker that asked when the queue had just emptied got a trial that is
    # no cell (pruned at once).
    assert all(t.state == TrialState.COMPLETE or (t.state == TrialState.PRUNED and cell_of(t) is None) for t in done)
    fits = [f for i in range(2) for f in (tmp_path / f"w{i}" / "logs").glob("*.log")]
    assert len(fits) == 4 and all("[ablate] start" in log for log in logs)  # four fits in all; both workers ran some
    # A later invocation on the finished study: no fit, same trials, the report (over both workers' runs).
    log = finish(ablate(tmp_path / "w0", tiny_policy_dir, *args), timeout=120)
    assert "[ablate] start" not in log and "[ablate] 4/4 done" in log
    assert len(trials(tmp_path, storage)) == len(done) and len(fits) == 4
    table = (tmp_path / "w0" / "table2.md").read_text()
    assert "| full | 2 |" in table and "| grpo | 2 |" in table


def test_killed_worker_cell_is_retried(tiny_policy_dir: str, tmp_path: Path, storage: str) -> None:
    args = ["--storage", storage, "--rows", "full", "--seeds", "0", "--steps", "1", "--val-every", "1",
            "--heartbeat-interval", "1", "--grace-period", "6", "--poll", "0.5"]
    first = ablate(tmp_path / "sweep", tiny_policy_dir, *args, "--no-report")
    logs = tmp_path / "sweep" / "logs"
    deadline = time.monotonic() + 120
    while not logs.exists() or not any(logs.iterdir()):
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.2)
    time.sleep(1.0)  # the fit is under way
    first.send_signal(signal.SIGKILL)
    first.wait()
    log = finish(ablate(tmp_path / "sweep", tiny_policy_dir, *args))
    assert "s for a stale cell's heartbeat (full/seed0, trial 0, silent" in log  # it says what it waits for
    done = trials(tmp_path, storage)
    assert complete_cells(done) == collections.Counter({("full", 0): 1})
    stale = done[0]
    assert stale.state == TrialState.FAIL and "error" not in stale.user_attrs or stale.user_attrs["error"] is None
    retry = next(t for t in done if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == stale.number)
    assert retry.state == TrialState.COMPLETE and cell_of(retry) == cell_of(stale)
    assert "[ablate] 1/1 done" in log and (tmp_path / "sweep" / "table2.csv").exists()


def test_cell_launched_as_two_torchrun_nodes_is_scored(tiny_policy_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    ddp = ["--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.num_nodes=2",
           "--data.init_args.world.train_size=4"]  # 2 questions per step on each of the 2 ranks
    log = finish(ablate(out, tiny_policy_dir, "--rows", "full", "--seeds", "0", "--steps", "2", "--val-every", "2",
                        "--launcher", TWO_NODES, *[f"--set={a}" for a in ddp]))
    assert "[ablate] 1/1 done" in log
    (trial,) = trials(out)
    run = Path(trial.user_attrs["run_dir"])
    job_log = Path(trial.user_attrs["log_path"]).read_text()
    # Lightning took the world from torchrun's environment: two ranks, one per "node".
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in job_log and "GLOBAL_RANK: 1, MEMBER: 2/2" in job_log
    assert "All distributed processes registered. Starting with 2 processes" in job_log
    cfg = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert (cfg["num_nodes"], str(cfg["devices"]), cfg["strategy"]) == (2, "1", "ddp")
    final = [float(r["val/accuracy"]) for r in _metrics(run) if r.get("val/accuracy")][-1]
    assert trial.state == TrialState.COMPLETE and trial.value == final and trial.user_attrs["steps"] == 2
