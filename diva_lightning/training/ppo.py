"""The PPO update of one round: epochs over shuffled mini-batches, one optimizer step each, micro-batch accumulation.

A plain class driven through a small hooks object, so a test runs it without a Trainer (design.md section 1:
"the LightningModule only wires it"). The math is `core.loss.policy_loss`; this file only decides which
responses go into which forward and with which denominators:

- ``token_mean`` is exact across micro-batches and ranks: every micro-batch divides by the *mini-batch's*
  token count over all ranks divided by the world size (``UpdateHooks.token_denominator``), because data
  parallelism averages gradients over ranks;
- the sequence aggregations divide by the mini-batch's number of responses on this rank;
- Dr.GRPO's constant is ``max_len`` (the response budget ``max_new_tokens``), never the batch's longest response.

Old log-probs: ``old_logp=None`` means "the sampling policy is the current one" (ratio exactly 1, taken detached
from the same forward). That shortcut is only right for a single optimizer step per round: the class refuses it
otherwise, so a caller cannot turn PPO into REINFORCE on stale samples by accident.

Rollout correction (``engine_logp`` with ``correction``): the weights `core.correction.importance_weights` gives for
the trainer's old log-probs against the engine's. With ``old_logp`` they are computed once before the first step;
without it (one step) from each micro-batch's detached log-probs, so no separate pass is needed. Every weight is a
function of its own response's tokens only (token level: of the token; sequence level: of the response's sum), and
a response is whole in one micro-batch, so these are the round-wide weights. The mismatch statistics
(``rollout_correction/``) are computed once over the whole round either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import Tensor

from diva_lightning.core.correction import CorrectionStats, importance_weights
from diva_lightning.core.loss import policy_loss
from diva_lightning.training.config import CorrectionConfig, LossConfig


class UpdateHooks(Protocol):
    """What the update needs from its host (the LightningModule, or a test)."""

    def score(self, rows: list[int], *, entropy: bool) -> tuple[Tensor, Tensor | None]:
        """Log-probs [n, T] (with grad) and entropy [n, T] or None of responses ``rows`` under the policy."""
        ...

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> None:
        """Clip gradients, step the optimizer, zero the gradients (and tell the rollout engine)."""
        ...

    def token_denominator(self, mask: Tensor) -> float:
        """The ``token_mean`` denominator of a mini-batch whose mask on this rank is ``mask``."""
        ...

    def max_over_ranks(self, value: int) -> int:
        """The largest ``value`` over data-parallel ranks (the value itself on one process): every rank must run
        the same number of forwards under FSDP, so the token-budget micro-batch count is agreed on."""
        ...


@dataclass
class UpdateBatch:
    """One round's responses as the update sees them (N responses, T completion positions).

    Attributes:
        advantages: [N] float.
        mask: [N, T] bool, the tokens that get gradient.
        old_logp: [N, T] log-probs of the sampling policy, or None (= current policy, one step only).
        ref_logp: [N, T] reference log-probs for the KL term, or None.
        is_weights: [N, T] importance weights (engine/trainer correction) computed by the caller, or None.
        engine_logp: [N, T] log-probs the rollout engine reported when sampling, or None; with ``correction``,
            the update computes the importance weights itself (see the module docstring). Not with ``is_weights``.
        correction: the correction's level, mode and cap; set exactly when ``engine_logp`` is.
        seq_lens: [N] real tokens of each response's forward (prompt + completion), needed by a token budget.
        groups: [N] prompt of each response: a token-budget micro-batch keeps a prompt's responses together
            where it can (its image is then encoded once for them).
        shared_prompt_lens: [N] prompt tokens of each response when a forward computes each prompt once for its
            responses (``share_prompt``), or None: the budget then counts a prompt once per micro-batch, as the
            forward holds it.
    """

    advantages: Tensor
    mask: Tensor
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    is_weights: Tensor | None = None
    seq_lens: Tensor | None = None
    groups: Tensor | None = None
    engine_logp: Tensor | None = None
    correction: CorrectionConfig | None = None
    shared_prompt_lens: Tensor | None = None

    def __len__(self) -> int:
        return int(self.advantages.shape[0])


# Loss statistics that policy_loss aggregates with the mini-batch-wide denominator (num_tokens / num_seqs):
# micro-batch values are shares of the mini-batch value and add up. Every other statistic is a
# token mean over the micro-batch's mask (weighted by the micro-batch's share of the mini-batch's tokens, which
# makes the combination exact) except the maximum ratio.
ADDITIVE_STATS = frozenset({"loss/policy", "kl", "entropy"})
MAX_STATS = frozenset({"ratio/max"})
_STAT_NAMES = {
    "pg_loss": "loss/policy", "clip_frac_low": "clip_ratio/low", "clip_frac_high": "clip_ratio/high",
    "dual_clip_frac": "clip_ratio/dual", "ratio_mean": "ratio/mean", "ratio_max": "ratio/max",
    "kl": "kl", "entropy": "entropy", "approx_kl": "approx_kl", "loss": "loss",
}


def stats_dict(stats: object) -> dict[str, float]:
    """Flatten a `PolicyLossStats` into loggable floats under TRL-style names."""
    return {_STAT_NAMES.get(k, k): float(v) for k, v in asdict(stats).items() if v is not None}  # type: ignore[call-overload]


def combine_micro_stats(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """One optimizer step's statistics from its micro-batches' (stats, share of the mini-batch) pairs."""
    out: dict[str, float] = {}
    for stats, share in parts:
        for key, value in stats.items():
            if key in MAX_STATS:
                out[key] = max(out.get(key, value), value)
            else:
                out[key] = out.get(key, 0.0) + (value if key in ADDITIVE_STATS else value * share)
    return out


class PPOUpdate:
    """``epochs`` passes over a round's responses in mini-batches of ``mini_batch_size``, one optimizer step each,
    gradients accumulated over micro-batches of ``micro_batch_size`` (see the module docstring).

    Args:
        loss: clipping, aggregation, ratio level, KL and entropy settings.
        epochs: passes over the round (PPO epochs).
        mini_batch_size: responses per optimizer step (None: the whole round).
        micro_batch_size: responses per forward/backward (None: the whole mini-batch).
        max_len: Dr.GRPO's constant for ``seq_mean_token_sum_norm`` (the response budget).
        max_tokens_per_micro_batch: form micro-batches by a token budget instead of a row count (see
            :meth:`micro_batches`); a forward then holds at most this many real tokens (packed, no padding).
    """

    def __init__(self, loss: LossConfig, *, epochs: int = 1, mini_batch_size: int | None = None,
                 micro_batch_size: int | None = None, max_len: int | None = None,
                 max_tokens_per_micro_batch: int | None = None) -> None:
        problems = loss.check()
        if epochs < 1:
            problems.append(f"ppo_epochs must be >= 1, got {epochs}")
        for name, value in (("mini_batch_size", mini_batch_size), ("micro_batch_size", micro_batch_size),
                            ("max_tokens_per_micro_batch", max_tokens_per_micro_batch)):
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 or null, got {value}")
        if problems:
            raise ValueError("; ".join(problems))
        self.loss, self.epochs = loss, epochs
        self.mini_batch_size, self.micro_batch_size, self.max_len = mini_batch_size, micro_batch_size, max_len
        self.max_tokens = max_tokens_per_micro_batch

    def micro_batches(self, rows: list[int], batch: UpdateBatch, hooks: UpdateHooks) -> list[list[int]]:
        """Split one mini-batch's rows into micro-batches.

        Without a token budget: ``micro_batch_size`` rows each, in the given (shuffled) order. With one: rows
        ordered by prompt (a prompt's responses together), each micro-batch filled up to
        ``max_tokens_per_micro_batch`` real tokens (and ``micro_batch_size`` rows, when set); a single longer
        response gets a micro-batch of its own. Every rank then runs as many micro-batches as the rank that needs
        most (the largest ones are halved): sharded forwards are collective.
        """
        micro = self.micro_batch_size or len(rows)
        if self.max_tokens is None:
            return [rows[m : m + micro] for m in range(0, len(rows), micro)]
        return token_budget_partition(rows, batch, self.max_tokens, micro, hooks.max_over_ranks)

    def steps_per_round(self, n: int) -> int:
        """Optimizer steps one round of ``n`` responses takes."""
        mini = self.mini_batch_size or n
        return self.epochs * -(-n // mini)

    def single_step(self, n: int) -> bool:
        """Whether a round of ``n`` responses is one optimizer step (weights unchanged since sampling)."""
        return self.steps_per_round(n) == 1

    def run(self, batch: UpdateBatch, hooks: UpdateHooks, *, generator: torch.Generator) -> dict[str, float]:
        """Run the round's optimizer steps; returns the statistics averaged over steps."""
        n = len(batch)
        if batch.old_logp is None and not self.single_step(n):
            raise ValueError(f"old log-probs are required: this round takes {self.steps_per_round(n)} optimizer "
                             "steps, so the sampling policy is not the current one after the first")
        if (batch.engine_logp is None) != (batch.correction is None):
            raise ValueError("UpdateBatch.engine_logp and UpdateBatch.correction go together: set both or neither")
        if batch.engine_logp is not None and batch.is_weights is not None:
            raise ValueError("UpdateBatch.is_weights and engine_logp both weigh the tokens: give one")
        correction = RoundCorrection(batch) if batch.engine_logp is not None else None
        mini = self.mini_batch_size or n
        cfg = self.loss
        # Dr.GRPO's constant: the budget, else the round's width (never a micro-batch's own width)
        max_len = self.max_len if self.max_len is not None else int(batch.mask.shape[1])
        want_entropy = cfg.entropy_coef > 0
        per_step: list[dict[str, float]] = []
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=generator).tolist() if mini < n else list(range(n))
            for s in range(0, n, mini):
                mb = order[s : s + mini]
                num_tokens = hooks.token_denominator(batch.mask[mb])
                micro_stats: list[tuple[dict[str, float], float]] = []
                mb_tokens = float(batch.mask[mb].sum())
                for idx in self.micro_batches(mb, batch, hooks):
                    logp, ent = hooks.score(idx, entropy=want_entropy)
                    old = logp.detach() if batch.old_logp is None else batch.old_logp[idx]
                    if correction is not None:
                        is_weights: Tensor | None = correction.weights(idx, old)
                    else:
                        is_weights = None if batch.is_weights is None else batch.is_weights[idx]
                    loss, stats = policy_loss(
                        logp, old, batch.advantages[idx], batch.mask[idx], clip_low=cfg.clip_low,
                        clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, agg=cfg.agg, ratio_level=cfg.ratio_level,
                        ref_logp=None if batch.ref_logp is None else batch.ref_logp[idx], kl_coef=cfg.kl_coef,
                        kl_type=cfg.kl_type, entropy=ent, entropy_coef=cfg.entropy_coef,
                        is_weights=is_weights,
                        # mini-batch-wide denominators: micro-batch losses add up to the mini-batch loss
                        num_tokens=num_tokens, num_seqs=len(mb), max_len=max_len,
                    )
                    hooks.backward(loss)
                    # the non-additive statistics are token means over the mask: weighted by token share, the
                    # micro-batches give the mini-batch's value however the rows were split
                    share = float(batch.mask[idx].sum()) / mb_tokens if mb_tokens > 0 else len(idx) / len(mb)
                    micro_stats.append((stats_dict(stats), share))
                hooks.step()
                per_step.append(combine_micro_stats(micro_stats))
        out = {k: sum(d[k] for d in per_step) / len(per_step) for k in per_step[0]}
        if correction is not None:
            out.update(correction.metrics())
        return out


class RoundCorrection:
    """The rollout correction of one round (``UpdateBatch.engine_logp`` and ``correction``): per micro-batch
    weights, and the mismatch statistics over the whole round."""

    def __init__(self, batch: UpdateBatch) -> None:
        assert batch.engine_logp is not None and batch.correction is not None
        self.engine, self.mask, self.cfg = batch.engine_logp, batch.mask, batch.correction
        if self.engine.shape != self.mask.shape:
            raise ValueError(f"engine_logp shape {tuple(self.engine.shape)} != mask shape {tuple(self.mask.shape)}")
        nan = self.mask.bool() & torch.isnan(self.engine)
        if bool(nan.any()):  # before any forward, with the round's own positions
            raise ValueError(f"engine_logp has NaN on {int(nan.sum())} masked-in tokens, first at (response, "
                             f"position) {nan.nonzero()[0].tolist()}")
        self.trainer: Tensor | None = None  # [N, T] the trainer's old log-probs, filled micro-batch by micro-batch
        self.seen = torch.zeros(self.mask.shape[0], dtype=torch.bool)
        self.precomputed: tuple[Tensor, CorrectionStats] | None = None
        if batch.old_logp is not None:  # several steps: the old log-probs exist before the first one
            self.precomputed = self._weigh(batch.old_logp, self.engine, self.mask)

    def _weigh(self, trainer: Tensor, engine: Tensor, mask: Tensor) -> tuple[Tensor, CorrectionStats]:
        c = self.cfg
        return importance_weights(trainer, engine, mask, level=c.level, mode=c.mode, cap=c.cap)

    def weights(self, rows: list[int], old: Tensor) -> Tensor:
        """The weights [n, T] of responses ``rows``, whose old log-probs are ``old`` [n, T]."""
        if self.precomputed is not None:
            return self.precomputed[0][rows]
        if self.trainer is None:
            self.trainer = torch.zeros(self.mask.shape, dtype=torch.promote_types(old.dtype, torch.float32),
                                       device=old.device)
        self.trainer[rows] = old.detach().to(self.trainer.dtype)
        self.seen[rows] = True
        return self._weigh(old, self.engine[rows], self.mask[rows])[0]

    def metrics(self) -> dict[str, float]:
        """``rollout_correction/`` statistics of the whole round (every response has been scored)."""
        if self.precomputed is not None:
            return self.precomputed[1].metrics()
        assert self.trainer is not None and bool(self.seen.all()), "a response was never scored"
        return self._weigh(self.trainer, self.engine, self.mask)[1].metrics()


def token_budget_partition(rows: list[int], batch: UpdateBatch, max_tokens: int, max_rows: int,
                           max_over_ranks: Callable[[int], int]) -> list[list[int]]:
    """Micro-batches of ``rows`` holding at most ``max_tokens`` real tokens (packed: no padding) and ``max_rows``
    rows each, as many on every rank (see ``PPOUpdate.micro_batches``). A prompt's responses are split over two
    micro-batches only when they do not fit in one: its image is then encoded once in the update. With
    ``shared_prompt_lens`` a micro-batch's tokens count each prompt once (what a shared-prompt forward holds)."""
    if batch.seq_lens is None:
        raise ValueError("a token budget (max_tokens_per_micro_batch) needs UpdateBatch.seq_lens")
    lens = batch.seq_lens.tolist()
    groups = batch.groups.tolist() if batch.groups is not None else list(range(len(lens)))
    shared = batch.shared_prompt_lens.tolist() if batch.shared_prompt_lens is not None else [0] * len(lens)

    def tokens(part: list[int]) -> int:
        """Real tokens a forward of ``part`` holds: each response's, less the shared prompts' repeats."""
        first: dict[int, int] = {}
        for r in part:
            first.setdefault(groups[r], shared[r])
        return sum(lens[r] - shared[r] for r in part) + sum(first.values())

    by_group: dict[int, list[int]] = {}
    for r in sorted(rows, key=lambda r: (groups[r], r)):
        by_group.setdefault(groups[r], []).append(r)
    parts: list[list[int]] = [[]]
    used = 0
    for members in by_group.values():
        size = tokens(members)
        # a prompt's responses that fit in a fresh micro-batch but not in this one start the next: not split
        if parts[-1] and (used + size > max_tokens or len(parts[-1]) + len(members) > max_rows) \
                and size <= max_tokens and len(members) <= max_rows:
            parts.append([])
            used = 0
        for j, r in enumerate(members):
            # a response costs its own tokens, less its prompt's when the prompt is in this micro-batch already
            cost = lens[r] - (shared[r] if j and parts[-1] and groups[parts[-1][-1]] == groups[r] else 0)
            if parts[-1] and (used + cost > max_tokens or len(parts[-1]) >= max_rows):
                parts.append([])
                used, cost = 0, lens[r]
            parts[-1].append(r)
            used += cost
    wanted = max_over_ranks(len(parts))
    if wanted > len(rows):
        raise ValueError(f"another rank needs {wanted} micro-batches but this one has only {len(rows)} responses in "
                         "the mini-batch: ranks must hold mini-batches of equal size")
    while len(parts) < wanted:  # halve the heaviest splittable micro-batch: never exceeds the budget
        k = max((i for i, p in enumerate(parts) if len(p) > 1), key=lambda i: tokens(parts[i]))
        half = len(parts[k]) // 2
        parts[k : k + 1] = [parts[k][:half], parts[k][half:]]
    return parts
