"""Where DIVA-GRPO can lower the zero-spread rate of local groups, and where it cannot, at an equal rollout budget.

    python reports/zero_spread.py --out docs/zero_spread.png                       # the curves only
    python reports/zero_spread.py --measure --temperatures 1.0 0.7 --samples 20   # + the policy's own questions
    python reports/zero_spread.py --sweep outputs/zs --out docs/zero_spread.png   # + a sweep's runs, by prompt kind

A question the policy answers right with probability ``p`` gives a zero-spread group of ``n`` responses with
probability ``P0(p, n) = p**n + (1 - p)**n`` (``diva_lightning.core.metrics.zero_spread_probability``). GRPO
spends ``(V + 1) * G`` responses on the question in one group; DIVA spends ``G`` on the original and ``G`` on each
of ``V`` variants. DIVA's expected rate of zero-spread local groups for that question is therefore
``(P0(p, G) + V * P0(p_variant, G)) / (V + 1)``, which is at least ``(P0(p, G) + V * 2**(1 - G)) / (V + 1)``: the
floor is reached only if every variant lands at exactly ``p_variant = 0.5``. The plot draws GRPO's curve, DIVA's
floor, and DIVA with variants that leave ``p`` unchanged, against ``p``; ``crossover`` gives the ``p`` beyond which
even DIVA's floor beats GRPO.

With ``--measure`` it also samples ``--samples`` responses per training question from a policy (the embedded base
policy by default) and estimates, without bias, each question's chance that a random subset of ``n`` of those
responses has zero reward spread (hypergeometric: ``sum_v C(count_v, n) / C(m, n)`` over the distinct reward
values). Averaged over the questions this gives GRPO's expected ``frac_reward_zero_std`` with ``(V + 1) * G``
responses, DIVA's with variants as hard as the original, and DIVA's floor, at each temperature (printed, and
written to ``<out stem>_measured.md``).

With ``--sweep DIR`` (a `sweeps/ablate.py` output folder holding the rows `full`, `grpo` and optionally
`grpo_n5`) it plots, per training step and averaged over seeds, DIVA's per-prompt zero-spread rate split by prompt
kind, GRPO's, and the floor DIVA's own original groups allow, into ``<out stem>_runs.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diva_lightning.core.metrics import zero_spread_probability  # noqa: E402
from sweeps.runlog import read_metrics, series  # noqa: E402


def diva_floor(p: torch.Tensor, group: int, variants: int) -> torch.Tensor:
    """DIVA's lowest expected zero-spread rate of local groups for a question of accuracy p (variants at 0.5)."""
    return (zero_spread_probability(p, group) + variants * 2.0 ** (1 - group)) / (variants + 1)


def crossover(group: int, variants: int) -> float:
    """The smallest p >= 0.5 at which DIVA's floor is below GRPO's rate with (variants + 1) * group responses.

    Both curves are symmetric about 0.5, so the same holds below 1 - p. Found by bisection (GRPO minus floor rises
    from negative at 0.5 to positive at 1).
    """
    n = (variants + 1) * group

    def gap(p: float) -> float:
        x = torch.tensor(p, dtype=torch.float64)
        return float(zero_spread_probability(x, n) - diva_floor(x, group, variants))

    lo, hi = 0.5, 1.0
    if gap(hi) <= 0:
        raise ValueError(f"DIVA's floor never beats GRPO for group={group}, variants={variants}")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gap(mid) <= 0 else (lo, mid)
    return hi


def subset_zero_spread(rewards: Sequence[float], n: int) -> float:
    """Probability that n of these rewards, drawn without replacement, are all equal (unbiased for P0(p, n))."""
    m = len(rewards)
    if not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= {m} rewards, got n={n}")
    counts = Counter(round(float(r), 9) for r in rewards)
    return sum(math.comb(c, n) for c in counts.values()) / math.comb(m, n)


@dataclass(frozen=True)
class Measured:
    """Expected fractions of zero-spread local groups over a policy's training questions at one temperature."""

    temperature: float
    questions: int
    samples: int
    accuracy: float
    grpo: float  # one group of (V + 1) * G
    diva_unchanged: float  # G on the original, variants as hard as it
    diva_floor: float  # G on the original, every variant at p = 0.5
    beyond_crossover: float  # share of questions where even the floor beats GRPO


def summarise(per_question: Sequence[Sequence[float]], accuracy: Sequence[Sequence[float]], *, temperature: float,
              group: int, variants: int) -> Measured:
    """Aggregate per-question reward samples (each a list of m rewards) into :class:`Measured`."""
    n = (variants + 1) * group
    floor = 2.0 ** (1 - group)
    grpo = [subset_zero_spread(r, n) for r in per_question]
    local = [subset_zero_spread(r, group) for r in per_question]
    dfloor = [(x + variants * floor) / (variants + 1) for x in local]
    return Measured(
        temperature=temperature, questions=len(per_question), samples=len(per_question[0]),
        accuracy=sum(map(sum, accuracy)) / sum(map(len, accuracy)),
        grpo=sum(grpo) / len(grpo), diva_unchanged=sum(local) / len(local), diva_floor=sum(dfloor) / len(dfloor),
        beyond_crossover=sum(f < g for f, g in zip(dfloor, grpo)) / len(grpo),
    )


def measure(policy: str, *, temperatures: Sequence[float], questions: int, samples: int, group: int,
            variants: int, seed: int = 0, batch_size: int = 16, max_new_tokens: int = 80) -> list[Measured]:
    """Sample ``samples`` responses to each of the first ``questions`` training questions per temperature."""
    from diva_lightning.data.schema import decode_image
    from diva_lightning.data.world import generate_world
    from diva_lightning.models.policy import load_policy
    from diva_lightning.rewards import CombinedReward
    from diva_lightning.rollout.hf import HFGenerateEngine

    reward = CombinedReward()  # the RL reward (0.9 accuracy + 0.1 format), so "zero spread" means what training sees
    bundle = load_policy(policy)
    records = generate_world(questions, seed=seed, split="train")
    images = [decode_image(r.images[0], None) for r in records]
    engine = HFGenerateEngine()
    out = []
    for temp in temperatures:
        t0 = time.perf_counter()
        rewards: list[list[float]] = []
        accs: list[list[float]] = []
        for s in range(0, len(records), batch_size):
            recs = records[s:s + batch_size]
            inputs = bundle.encode([r.problem for r in recs], [[im] for im in images[s:s + batch_size]])
            roll = engine.generate(bundle, inputs, num_generations=samples, temperature=temp, top_p=1.0,
                                   max_new_tokens=max_new_tokens, do_sample=True, seed=seed * 1000 + s)
            owner = roll.prompt_index.tolist()
            graded = reward(roll.texts, [recs[i].answer for i in owner])
            batch_rewards: list[list[float]] = [[] for _ in recs]
            batch_accs: list[list[float]] = [[] for _ in recs]
            for i, r, a in zip(owner, graded.reward.tolist(), graded.accuracy.tolist()):
                batch_rewards[i].append(r)
                batch_accs[i].append(a)
            rewards += batch_rewards
            accs += batch_accs
            print(f"[zero_spread] T={temp}: {min(s + batch_size, len(records))}/{len(records)} questions "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        out.append(summarise(rewards, accs, temperature=temp, group=group, variants=variants))
    return out


def markdown(rows: Sequence[Measured], group: int, variants: int) -> str:
    n = (variants + 1) * group
    lines = [f"| temperature | questions x samples | accuracy | GRPO (1 x {n}) | DIVA, variants unchanged "
             f"({variants + 1} x {group}) | DIVA floor (variants at p=0.5) | questions where the floor wins |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {m.temperature:g} | {m.questions} x {m.samples} | {m.accuracy:.3f} | {m.grpo:.3f} | "
              f"{m.diva_unchanged:.3f} | {m.diva_floor:.3f} | {m.beyond_crossover:.3f} |" for m in rows]
    return "\n".join(lines) + "\n"


KINDS = ("original", "paraphrase", "image", "hint")


Curve = tuple[list[int], list[float]]


def sweep_curves(sweep: Path, group: int = 5, variants: int = 1, window: int = 10) -> dict[str, Curve]:
    """Seed-mean, ``window``-step rolling-mean curves (steps, values) of the zero-spread rates in a sweep folder.

    Keys: ``full``, ``full/<kind>`` (steps where that kind of prompt occurred), ``full floor`` (``(original +
    V * 2**(1-G)) / (V + 1)`` per step), ``grpo``, ``grpo_n5`` (those present). Raises FileNotFoundError naming the
    folder when ``full`` or ``grpo`` is missing.
    """

    def mean_curve(row: str, key: str) -> Curve:
        files = sorted((sweep / "runs" / row).glob("*/metrics.csv"))
        per_seed = [dict(series(read_metrics(f), key)) for f in files]
        steps = sorted(set().union(*per_seed)) if per_seed else []
        raw = [sum(d[s] for d in per_seed if s in d) / sum(s in d for d in per_seed) for s in steps]
        return steps, [sum(raw[max(0, i - window + 1):i + 1]) / len(raw[max(0, i - window + 1):i + 1])
                       for i in range(len(raw))]

    for row in ("full", "grpo"):
        if not list((sweep / "runs" / row).glob("*/metrics.csv")):
            raise FileNotFoundError(f"{sweep}: no runs/{row}/*/metrics.csv (run sweeps/ablate.py --rows full grpo)")
    out = {"full": mean_curve("full", "frac_reward_zero_std")}
    for kind in KINDS:
        out[f"full/{kind}"] = mean_curve("full", f"frac_reward_zero_std/{kind}")
    floor = 2.0 ** (1 - group)
    steps, orig = out["full/original"]
    out["full floor"] = (steps, [(x + variants * floor) / (variants + 1) for x in orig])
    out["grpo"] = mean_curve("grpo", "frac_reward_zero_std")
    if list((sweep / "runs" / "grpo_n5").glob("*/metrics.csv")):
        out["grpo_n5"] = mean_curve("grpo_n5", "frac_reward_zero_std")
    return out


def plot_sweep(curves: dict[str, Curve], out: Path, window: int = 10) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"full": ("tab:blue", "-", 2.2), "full floor": ("tab:blue", ":", 1.6), "grpo": ("tab:orange", "-", 2.2),
             "grpo_n5": ("tab:green", "-", 1.6), "full/original": ("tab:purple", "--", 1.0),
             "full/paraphrase": ("tab:cyan", "--", 1.0), "full/image": ("tab:red", "--", 1.0),
             "full/hint": ("tab:olive", "--", 1.0)}
    labels = {"full": "DIVA (full), all local groups", "full floor": "DIVA floor: its originals + variants at p=0.5",
              "grpo": "GRPO, G=10", "grpo_n5": "GRPO, G=5, 16 questions"}
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for key, (xs, ys) in curves.items():
        if not ys:
            continue
        color, ls, lw = style.get(key, ("grey", "-", 1.0))
        ax.plot(xs, ys, ls, color=color, lw=lw, label=labels.get(key, f"DIVA {key[5:]} groups"))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"frac_reward_zero_std ({window}-step rolling mean, seed mean)")
    ax.set_title("Where DIVA's zero-spread prompt groups come from")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot(out: Path, group: int = 5, variants: int = 1) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = torch.linspace(0, 1, 401, dtype=torch.float64)
    n = (variants + 1) * group
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(p, zero_spread_probability(p, n), label=f"GRPO: one group of {n}", color="tab:orange")
    ax.plot(p, diva_floor(p, group, variants), label=f"DIVA floor: {group} + {variants}x{group}, variants at p=0.5",
            color="tab:blue")
    ax.plot(p, zero_spread_probability(p, group), "--", label="DIVA, variants as hard as the original",
            color="tab:blue", alpha=0.6)
    c = crossover(group, variants)
    for x in (1 - c, c):
        ax.axvline(x, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("p: the policy's accuracy on the original question")
    ax.set_ylabel("expected fraction of zero-spread local groups")
    ax.set_title(f"Equal rollout budget: DIVA can only win where p < {1 - c:.3f} or p > {c:.3f}")
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/zero_spread.png"))
    ap.add_argument("--group", type=int, default=5, help="G: responses per DIVA prompt")
    ap.add_argument("--variants", type=int, default=1, help="V: variants per question")
    ap.add_argument("--measure", action="store_true", help="also measure a policy's training questions")
    ap.add_argument("--policy", default="artifacts/base_policy")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    ap.add_argument("--questions", type=int, default=160, help="first N questions of the world's train split")
    ap.add_argument("--samples", type=int, default=20, help="responses per question (>= (V + 1) * G)")
    ap.add_argument("--seed", type=int, default=0, help="world seed (data.world.seed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", type=Path, help="an ablate.py output folder with rows full and grpo (+ grpo_n5)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    path = plot(a.out, a.group, a.variants)
    print(f"[zero_spread] crossover p = {crossover(a.group, a.variants):.4f}; wrote {path}")
    if a.sweep is not None:
        runs_png = plot_sweep(sweep_curves(a.sweep, a.group, a.variants), a.out.with_name(a.out.stem + "_runs.png"))
        print(f"[zero_spread] wrote {runs_png}")
    if a.measure:
        if a.samples < (a.variants + 1) * a.group:
            ap.error(f"--samples must be >= (V + 1) * G = {(a.variants + 1) * a.group}")
        rows = measure(a.policy, temperatures=a.temperatures, questions=a.questions, samples=a.samples,
                       group=a.group, variants=a.variants, seed=a.seed)
        table = markdown(rows, a.group, a.variants)
        a.out.with_name(a.out.stem + "_measured.md").write_text(table)
        print(table)


if __name__ == "__main__":
    main()
