"""`AdvantageMonitor`: logs the GRPO/DIVA signal-health metrics of design.md section 7.

Usable in any Lightning project. It reads, from the dict returned by `training_step`, per-response tensors of
length N (missing optional keys just skip their metrics):

| key | shape | meaning | required |
|---|---|---|---|
| `rewards` | [N] float | shaped reward | yes |
| `prompt_ids` | [N] int | local group (responses to one prompt) | yes |
| `family_ids` | [N] int | global group (question + its variants) | no |
| `is_original` | [N] bool | response to the unmodified question | no |
| `accuracy`, `format` | [N] float | reward components | no |
| `tier` | [N] int | 0 easy, 1 medium, 2 hard | no |
| `kind` | [N] int | 0 original, 1 paraphrase, 2 image, 3 hint (prompt the response answers) | no |
| `completion_lengths` | [N] int | tokens per response | no |
| `advantages` | [N] float | final advantage per response | no |
| `timings` | dict[str, float] | seconds per phase (rollout, reward, advantage, update) | no |

Logged: `reward`, `reward_std`, `rewards/accuracy`, `rewards/format`, `frac_reward_zero_std`,
`frac_family_zero_std`, `variant_rescue_rate`, `completions/mean_length`, `tier/{easy,medium,hard}/count`,
`/accuracy` and `/frac_zero_std` (local groups of that tier), `frac_reward_zero_std/{original,paraphrase,image,hint}`
(local groups of that prompt kind: where DIVA's zero-spread groups come from), `kind/<kind>/accuracy` and
`/frac_all_correct` (with `accuracy`: does a variant kind overshoot or undershoot), `advantage/{mean,std,abs_mean}`,
`frac_zero_advantage`, `timing/<phase>_s`.
With several ranks, fractions are computed per rank and averaged by Lightning (`sync_dist`). Metrics that exist
only when a rank's batch holds their case (`variant_rescue_rate`, `tier/<tier>/accuracy` and `/frac_zero_std`,
`frac_reward_zero_std/<kind>`, `kind/...`) are logged from rank 0 alone: a synchronised key that one rank logs and
another does not would deadlock the collective.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from diva_lightning.core.metrics import per_group_mean, variant_rescue_rate, zero_std_fraction

TIER_NAMES = ("easy", "medium", "hard")
KIND_NAMES = ("original", "paraphrase", "image", "hint")


def monitor_metrics(outputs: dict[str, Any]) -> dict[str, float]:
    """The metrics for one step's outputs (pure function of the outputs dict; see module docstring)."""
    for key in ("rewards", "prompt_ids"):
        if key not in outputs:
            raise KeyError(f"AdvantageMonitor: training_step outputs lack required key {key!r}")
    rewards: Tensor = outputs["rewards"].detach().double().cpu()
    prompt_ids: Tensor = outputs["prompt_ids"].detach().cpu()
    m: dict[str, float] = {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "frac_reward_zero_std": zero_std_fraction(rewards, prompt_ids),
    }
    for name in ("accuracy", "format"):
        if name in outputs:
            m[f"rewards/{name}"] = float(outputs[name].detach().double().mean())
    family = outputs.get("family_ids")
    if family is not None:
        family = family.detach().cpu()
        m["frac_family_zero_std"] = zero_std_fraction(rewards, family)
        if "is_original" in outputs:
            rate = variant_rescue_rate(rewards, prompt_ids, family, outputs["is_original"].detach().cpu())
            if rate is not None:
                m["variant_rescue_rate"] = rate
    if "completion_lengths" in outputs:
        m["completions/mean_length"] = float(outputs["completion_lengths"].detach().double().mean())
    acc: Tensor | None = outputs["accuracy"].detach().cpu().double() if "accuracy" in outputs else None
    if "tier" in outputs:
        tier = outputs["tier"].detach().cpu()
        for code, name in enumerate(TIER_NAMES):
            sel = tier == code
            m[f"tier/{name}/count"] = float(sel.sum())
            if acc is not None and bool(sel.any()):
                m[f"tier/{name}/accuracy"] = float(acc[sel].mean())
            if bool(sel.any()):
                m[f"tier/{name}/frac_zero_std"] = zero_std_fraction(rewards[sel], prompt_ids[sel])
    if "kind" in outputs:
        kind = outputs["kind"].detach().cpu()
        for code, name in enumerate(KIND_NAMES):
            sel = kind == code
            if bool(sel.any()):
                m[f"frac_reward_zero_std/{name}"] = zero_std_fraction(rewards[sel], prompt_ids[sel])
                if acc is not None:
                    a = acc[sel]
                    m[f"kind/{name}/accuracy"] = float(a.mean())
                    # local groups answered right every time: a variant that overshoots (too easy) shows here
                    _, means = per_group_mean(a, prompt_ids[sel])
                    m[f"kind/{name}/frac_all_correct"] = float((means == 1.0).double().mean())
    if "advantages" in outputs:
        adv = outputs["advantages"].detach().double().cpu()
        m["advantage/mean"] = float(adv.mean())
        m["advantage/std"] = float(adv.std()) if adv.numel() > 1 else 0.0
        m["advantage/abs_mean"] = float(adv.abs().mean())
        m["frac_zero_advantage"] = float((adv.abs() < 1e-8).double().mean())
    for phase, seconds in outputs.get("timings", {}).items():
        m[f"timing/{phase}_s"] = float(seconds)
    return m


def rank_dependent(key: str) -> bool:
    """Whether a metric of :func:`monitor_metrics` exists only when a batch holds its case (see module docstring)."""
    if key == "variant_rescue_rate" or key.startswith(("kind/", "frac_reward_zero_std/")):
        return True
    return key.startswith("tier/") and not key.endswith("/count")


class AdvantageMonitor(Callback):
    """Logs reward spread, advantage-vanishing rates, variant rescue and timings after every training batch.

    Args:
        prefix: prepended to every metric name (e.g. "train/").
        log_every_n_steps: log only every n-th batch (the metrics are cheap; this only trims log volume).
    """

    def __init__(self, prefix: str = "", log_every_n_steps: int = 1) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"AdvantageMonitor: log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.prefix, self.log_every_n_steps = prefix, log_every_n_steps

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % self.log_every_n_steps or not isinstance(outputs, dict):
            return
        metrics = {self.prefix + k: v for k, v in monitor_metrics(outputs).items()}
        n = int(outputs["rewards"].numel())
        if trainer.world_size == 1:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=n)
            return
        local = {k: v for k, v in metrics.items() if rank_dependent(k[len(self.prefix):])}
        shared = {k: v for k, v in metrics.items() if k not in local}
        pl_module.log_dict(shared, on_step=True, on_epoch=False, sync_dist=True, batch_size=n)
        if trainer.global_rank == 0 and local:
            pl_module.log_dict(local, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=n)
