"""Measure a base policy's success rate per world question: the table the difficulty-skew knob composes from.

`python -m tools.success_table --policy embedded --temperature 0.5 --train 2400 --val 720 --test 240`

samples ``--samples`` (16) responses per question of each split's pool (``generate_world(N, seed, split)``) with the
RL rollout settings (``--temperature``, top_p 1, 80 new tokens, the R1 prompt) and grades them with the RL reward's
accuracy. The table records the weights' sha256 and the temperature, so a run on another base policy, or one whose
rollouts sample at another temperature, refuses it (``diva_lightning.data.success`` holds those run-time checks).
Default output: the shipped base policy's ``success.json`` when ``--policy embedded`` (measured at 0.5, the
temperature of ``experiments/skewed.yaml``). ``--plot_tables A B --plot FILE`` draws stored tables side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from diva_lightning.data.schema import QuestionRecord, decode_image
from diva_lightning.data.skew import SuccessTable
from diva_lightning.data.success import TABLE_NAME, table_for, weights_digest
from diva_lightning.data.world import generate_world
from diva_lightning.models.embedded import EMBEDDED, SHIPPED_DIR, resolve_embedded
from diva_lightning.models.policy import PolicyBundle, load_policy
from diva_lightning.rewards import accuracy_reward
from diva_lightning.rollout.hf import HFGenerateEngine


def _seed(*parts: object) -> int:
    """The sampling seeds the shipped ``success.json`` was measured with. Not ``core.seeding.stable_seed``: that one
    masks the top bit where this shifts it out, so switching would make a re-measure differ from the shipped table."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def count_successes(bundle: PolicyBundle, records: Sequence[QuestionRecord], *, samples: int, seed: int,
                    temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 80, batch_questions: int = 16,
                    progress: Callable[[str], None] | None = None) -> dict[str, int]:
    """Right answers out of ``samples`` sampled responses, per record id."""
    engine = HFGenerateEngine()
    out: dict[str, int] = {}
    t0 = time.perf_counter()
    for s in range(0, len(records), batch_questions):
        chunk = records[s:s + batch_questions]
        inputs = bundle.encode([r.problem for r in chunk], [[decode_image(r.images[0], None)] for r in chunk])
        roll = engine.generate(bundle, inputs, num_generations=samples, temperature=temperature, top_p=top_p,
                               max_new_tokens=max_new_tokens, do_sample=True, seed=_seed("success", seed, s))
        for i, record in enumerate(chunk):
            texts = roll.texts[i * samples:(i + 1) * samples]
            out[record.id] = int(sum(accuracy_reward(t, record.answer) >= 1.0 for t in texts))
        if progress is not None:
            done = min(s + batch_questions, len(records))
            rate = done / max(time.perf_counter() - t0, 1e-9)
            progress(f"{done}/{len(records)} questions ({rate:.1f}/s, ~{(len(records) - done) / rate:.0f}s left)")
    return out


def measure(policy: str, pools: dict[str, int], *, world_seed: int = 0, samples: int = 16, seed: int = 0,
            max_new_tokens: int = 80, temperature: float = 1.0,
            progress: Callable[[str], None] | None = None) -> SuccessTable:
    """The success table of ``policy`` over the world's pools (split -> size)."""
    folder = resolve_embedded(policy)
    bundle = load_policy(folder)
    successes: dict[str, int] = {}
    for split, n in pools.items():
        records = generate_world(n, seed=world_seed, split=split)

        def say(msg: str, split: str = split) -> None:
            if progress is not None:
                progress(f"{split}: {msg}")

        successes.update(count_successes(bundle, records, samples=samples, seed=_seed(seed, split),
                                         max_new_tokens=max_new_tokens, temperature=temperature, progress=say))
    settings = {"temperature": temperature, "top_p": 1.0, "max_new_tokens": max_new_tokens,
                "engine": "HFGenerateEngine",
                "prompt": "R1 instruction (models.prompt default)", "seed": seed, "policy": str(policy)}
    return SuccessTable(weights_digest(folder), world_seed, dict(pools), samples, successes, settings)


def histogram(table: SuccessTable) -> list[int]:
    """Number of questions with k right answers, for k = 0..samples."""
    hist = [0] * (table.samples + 1)
    for k in table.successes.values():
        hist[k] += 1
    return hist


def plot_histograms(tables: Mapping[str, SuccessTable], path: str | Path) -> Path:
    """One PNG: the share of questions with k right answers out of ``samples``, a bar group per k and a bar per
    table (e.g. the same policy at two temperatures), with the hard and easy thresholds of the default skew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(tables), 1)
    for i, (name, table) in enumerate(tables.items()):
        hist = histogram(table)
        total = sum(hist)
        ax.bar([k - 0.4 + width * (i + 0.5) for k in range(len(hist))], [n / total for n in hist], width,
               label=f"{name} (T = {table.temperature:g}, {total} questions)")
    samples = max(t.samples for t in tables.values())
    ax.axvline(1.5, ls=":", c="gray")
    ax.axvline(samples - 1.5, ls=":", c="gray")
    ax.text(0.6, ax.get_ylim()[1] * 0.92, "hard", ha="center", fontsize=8)
    ax.text(samples - 0.6, ax.get_ylim()[1] * 0.92, "easy", ha="center", fontsize=8)
    ax.set(xlabel=f"right answers out of {samples} sampled responses", ylabel="share of questions",
           xticks=range(samples + 1), title="Base policy's success per world question")
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m tools.success_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default=EMBEDDED, help="'embedded' (the shipped base policy) or a checkpoint dir")
    p.add_argument("--out", default=None, help="output file (default: success.json beside the shipped policy "
                                               "when --policy embedded)")
    p.add_argument("--train", type=int, default=2400, help="train pool size")
    p.add_argument("--val", type=int, default=720, help="validation pool size")
    p.add_argument("--test", type=int, default=240, help="test pool size")
    p.add_argument("--world_seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=16, help="responses per question")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=80)
    p.add_argument("--temperature", type=float, default=0.5,
                   help="rollout temperature to measure at; must equal the run's model.train_sampling.temperature "
                        "(default 0.5: experiments/skewed.yaml's; the paper samples at 1.0)")
    p.add_argument("--plot", default=None, help="also draw the histogram of right answers to this PNG")
    p.add_argument("--plot_tables", nargs="+", default=None, metavar="TABLE",
                   help="measure nothing: draw these success.json files ('embedded' = the shipped one) side by side "
                        "to --plot")
    a = p.parse_args(argv)
    if a.plot_tables is not None:
        if a.plot is None:
            p.error("--plot_tables needs --plot")
        named = {"shipped success.json" if t == EMBEDDED else Path(t).name: table_for(t) for t in a.plot_tables}
        print(f"[success_table] wrote {plot_histograms(named, a.plot)}", flush=True)
        return Path(a.plot)
    if a.out is None and a.policy != EMBEDDED:
        p.error("--out is required unless --policy embedded")
    out = Path(a.out) if a.out else SHIPPED_DIR / TABLE_NAME
    pools = {k: v for k, v in (("train", a.train), ("val", a.val), ("test", a.test)) if v > 0}
    table = measure(a.policy, pools, world_seed=a.world_seed, samples=a.samples, seed=a.seed,
                    max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                    progress=lambda m: print(f"[success_table] {m}", flush=True))
    table.save(out)
    hist = histogram(table)
    if a.plot is not None:
        plot_histograms({str(a.policy): table}, a.plot)
    print(f"[success_table] {len(table.successes)} questions -> {out}; right answers out of {table.samples}: "
          + " ".join(f"{k}:{n}" for k, n in enumerate(hist)), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
