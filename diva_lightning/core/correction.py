"""Importance-sampling correction between the rollout engine and the trainer (issue 11 item 3).

A rollout engine (vLLM) samples with its own kernels and precision, so its log-probs of the sampled
tokens differ from the trainer's even with identical weights, and the PPO ratio computed from the
trainer's old log-probs no longer corrects for the policy that really sampled (Yao et al. 2025, "Your
efficient RL framework secretly brings you off-policy RL training"). The correction weighs each token
by ``rho = pi_trainer / pi_engine`` (trainer's old log-probs over the engine's), capped at C:

- ``level="token"``: ``rho_t = exp(trainer_t - engine_t)``, one per token;
- ``level="sequence"``: ``rho_b = exp(sum_t (trainer_t - engine_t))`` over the sequence's tokens (the
  ratio of sequence probabilities), the same weight at every token of the sequence;
- ``mode="truncate"``: ``w = min(rho, C)`` (truncated importance sampling, TIS);
- ``mode="mask"``: ``w = rho`` where ``rho <= C``, else 0 (the token or sequence is silenced).

These are TRL's ``vllm_importance_sampling_mode`` values ``token_truncate``, ``token_mask``,
``sequence_truncate`` and ``sequence_mask`` (``f"{level}_{mode}"``) with ``vllm_importance_sampling_cap``
= ``cap`` (TRL default 3.0). As in TRL, masking has only an upper bound (verl's rejection sampling also
has a lower one); a masked token still counts in the loss's token denominator. Log-ratios are clamped
to [-20, 20] before ``exp`` (as verl's safety bound), so a ``-inf`` engine log-prob gives a large
finite ratio, not inf. Weights are 0 off the mask and carry no gradient. Pass them to
:func:`diva_lightning.core.loss.policy_loss` as ``is_weights``.

The statistics are the mismatch metrics to log under ``rollout_correction/`` (:meth:`CorrectionStats.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

# IS_LEVELS and IS_MODES are re-exported (``X as X``) for the callers that import them from here.
from diva_lightning.core.choices import IS_LEVELS as IS_LEVELS
from diva_lightning.core.choices import IS_MODES as IS_MODES
from diva_lightning.core.choices import IsLevel, IsMode, check_choice

METRIC_PREFIX = "rollout_correction/"
_LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class CorrectionStats:
    """Detached scalar float tensors describing the engine/trainer mismatch of one batch.

    "Units" are tokens for ``level="token"`` and sequences (with at least one real token) for
    ``level="sequence"``; the per-token statistics are always over the real tokens.

    Attributes:
        ratio_mean, ratio_min, ratio_max: of the raw ratio rho over units (before the cap).
        weight_mean: mean of the returned weights over units (after the cap).
        frac_truncated: share of units with rho > cap when ``mode="truncate"`` (else 0).
        frac_masked: share of units with rho > cap when ``mode="mask"`` (else 0).
        kl: per-token mean of ``engine - trainer`` log-probs, the k1 estimate of KL(engine || trainer)
            (the tokens were sampled by the engine; can be negative).
        k3_kl: per-token mean of ``r - 1 - log r``, r = trainer/engine: the k3 estimate, always >= 0.
        logp_diff_mean, logp_diff_max: of ``|trainer - engine|`` per token (TRL
            ``sampling/sampling_logp_difference/{mean,max}``).
    """

    ratio_mean: Tensor
    ratio_min: Tensor
    ratio_max: Tensor
    weight_mean: Tensor
    frac_truncated: Tensor
    frac_masked: Tensor
    kl: Tensor
    k3_kl: Tensor
    logp_diff_mean: Tensor
    logp_diff_max: Tensor

    def metrics(self, prefix: str = METRIC_PREFIX) -> dict[str, float]:
        """``{prefix + field name: float}`` for logging, e.g. ``rollout_correction/ratio_mean``."""
        return {prefix + f.name: float(getattr(self, f.name)) for f in fields(self)}


def _masked_stats(values: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, min and max of ``values[keep]``; (0, 0, 0) when nothing is kept."""
    if not bool(keep.any()):
        z = values.new_zeros(())
        return z, z, z
    kept = values[keep]
    return kept.mean(), kept.min(), kept.max()


def importance_weights(
    trainer_logp: Tensor,
    engine_logp: Tensor,
    mask: Tensor,
    *,
    level: IsLevel = "token",
    mode: IsMode = "truncate",
    cap: float = 3.0,
) -> tuple[Tensor, CorrectionStats]:
    """Importance-sampling weights correcting engine-sampled tokens towards the trainer's policy.

    Args:
        trainer_logp: Tensor[B, T] log-probs of the sampled tokens under the trainer's rollout-time
            (old) policy. Detached here.
        engine_logp: Tensor[B, T] log-probs the engine reported when sampling them.
        mask: Tensor[B, T] bool or 0/1, True on completion tokens. Off-mask values may be anything
            (NaN, inf): they are never read.
        level: ``"token"`` or ``"sequence"`` (``IS_LEVELS``).
        mode: ``"truncate"`` or ``"mask"`` (``IS_MODES``).
        cap: the cap C (> 0).

    Returns:
        (weights Tensor[B, T] in the promoted float dtype (at least float32), 0 off the mask, no
        gradient; :class:`CorrectionStats`).

    Raises:
        ValueError: shapes differ or are not [B, T], unknown level/mode, cap <= 0, NaN log-probs on the
            mask (the positions are named).
    """
    if trainer_logp.dim() != 2:
        raise ValueError(f"trainer_logp must be [B, T], got shape {tuple(trainer_logp.shape)}")
    for name, t in (("engine_logp", engine_logp), ("mask", mask)):
        if t.shape != trainer_logp.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != trainer_logp shape {tuple(trainer_logp.shape)}")
    check_choice("level", level, IsLevel)
    check_choice("mode", mode, IsMode)
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    m = mask.bool()
    dtype = torch.promote_types(torch.promote_types(trainer_logp.dtype, engine_logp.dtype), torch.float32)
    tr, en = trainer_logp.detach().to(dtype), engine_logp.detach().to(dtype)
    nan = m & (torch.isnan(tr) | torch.isnan(en))
    if bool(nan.any()):
        raise ValueError(
            f"trainer_logp/engine_logp have NaN on {int(nan.sum())} masked-in tokens, first at "
            f"{nan.nonzero()[0].tolist()}"
        )
    zeros = torch.zeros_like(tr)
    # [B, T] per-token log(trainer / engine); 0 off the mask, clamped so inf cannot reach exp.
    tok_lr = torch.where(m, tr - en, zeros).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)

    if level == "token":
        unit_lr, unit_keep = tok_lr, m  # [B, T]
    else:
        unit_lr = tok_lr.sum(dim=-1).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # [B]
        unit_keep = m.any(dim=-1)  # [B]
    rho = torch.exp(unit_lr)
    over = unit_keep & (rho > cap)
    unit_w = rho.clamp(max=cap) if mode == "truncate" else torch.where(over, torch.zeros_like(rho), rho)
    unit_w = torch.where(unit_keep, unit_w, torch.zeros_like(unit_w))
    weights = unit_w if level == "token" else unit_w.unsqueeze(-1).expand_as(tr)
    weights = torch.where(m, weights, zeros)

    ratio_mean, ratio_min, ratio_max = _masked_stats(rho, unit_keep)
    weight_mean, _, _ = _masked_stats(unit_w, unit_keep)
    n_units = unit_keep.sum().clamp(min=1).to(dtype)
    frac_over = over.sum().to(dtype) / n_units
    none = frac_over.new_zeros(())
    n_tok = m.sum().clamp(min=1).to(dtype)
    abs_diff = tok_lr.abs()
    stats = CorrectionStats(
        ratio_mean=ratio_mean,
        ratio_min=ratio_min,
        ratio_max=ratio_max,
        weight_mean=weight_mean,
        frac_truncated=frac_over if mode == "truncate" else none,
        frac_masked=frac_over if mode == "mask" else none,
        kl=(-tok_lr).sum() / n_tok,
        k3_kl=torch.where(m, torch.exp(tok_lr) - 1.0 - tok_lr, zeros).sum() / n_tok,
        logp_diff_mean=abs_diff.sum() / n_tok,
        logp_diff_max=abs_diff.max() if abs_diff.numel() else none,
    )
    return weights, stats
