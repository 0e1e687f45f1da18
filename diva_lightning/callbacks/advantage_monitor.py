"""`AdvantageMonitor`: logs the GRPO/DIVA signal-health metrics of design.md section 7.

Usable in any Lightning project. After every training batch it reads a `callbacks.outputs.StepOutputs`: the dict
returned by `training_step` (or, if that returns a tensor, `pl_module.difficulty_outputs`; a `None` return is a
skipped batch, not logged), one entry per response for N responses (missing optional keys just skip their
metrics). Each may be a tensor (any device), a list or a numpy array, 1-D [N] or 2-D [P, G] (flattened row-major,
so [P, G] means P prompts x G responses); every key must then hold N entries. Group ids may be ints or any hashable
labels (strings), which are numbered in order of first appearance. Anything else (3-D, a dict, text rewards,
another length) is rejected with a message naming the key.

| key | shape | meaning | required |
|---|---|---|---|
| `rewards` | [N] or [P, G] float | shaped reward | yes |
| `prompt_ids` | [N] int or labels | local group (responses to one prompt) | yes, unless `rewards` is [P, G] |
| `family_ids` | [N] int or labels | global group (question + its variants) | no |
| `is_original` | [N] bool | response to the unmodified question | no |
| `accuracy`, `format` | [N] float | reward components | no |
| `tier` | [N] int | 0 easy, 1 medium, 2 hard (`core.choices.TIERS`) | no |
| `kind` | [N] int | 0 original, 1 paraphrase, 2 image, 3 hint (`core.choices.STEP_KINDS`: the prompt answered) | no |
| `completion_lengths` | [N] int | tokens per response | no |
| `advantages` | [N] float | final advantage per response | no |
| `timings` | dict[str, float] | seconds per phase (rollout, reward, advantage, update) | no |

Logged: `reward` (also on the progress bar), `reward_std`, `rewards/accuracy`, `rewards/format`, `frac_reward_zero_std`,
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

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from diva_lightning.callbacks.outputs import StepOutputs, batch_outputs
from diva_lightning.core.choices import STEP_KINDS, TIERS
from diva_lightning.core.metrics import per_group_mean, variant_rescue_rate, zero_std_fraction

_NUMERIC = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
            torch.float32, torch.float64)


def _vector(outputs: StepOutputs, key: str, n: int | None) -> Tensor:
    """outputs.<key> as a 1-D CPU tensor of ``n`` entries (see the module docstring for what is accepted)."""
    return _as_vector(getattr(outputs, key), key, n)


def _as_vector(value: Any, key: str, n: int | None) -> Tensor:
    if isinstance(value, Tensor):
        t = value.detach().cpu()
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            t = None
        if t is None or t.dtype not in _NUMERIC:
            raise TypeError(f"AdvantageMonitor: outputs[{key!r}] must be a tensor, list or array of numbers, got "
                            f"{type(value).__name__}")
    if t.dim() > 2:
        raise ValueError(f"AdvantageMonitor: outputs[{key!r}] must be 1-D [N] or 2-D [P, G], got shape "
                         f"{tuple(t.shape)}")
    t = t.reshape(-1)
    if n is not None and t.numel() != n:
        raise ValueError(f"AdvantageMonitor: outputs[{key!r}] has {t.numel()} entries but outputs['rewards'] has {n}: "
                         "every key holds one entry per response")
    return t


def _group_ids(outputs: StepOutputs, key: str, n: int) -> Tensor:
    """Group labels as integer ids; non-numeric labels (e.g. question id strings) numbered by first appearance."""
    value = getattr(outputs, key)
    if not isinstance(value, Tensor) and isinstance(value, list | tuple) and any(isinstance(v, str) for v in value):
        codes: dict[Any, int] = {}
        value = [codes.setdefault(v, len(codes)) for v in value]
    return _as_vector(value, key, n).long()


def monitor_metrics(outputs: StepOutputs | Mapping[str, Any]) -> dict[str, float]:
    """The metrics for one step's outputs (pure function of the outputs; see module docstring)."""
    out = outputs if isinstance(outputs, StepOutputs) else StepOutputs.from_mapping(outputs)
    if not out.has("rewards"):
        raise KeyError("AdvantageMonitor: training_step outputs lack required key 'rewards'")
    rewards = _vector(out, "rewards", None).double()
    n = rewards.numel()
    raw = out.rewards
    shape = tuple(raw.shape) if isinstance(raw, Tensor) else tuple(torch.as_tensor(raw).shape)
    if out.has("prompt_ids"):
        prompt_ids = _group_ids(out, "prompt_ids", n)
    elif len(shape) == 2:
        prompt_ids = torch.arange(shape[0]).repeat_interleave(shape[1])  # [P, G]: row p holds prompt p's responses
    else:
        raise KeyError("AdvantageMonitor: training_step outputs lack required key 'prompt_ids' (needed unless "
                       "'rewards' is 2-D [P, G])")
    m: dict[str, float] = {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "frac_reward_zero_std": zero_std_fraction(rewards, prompt_ids),
    }
    for name in ("accuracy", "format"):
        if out.has(name):
            m[f"rewards/{name}"] = float(_vector(out, name, n).double().mean())
    if out.family_ids is not None:
        family = _group_ids(out, "family_ids", n)
        m["frac_family_zero_std"] = zero_std_fraction(rewards, family)
        if out.has("is_original"):
            rate = variant_rescue_rate(rewards, prompt_ids, family, _vector(out, "is_original", n).bool())
            if rate is not None:
                m["variant_rescue_rate"] = rate
    if out.has("completion_lengths"):
        m["completions/mean_length"] = float(_vector(out, "completion_lengths", n).double().mean())
    acc = _vector(out, "accuracy", n).double() if out.has("accuracy") else None
    if out.has("tier"):
        m.update(_tier_metrics(_vector(out, "tier", n), rewards, prompt_ids, acc))
    if out.has("kind"):
        m.update(_kind_metrics(_vector(out, "kind", n), rewards, prompt_ids, acc))
    if out.has("advantages"):
        adv = _vector(out, "advantages", n).double()
        m["advantage/mean"] = float(adv.mean())
        m["advantage/std"] = float(adv.std()) if adv.numel() > 1 else 0.0
        m["advantage/abs_mean"] = float(adv.abs().mean())
        m["frac_zero_advantage"] = float((adv.abs() < 1e-8).double().mean())
    for phase, seconds in (out.timings or {}).items():
        m[f"timing/{phase}_s"] = float(seconds)
    return m


def _tier_metrics(tier: Tensor, rewards: Tensor, prompt_ids: Tensor, acc: Tensor | None) -> dict[str, float]:
    m: dict[str, float] = {}
    for code, name in enumerate(TIERS):
        sel = tier == code
        m[f"tier/{name}/count"] = float(sel.sum())
        if acc is not None and bool(sel.any()):
            m[f"tier/{name}/accuracy"] = float(acc[sel].mean())
        if bool(sel.any()):
            m[f"tier/{name}/frac_zero_std"] = zero_std_fraction(rewards[sel], prompt_ids[sel])
    return m


def _kind_metrics(kind: Tensor, rewards: Tensor, prompt_ids: Tensor, acc: Tensor | None) -> dict[str, float]:
    m: dict[str, float] = {}
    for code, name in enumerate(STEP_KINDS):
        sel = kind == code
        if bool(sel.any()):
            m[f"frac_reward_zero_std/{name}"] = zero_std_fraction(rewards[sel], prompt_ids[sel])
            if acc is not None:
                a = acc[sel]
                m[f"kind/{name}/accuracy"] = float(a.mean())
                # local groups answered right every time: a variant that overshoots (too easy) shows here
                _, means = per_group_mean(a, prompt_ids[sel])
                m[f"kind/{name}/frac_all_correct"] = float((means == 1.0).double().mean())
    return m


def rank_dependent(key: str) -> bool:
    """Whether a metric of :func:`monitor_metrics` exists only when a batch holds its case (see module docstring)."""
    if key == "variant_rescue_rate" or key.startswith(("kind/", "frac_reward_zero_std/")):
        return True
    return key.startswith("tier/") and not key.endswith("/count")


class AdvantageMonitor(Callback):
    """Logs reward spread, advantage-vanishing rates, variant rescue and timings once per optimizer step.

    Every training batch's metrics count: under gradient accumulation (k batches per optimizer step) each logged
    value is the mean over the step's batches, weighted by their number of responses (a metric some batch lacks,
    e.g. a tier it did not hold, is averaged over the batches that have it). Skipped batches (`None` from
    `training_step`) count for nothing.

    Args:
        prefix: prepended to every metric name (e.g. "train/").
        log_every_n_steps: log only every n-th optimizer step (the metrics are cheap; this only trims log volume;
            the batches of the steps in between are not logged).
    """

    def __init__(self, prefix: str = "", log_every_n_steps: int = 1) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"AdvantageMonitor: log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.prefix, self.log_every_n_steps = prefix, log_every_n_steps
        self._steps_before_batch = 0
        self._sums: dict[str, float] = {}  # metric -> sum of value x responses over this optimizer step's batches
        self._weights: dict[str, float] = {}  # metric -> responses of the batches that logged it
        self._responses = 0

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._steps_before_batch = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        found = batch_outputs(outputs, pl_module, "AdvantageMonitor")
        logged_step = self._steps_before_batch % self.log_every_n_steps == 0
        if found is not None and logged_step:
            if not found.has("rewards"):
                raise KeyError("AdvantageMonitor: training_step outputs lack required key 'rewards'")
            n = int(_vector(found, "rewards", None).numel())
            for k, v in monitor_metrics(found).items():
                self._sums[k] = self._sums.get(k, 0.0) + v * n
                self._weights[k] = self._weights.get(k, 0.0) + n
            self._responses += n
        # The batch that ends an optimizer step (global_step moved; at once with manual optimization) logs the step.
        if trainer.global_step != self._steps_before_batch and self._responses:
            metrics = {self.prefix + k: self._sums[k] / self._weights[k] for k in self._sums}
            n, self._sums, self._weights, self._responses = self._responses, {}, {}, 0
            self._log(trainer, pl_module, metrics, n)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float], n: int) -> None:
        bar = {k: metrics.pop(k) for k in [self.prefix + "reward"] if k in metrics}  # also on the progress bar
        if trainer.world_size == 1:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=n)
            pl_module.log_dict(bar, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
            return
        local = {k: v for k, v in metrics.items() if rank_dependent(k[len(self.prefix):])}
        shared = {k: v for k, v in metrics.items() if k not in local}
        pl_module.log_dict(shared, on_step=True, on_epoch=False, sync_dist=True, batch_size=n)
        pl_module.log_dict(bar, on_step=True, on_epoch=False, sync_dist=True, prog_bar=True, batch_size=n)
        if trainer.global_rank == 0 and local:
            pl_module.log_dict(local, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=n)
