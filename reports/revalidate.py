"""Re-validate a sweep's trained policies (and the base policy) under another decoding, e.g. the paper's.

    python reports/revalidate.py --sweep outputs/zs --temperature 0.6 --top-p 0.95 --samples 4

Each run folder `runs/<row>/<seed>/` of an `ablate.py` sweep holds `config.yaml` (the resolved config) and
`policy/` (the trained policy, exported at the end of fit). Each is validated with `python -m diva_lightning
validate` on its own config, with `model.init_args.policy` pointed at that folder and the decoding
overridden (the exported weights are all a validation needs; `--ckpt_path` would keep the decoding given too, but
loads a whole checkpoint for nothing). The base policy is validated the same way with the config's own policy. Writes
`<sweep>/revalidate_<tag>.md` and `.csv`: accuracy per run, and mean ± std (sample std) per row.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps.tables import fmt, mean_std  # noqa: E402


@dataclass(frozen=True)
class Score:
    row: str
    run: str
    accuracy: float


def decoding_args(temperature: float, top_p: float, samples: int) -> list[str]:
    return ["--model.init_args.val_sampling.temperature", str(temperature),
            "--model.init_args.val_sampling.top_p", str(top_p),
            "--model.init_args.val_sampling.num_samples", str(samples)]


def validate(config: Path, policy: Path | None, extra: list[str], log_root: Path) -> float:
    """val/accuracy of a policy folder (or of the config's own policy when None), through the real CLI."""
    from diva_lightning.cli import run_cli

    args = ["validate", "--config", str(config), "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(log_root), "--build_base_policy", "false",
            "--trainer.limit_val_batches", "1.0", *extra]  # the whole validation split, whatever the run limited
    if policy is not None:
        args += ["--model.init_args.policy", str(policy)]
    cli = run_cli(args)
    return float(cli.trainer.callback_metrics["val/accuracy"])


def revalidate(sweep: Path, extra: list[str], *, include_base: bool = True) -> list[Score]:
    runs = sorted(p.parent for p in (sweep / "runs").glob("*/*/config.yaml"))
    if not runs:
        raise FileNotFoundError(f"{sweep}: no runs/<row>/<seed>/config.yaml (is it a sweeps/ablate.py --out folder?)")
    scores: list[Score] = []
    with tempfile.TemporaryDirectory() as logs:
        if include_base:
            scores.append(Score("base", "-", validate(runs[0] / "config.yaml", None, extra, Path(logs))))
            print(f"[revalidate] base: {scores[-1].accuracy:.3f}", flush=True)
        for run in runs:
            policy = run / "policy"
            if not (policy / "config.json").is_file():
                raise FileNotFoundError(f"{run}: no policy/ folder to validate (did the fit finish?)")
            t0 = time.perf_counter()
            scores.append(Score(run.parent.name, run.name, validate(run / "config.yaml", policy, extra, Path(logs))))
            print(f"[revalidate] {run.parent.name}/{run.name}: {scores[-1].accuracy:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return scores


def write(scores: list[Score], out_stem: Path, title: str) -> Path:
    """``<out_stem>.csv`` (one line per run) and ``<out_stem>.md`` (mean +- std per row); returns the .md path."""
    with open(f"{out_stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "run", "accuracy"])
        w.writerows([(s.row, s.run, f"{s.accuracy:.4f}") for s in scores])
    rows: dict[str, list[float]] = {}
    for s in scores:
        rows.setdefault(s.row, []).append(s.accuracy)
    lines = [f"# {title}", "", "| row | runs | val/accuracy | per run |", "|---|---|---|---|"]
    for row, accs in rows.items():
        mean, std = mean_std(accs)
        lines.append(f"| {row} | {len(accs)} | {fmt(mean, std if len(accs) > 1 else None)} | "
                     + ", ".join(f"{a:.3f}" for a in accs) + " |")
    md = Path(f"{out_stem}.md")
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=Path, required=True, help="an ablate.py --out folder")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--samples", type=int, default=4, help="responses per question (mean@k)")
    ap.add_argument("--no-base", action="store_true", help="skip the base policy")
    a = ap.parse_args(argv)
    extra = decoding_args(a.temperature, a.top_p, a.samples)
    scores = revalidate(a.sweep, extra, include_base=not a.no_base)
    tag = f"t{a.temperature:g}_p{a.top_p:g}_k{a.samples}"
    title = f"val/accuracy at temperature {a.temperature:g}, top_p {a.top_p:g}, mean over {a.samples} samples"
    print(f"[revalidate] wrote {write(scores, a.sweep / f'revalidate_{tag}', title)}")


if __name__ == "__main__":
    main()
