"""Step-overhead benchmark: the time DIVA's own work adds to a training step, relative to vanilla GRPO's step.

    python benchmarks/step_overhead.py [--policy DIR] [--steps N] [--out FILE]

Issue #5 item 4. Target: DIVA's per-step overhead is at most 2% of a vanilla GRPO step on the embedded default.

One process, one model, one data module, the shipped configs (experiments/full.yaml for DIVA, with the
experiments/grpo.yaml overlay for the baseline). For each step k the same B questions are used by both sides:

(A) the vanilla GRPO step: encode + rollout (G=10 per question, V=0), reward (CombinedReward), GRPO advantage and
    the policy update (old log-probs, forward+backward over micro-batches, grad clip, AdamW) -- the very
    round stages that `training_step` runs (`module.rounds`: `encode`, `sample`, `grade`, `advantage`, `update`);
(B) DIVA's extra work at the same rollout budget (V=1, G=5): difficulty lookup + variant planning + text edits
    (`DivaDataModule.build_families`), the on-device Kornia perturbations (`apply_perturbations`), the extra prompt
    encoding (2B prompts instead of B), DIVA advantage minus GRPO advantage, and the difficulty-table update
    (`stats_from_outputs` + `DifficultyTable.update`, the callback's path).

A and B are interleaved ABAB (the order flips every step) so load drift on a shared machine hits both alike, and
every number is a median over steps. What is *not* counted as overhead: sampling and updating 80 responses costs
the same for both sides by design (equal rollout budget); their prompts differ (variants), which changes response
lengths, which is a property of the policy, not DIVA's own work.

Conservative choices: the whole of `build_families` (V=1) is counted, although GRPO's own data path runs the same
function with V=0 (its time is reported for reference); the difficulty table starts from a uniform spread over
[d_min, d_max] (a mid-training state in which all three tiers, and so image perturbations, occur) rather than
from all-new questions at D=5, which would plan paraphrases only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from diva_lightning.callbacks.difficulty import stats_from_outputs
from diva_lightning.core.difficulty import DifficultyTable
from diva_lightning.data.batch import TIER_CODES, FamilyBatch, QuestionBatch
from diva_lightning.data.perturb import apply_perturbations
from diva_lightning.data.sources import WorldConfig
from diva_lightning.rewards import CombinedReward
from diva_lightning.rollout.hf import HFGenerateEngine
from diva_lightning.system.datamodule import DivaDataModule
from diva_lightning.system.module import DivaGRPOModule, LossConfig, SamplingConfig
from diva_lightning.training.estimators import AdvantageEstimator, DivaAdvantage, GRPOAdvantage

TARGET_PCT = 2.0
ROOT = Path(__file__).resolve().parent.parent
PART_LABELS = {
    "families": "families: lookup + plan + text edits (`build_families`, V=1)",
    "perturb": "perturb: Kornia on device (`apply_perturbations`)",
    "encode_extra": "encode_extra: 2B prompts instead of B",
    "advantage_extra": "advantage_extra: DIVA minus GRPO advantage",
    "table_update": "table_update: `stats_from_outputs` + `DifficultyTable.update`",
}
OVERHEAD_PARTS = tuple(PART_LABELS)


def _init_args(cfg: dict[str, Any], *keys: str) -> dict[str, Any]:
    node: Any = cfg
    for key in keys:
        node = (node or {}).get(key, {})
    return dict((node or {}).get("init_args", {}) or {})


def load_settings(full: Path, grpo: Path) -> dict[str, Any]:
    """The shipped settings: DIVA from `full`, the baseline's G and advantage from the `grpo` overlay."""
    f, g = yaml.safe_load(full.read_text()), yaml.safe_load(grpo.read_text())
    model, data = _init_args(f, "model"), _init_args(f, "data")
    callbacks = f.get("trainer", {}).get("callbacks", [])
    difficulty: dict[str, Any] = next(
        (c.get("init_args", {}) for c in callbacks if c["class_path"].endswith("DifficultyCallback")), {})
    return {"model": model, "data": data, "difficulty": difficulty, "grpo_model": _init_args(g, "model")}


def build_module(policy: str, model: dict[str, Any], grpo_model: dict[str, Any]) -> DivaGRPOModule:
    """The baseline `DivaGRPOModule` (full.yaml + grpo.yaml settings), attached to a bare Trainer so `rounds.update`
    runs unchanged."""
    module = DivaGRPOModule(
        policy=policy, advantage=GRPOAdvantage(**_init_args(grpo_model, "advantage")),
        reward=CombinedReward(**_init_args(model, "reward")), rollout=HFGenerateEngine(),
        num_generations=int(grpo_model.get("num_generations", 10)),
        train_sampling=SamplingConfig(**model.get("train_sampling", {})), loss=LossConfig(**model.get("loss", {})),
        ppo_epochs=model.get("ppo_epochs", 1), mini_batch_size=model.get("mini_batch_size"),
        micro_batch_size=model.get("micro_batch_size"), lr=model.get("lr", 1e-6),
        weight_decay=model.get("weight_decay", 0.0), grad_clip=model.get("grad_clip", 1.0),
    )
    module.configure_model()
    # `rounds.update` uses the module's optimizer, manual_backward and clip_gradients: give it the Trainer plumbing
    # (strategy + optimizer) without running a fit loop, so A and B can be interleaved step by step.
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    trainer.strategy.optimizers = [module.configure_optimizers()]
    return module


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """fn(*args) and its wall time in ms."""
    t = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t) * 1e3


def paired_min(fn_a: Callable[[], Any], fn_b: Callable[[], Any], reps: int = 3) -> tuple[float, float]:
    """Min-of-`reps` times (ms) of two small calls run in alternating order (ABBAAB...), for a difference of
    two small costs: a single pair under load is dominated by which call happened to be descheduled."""
    a: list[float] = []
    b: list[float] = []
    for i in range(reps):
        for fn, acc in ((fn_a, a), (fn_b, b)) if i % 2 == 0 else ((fn_b, b), (fn_a, a)):
            acc.append(timed(fn)[1])
    return min(a), min(b)


def grpo_step(module: DivaGRPOModule, fb: FamilyBatch, seed: int) -> tuple[dict[str, float], dict[str, Any]]:
    """(A) One vanilla GRPO round; returns component times (ms) and the rollout's rewards/accuracy [N]."""
    ms: dict[str, float] = {}
    rounds = module.rounds
    inputs, ms["encode"] = timed(rounds.encode, fb)
    with torch.no_grad():
        roll, ms["generate"] = timed(rounds.sample, inputs, module.train_sampling, module.num_generations, seed)
    prompt_ids = roll.prompt_index  # [N]
    graded, ms["reward"] = timed(rounds.grade, roll.texts, [fb.answers[i] for i in prompt_ids.tolist()])
    rewards = graded.reward.to(torch.float32)  # [N]
    adv, ms["advantage"] = timed(module.advantage, rewards, prompt_ids, fb.family_index[prompt_ids],
                                 fb.difficulty[prompt_ids])
    assert module.policy is not None
    module.policy.train()
    _, ms["update"] = timed(rounds.update, inputs, roll, adv.to(torch.float32))
    ms["step"] = sum(ms.values())
    lengths = roll.completion_mask.sum(-1).float()
    return ms, {"rewards": rewards, "accuracy": graded.accuracy, "mean_length": float(lengths.mean())}


def diva_extras(dm: DivaDataModule, module: DivaGRPOModule, estimator: DivaAdvantage,
                grpo_advantage: AdvantageEstimator, qb: QuestionBatch, fb_grpo: FamilyBatch, rollout: dict[str, Any],
                group_size: int, table: DifficultyTable) -> tuple[dict[str, float], FamilyBatch]:
    """(B) DIVA's own work for the same questions, on the latest GRPO rollout's rewards (same N responses).

    Differences (encoding, advantage) are timed back to back inside B (`paired_min`), so both terms see the same
    machine load.

    The N = B*G_grpo rewards are regrouped as DIVA's 2B prompts x G_diva (the first half of each question's
    responses to its original, the second half to its variant), so both estimators see identical values.
    """
    ms: dict[str, float] = {}
    fb, ms["families"] = timed(dm.build_families, qb, dm.num_variants)
    fb = fb.to(module.device)  # what Lightning's batch transfer does before on_after_batch_transfer
    fb.images, ms["perturb"] = timed(apply_perturbations, fb.images, fb.perturb)
    rounds = module.rounds
    ms["encode_diva"], ms["encode_grpo"] = paired_min(lambda: rounds.encode(fb), lambda: rounds.encode(fb_grpo))
    rewards, accuracy = rollout["rewards"], rollout["accuracy"]
    prompt_ids = torch.arange(len(fb)).repeat_interleave(group_size)  # [N], groups contiguous as the engine's
    family_ids, labels = fb.family_index[prompt_ids], fb.difficulty[prompt_ids]
    grpo_ids = torch.arange(len(qb)).repeat_interleave(rewards.numel() // len(qb))
    ms["advantage_diva"], ms["advantage_grpo"] = paired_min(
        lambda: estimator(rewards, prompt_ids, family_ids, labels),
        lambda: grpo_advantage(rewards, grpo_ids, grpo_ids, labels))
    outputs = {"question_ids": [fb.question_ids[i] for i in prompt_ids.tolist()], "accuracy": accuracy}

    def update() -> None:
        stats = stats_from_outputs(outputs)
        assert stats is not None
        table.update(stats.ids, stats.correct, stats.count)

    _, ms["table_update"] = timed(update)
    ms["advantage_extra"] = ms["advantage_diva"] - ms["advantage_grpo"]
    ms["encode_extra"] = ms["encode_diva"] - ms["encode_grpo"]
    return ms, fb


def seeded_table(dm: DivaDataModule, difficulty: dict[str, Any], seed: int) -> DifficultyTable:
    """The callback's table, holding a uniform spread of difficulties over every training question."""
    table = DifficultyTable(**{k: difficulty[k] for k in ("initial", "d_min", "d_max", "eta", "rule")
                               if k in difficulty})
    u = torch.rand(len(dm.train_records), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    table.load_state_dict({"ids": [r.id for r in dm.train_records],
                           "values": table.d_min + (table.d_max - table.d_min) * u})
    return table


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    cfg = load_settings(args.config, args.baseline)
    data = cfg["data"]
    dm = DivaDataModule(world=WorldConfig(**data.get("world", {})), questions_per_step=data["questions_per_step"],
                        num_variants=data["num_variants"], plan=data.get("plan", "tiers"),
                        band=data.get("band", 0.5), num_generations=cfg["model"]["num_generations"], seed=args.seed)
    dm.setup("fit")
    table = seeded_table(dm, cfg["difficulty"], args.seed)
    dm.use_difficulty(table)

    policy, note = args.policy, "embedded default (the shipped base policy)"
    if policy is None:
        policy = "embedded"
    else:
        note = f"--policy {policy}"
    module = build_module(policy, cfg["model"], cfg["grpo_model"])
    g_grpo, g_diva = module.num_generations, int(cfg["model"]["num_generations"])
    estimator = DivaAdvantage(**_init_args(cfg["model"], "advantage"))
    print(f"policy: {note}", flush=True)
    print(f"B={dm.questions_per_step}  GRPO: V=0 G={g_grpo}  DIVA: V={dm.num_variants} G={g_diva}  "
          f"threads={torch.get_num_threads()}  steps={args.steps} (+{args.warmup} warm-up)", flush=True)

    grpo: dict[str, list[float]] = {}
    diva: dict[str, list[float]] = {}
    families_v0: list[float] = []
    tiers = dict.fromkeys(TIER_CODES, 0)
    lengths: list[float] = []
    last: dict[str, Any] | None = None
    for k in range(args.warmup + args.steps):
        qb = dm.question_batch(k)
        fb0, t_v0 = timed(dm.build_families, qb, 0)  # GRPO's own data path (V=0), for reference
        order = "AB" if k % 2 == 0 else "BA"  # step 0 is AB, so B always has a rollout to work on
        for side in order:
            if side == "A":
                a_ms, last = grpo_step(module, fb0, seed=1000 + k)
            else:
                assert last is not None
                b_ms, fb = diva_extras(dm, module, estimator, module.advantage, qb, fb0, last, g_diva, table)
        if k < args.warmup:
            continue
        assert last is not None
        for name, v in a_ms.items():
            grpo.setdefault(name, []).append(v)
        for name, v in b_ms.items():
            diva.setdefault(name, []).append(v)
        families_v0.append(t_v0)
        lengths.append(last["mean_length"])
        for name, code in TIER_CODES.items():
            tiers[name] += int((fb.tier[fb.is_original] == code).sum())
        overhead = sum(b_ms[p] for p in OVERHEAD_PARTS)
        print(f"step {k - args.warmup + 1:>3} [{order}]  GRPO step {a_ms['step']:8.1f} ms  DIVA extra "
              f"{overhead:6.2f} ms  ({100 * overhead / a_ms['step']:.3f}%)", flush=True)

    comp = {p: median(diva[p]) for p in OVERHEAD_PARTS}
    diva_min = {k: min(v) for k, v in diva.items()}
    for part in ("encode", "advantage"):  # min of a difference means nothing: difference of the minima
        diva_min[f"{part}_extra"] = diva_min[f"{part}_diva"] - diva_min[f"{part}_grpo"]
    per_step = [sum(diva[p][i] for p in OVERHEAD_PARTS) for i in range(args.steps)]
    step_med = median(grpo["step"])
    ratios = [100 * o / s for o, s in zip(per_step, grpo["step"])]
    return {
        "policy": note,
        "settings": {"B": dm.questions_per_step, "G_grpo": g_grpo, "G_diva": g_diva, "V": dm.num_variants,
                     "max_new_tokens": module.train_sampling.max_new_tokens, "steps": args.steps,
                     "warmup": args.warmup, "threads": torch.get_num_threads()},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine()},
        "grpo_ms": {k: median(v) for k, v in grpo.items()},
        "grpo_min_ms": {k: min(v) for k, v in grpo.items()},
        "diva_ms": {**comp, **{k: median(diva[k]) for k in ("encode_diva", "encode_grpo", "advantage_diva",
                                                               "advantage_grpo")}},
        "diva_min_ms": diva_min,
        "families_v0_ms": median(families_v0),
        "overhead_ms": median(per_step),
        "grpo_step_ms": step_med,
        "overhead_pct": median(ratios),
        "overhead_pct_max": max(ratios),
        "mean_response_tokens": median(lengths),
        "question_tiers": tiers,
        "pass": median(ratios) <= TARGET_PCT,
    }


def report(r: dict[str, Any]) -> str:
    """Markdown: settings, per-component medians, the ratio and the PASS/FAIL line."""
    s = r["settings"]
    min_overhead = sum(r["diva_min_ms"][p] for p in OVERHEAD_PARTS)
    lines = [
        "# Step overhead: DIVA's own work vs a vanilla GRPO step",
        "",
        f"- policy: {r['policy']}",
        f"- B={s['B']} questions; GRPO V=0 G={s['G_grpo']}; DIVA V={s['V']} G={s['G_diva']} "
        f"(same {s['B'] * s['G_grpo']} responses); max_new_tokens={s['max_new_tokens']}; "
        f"median of per-step mean response length {r['mean_response_tokens']:.1f} tokens",
        f"- {s['steps']} measured steps (+{s['warmup']} warm-up), ABAB interleaved, medians; "
        f"torch threads={s['threads']}; {r['machine']['platform']}, torch {r['machine']['torch']}",
        f"- tiers of the measured questions: {r['question_tiers']}",
        "",
        "Medians over steps; the min column is a low-noise view of each component's own cost (a shared",
        "machine inflates small ops most: a descheduled OpenMP thread stalls a 1 ms op for a whole time slice).",
        "",
        "| vanilla GRPO step (A) | median ms | min ms |", "|---|---:|---:|",
        *[f"| {k} | {v:.2f} | {r['grpo_min_ms'][k]:.2f} |" for k, v in r["grpo_ms"].items()],
        "",
        "| DIVA's extra work (B) | median ms | min ms |", "|---|---:|---:|",
        *[f"| {label} | {r['diva_ms'][key]:.3f} | {r['diva_min_ms'][key]:.3f} |" for key, label in PART_LABELS.items()],
        f"| **overhead total** (median of per-step sums) | **{r['overhead_ms']:.3f}** | |",
        "",
        f"For reference: GRPO's own `build_families` (V=0) {r['families_v0_ms']:.3f} ms; "
        f"encoding DIVA {r['diva_ms']['encode_diva']:.2f} ms, GRPO {r['diva_ms']['encode_grpo']:.2f} ms; "
        f"advantages DIVA {r['diva_ms']['advantage_diva']:.3f} ms, GRPO {r['diva_ms']['advantage_grpo']:.3f} ms.",
        "",
        f"**overhead / GRPO step: median of per-step ratios {r['overhead_pct']:.3f}% (worst step "
        f"{r['overhead_pct_max']:.3f}%); medians {r['overhead_ms']:.2f} ms / {r['grpo_step_ms']:.1f} ms**",
        "",
        f"Low-noise view (sum of the components' minima / fastest GRPO step): {min_overhead:.2f} ms / "
        f"{r['grpo_min_ms']['step']:.1f} ms = {100 * min_overhead / r['grpo_min_ms']['step']:.3f}%.",
        "",
        f"{'PASS' if r['pass'] else 'FAIL'}: DIVA per-step overhead {r['overhead_pct']:.3f}% "
        f"{'<=' if r['pass'] else '>'} {TARGET_PCT}% of a vanilla GRPO step",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default=None, help="policy dir (default: the shipped base policy, 'embedded')")
    p.add_argument("--steps", type=int, default=8, help="measured steps (default 8)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured warm-up steps (default 1)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "step_overhead.md",
                   help="Markdown result file; a .json with the same stem is written beside it")
    p.add_argument("--config", type=Path, default=ROOT / "experiments" / "full.yaml")
    p.add_argument("--baseline", type=Path, default=ROOT / "experiments" / "grpo.yaml")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    result = run(args)
    text = report(result)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
