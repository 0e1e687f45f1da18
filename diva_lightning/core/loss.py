"""PPO-clip policy loss with dual clip, KL and entropy terms (design.md section 6).

Per token t of response b, with ``ratio = exp(logp - old_logp)`` and advantage A:

    pg = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
    pg = min(pg, -A * dual_clip)            for A < 0 (dual clip; ``dual_clip=None`` turns it off)
    loss = agg(pg) + kl_coef * agg(kl) - entropy_coef * agg(entropy)

Aggregations (``agg``) over the mask:

- ``"token_mean"``: sum over all tokens / number of tokens. Pass ``num_tokens`` = the token count of the
  whole optimizer mini-batch (all micro-batches, all ranks) and the micro-batch losses sum to the
  full-batch token mean, which makes gradient accumulation exact (DAPO / official default).
- ``"seq_mean_token_mean"``: per-sequence token mean, then mean over sequences (original GRPO).
- ``"seq_mean_token_sum_norm"``: per-sequence token sum / a constant ``max_len`` (default T), then mean
  over sequences (Dr.GRPO).

For the sequence aggregations ``num_seqs`` plays the role of ``num_tokens`` (defaults to B).

Masked positions are removed with ``torch.where`` before any arithmetic, so inf/NaN there cannot reach
the loss or the gradient. The log-ratio is clamped to [-20, 20] (as verl) so that ``exp`` cannot
overflow: a clipped branch would otherwise multiply a zero gradient by inf and give NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diva_lightning.core._checks import check_choice

AGGS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_TYPES: tuple[str, ...] = ("k1", "k3", "low_var_kl")
_LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class PolicyLossStats:
    """Detached scalar float tensors describing one loss evaluation (token fractions over the mask).

    Attributes:
        pg_loss: aggregated policy-gradient term.
        clip_frac_low: fraction of tokens with A < 0 and ratio < 1 - clip_low (TRL ``clip_ratio/low``).
        clip_frac_high: fraction of tokens with A > 0 and ratio > 1 + clip_high (TRL ``clip_ratio/high``).
        dual_clip_frac: fraction of tokens where the dual clip bound was active.
        ratio_mean, ratio_max: of the importance ratio over real tokens.
        kl: aggregated KL to the reference policy, or None without ``ref_logp``.
        entropy: aggregated entropy, or None without ``entropy``.
        approx_kl: token mean of ``(ratio - 1) - log(ratio)`` (k3 estimate of KL(old || new)).
    """

    pg_loss: Tensor
    clip_frac_low: Tensor
    clip_frac_high: Tensor
    dual_clip_frac: Tensor
    ratio_mean: Tensor
    ratio_max: Tensor
    kl: Tensor | None
    entropy: Tensor | None
    approx_kl: Tensor


def aggregate(
    values: Tensor,
    mask: Tensor,
    agg: str = "token_mean",
    *,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
) -> Tensor:
    """Aggregate per-token values Tensor[B, T] over a bool mask Tensor[B, T] to a scalar.

    Masked entries are replaced by 0 with ``torch.where`` (not multiplied), so they can hold inf/NaN.
    """
    check_choice("agg", agg, AGGS)
    v = torch.where(mask, values, torch.zeros_like(values))
    if agg == "token_mean":
        denom = float(num_tokens) if num_tokens is not None else max(1.0, float(mask.sum()))
        return v.sum() / denom
    per_seq = v.sum(dim=-1)  # [B]
    if agg == "seq_mean_token_mean":
        per_seq = per_seq / mask.sum(dim=-1).clamp(min=1).to(v.dtype)
    else:
        per_seq = per_seq / float(max_len if max_len is not None else values.shape[-1])
    denom = float(num_seqs) if num_seqs is not None else max(1.0, float(per_seq.shape[0]))
    return per_seq.sum() / denom


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def _check_inputs(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logp shape {tuple(logp.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"advantages must be [B] or [B, T] = {tuple(logp.shape)}, got shape {tuple(advantages.shape)}"
        )


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip: float | None = 3.0,
    agg: str = "token_mean",
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """Clipped policy loss of one (micro-)batch (see module docstring).

    Args:
        logp: Tensor[B, T] log-probs of the sampled tokens under the current policy (with grad).
        old_logp: Tensor[B, T] log-probs under the rollout policy (no grad needed).
        advantages: Tensor[B] (one per sequence) or Tensor[B, T].
        mask: Tensor[B, T] bool or 0/1, True on completion tokens that count.
        ref_logp: Tensor[B, T] reference log-probs; with ``kl_coef`` adds the KL term.
        entropy: Tensor[B, T] per-token entropy; with ``entropy_coef`` adds the bonus.
        num_tokens: global token count for ``"token_mean"`` under grad accumulation / several ranks.
        num_seqs: global sequence count for the ``seq_mean_*`` aggregations.
        max_len: the constant of ``"seq_mean_token_sum_norm"`` (default T).

    Returns:
        (scalar loss with grad, :class:`PolicyLossStats`).
    """
    _check_inputs(logp, old_logp, advantages, mask)
    check_choice("kl_type", kl_type, KL_TYPES)
    for name, value in (("num_tokens", num_tokens), ("num_seqs", num_seqs), ("max_len", max_len)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    m = mask.bool()
    adv = advantages.to(logp.dtype)
    adv = adv.unsqueeze(-1).expand_as(logp) if adv.dim() == 1 else adv
    adv = torch.where(m, adv, torch.zeros_like(adv))
    zeros = torch.zeros_like(logp)

    log_ratio = torch.where(m, logp - old_logp, zeros).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # [B, T]; exactly 1 at masked positions
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    dual_active = torch.zeros_like(m)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = m & (adv < 0) & (pg > bound)
        pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)

    kw = {"num_tokens": num_tokens, "num_seqs": num_seqs, "max_len": max_len}
    pg_loss = aggregate(pg, m, agg, **kw)
    loss = pg_loss
    kl_value: Tensor | None = None
    if ref_logp is not None:
        if ref_logp.shape != logp.shape:
            raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} != logp shape {tuple(logp.shape)}")
        diff = torch.where(m, logp - ref_logp, zeros)  # log(pi / pi_ref)
        kl_tok = diff if kl_type == "k1" else torch.exp(-diff) + diff - 1.0
        kl_value = aggregate(kl_tok, m, agg, **kw)
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl_value
    ent_value: Tensor | None = None
    if entropy is not None:
        if entropy.shape != logp.shape:
            raise ValueError(f"entropy shape {tuple(entropy.shape)} != logp shape {tuple(logp.shape)}")
        ent_value = aggregate(entropy, m, agg, **kw)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * ent_value

    with torch.no_grad():
        r = ratio.detach()
        stats = PolicyLossStats(
            pg_loss=pg_loss.detach(),
            clip_frac_low=_masked_mean(((r < 1.0 - clip_low) & (adv < 0)).to(r.dtype), m),
            clip_frac_high=_masked_mean(((r > 1.0 + clip_high) & (adv > 0)).to(r.dtype), m),
            dual_clip_frac=_masked_mean(dual_active.to(r.dtype), m),
            ratio_mean=_masked_mean(r, m),
            ratio_max=torch.where(m, r, torch.full_like(r, -torch.inf)).max()
            if bool(m.any())
            else r.new_ones(()),
            kl=None if kl_value is None else kl_value.detach(),
            entropy=None if ent_value is None else ent_value.detach(),
            approx_kl=_masked_mean((r - 1.0) - log_ratio.detach(), m),
        )
    return loss, stats
