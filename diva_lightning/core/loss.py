"""PPO-clip policy loss with dual clip, KL and entropy terms (design.md section 6).

Per token t of response b, with ``ratio = exp(logp - old_logp)`` and advantage A:

    pg = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
    pg = min(pg, -A * dual_clip)            for A < 0 (dual clip; ``dual_clip=None`` turns it off)
    pg = w * pg                             with optional importance-sampling weights w (no gradient)
    loss = agg(pg) + kl_coef * agg(kl) - entropy_coef * agg(entropy)

Importance ratio level (``ratio_level``):

- ``"token"`` (PPO/GRPO): the ratio above, one per token.
- ``"sequence"`` (GSPO, Zheng et al. 2025, arXiv 2507.18071; TRL ``importance_sampling_level="sequence"``,
  verl ``loss_mode: gspo``): ``s_b = exp(mean_t(logp - old_logp))`` over the sequence's real tokens, used
  at every token of the sequence in the GSPO-token form ``sg[s_b] * exp(logp_t - sg[logp_t])``: its
  value is ``s_b`` and its gradient at token t is ``s_b * d logp_t``. With one advantage per sequence
  (and any of the aggregations below, which weigh the tokens of one sequence equally) value and
  gradient equal those of the sequence-level objective ``min(s_b A, clip(s_b) A)``. Deviations from
  verl's ``compute_policy_loss_gspo``: the dual clip still applies (pass ``dual_clip=None`` for the
  paper's loss) and the aggregation is the caller's choice (verl forces ``"seq_mean_token_mean"``).

``is_weights`` (Tensor[B, T] or Tensor[B]) multiplies the per-token policy-gradient term after
clipping, as TRL applies its vLLM importance-sampling ratio: use
:func:`diva_lightning.core.correction.importance_weights` to correct the mismatch between the rollout
engine and the trainer. Weights are detached; a weight of 0 silences a token but it still counts in
the ``"token_mean"`` denominator (as in TRL).

Truncated completions: :func:`truncation_mask` zeroes the mask rows of responses that hit the token
budget (TRL ``mask_truncated_completions``); pass its result as ``mask`` (and count ``num_tokens`` from
it). Under the sequence aggregations a zeroed row still counts in ``num_seqs`` (as in TRL).

Aggregations (``agg``) over the mask:

- ``"token_mean"``: sum over all tokens / number of tokens. Pass ``num_tokens`` = the token count of the
  whole optimizer mini-batch (all micro-batches, all ranks) and the micro-batch losses sum to the
  full-batch token mean, which makes gradient accumulation exact (DAPO / official default).
- ``"seq_mean_token_mean"``: per-sequence token mean, then mean over sequences (original GRPO).
- ``"seq_mean_token_sum_norm"``: per-sequence token sum / a constant ``max_len``, then mean over
  sequences (Dr.GRPO). Pass ``max_len = max_new_tokens`` (the generation budget): the default, T, is
  the padded width of this batch, which varies per step and per rank and re-weights the loss by the
  batch's longest completion.

For the sequence aggregations ``num_seqs`` plays the role of ``num_tokens`` (defaults to B).

Masked positions are removed with ``torch.where`` before any arithmetic, so inf/NaN there cannot reach
the loss or the gradient. The log-ratio is clamped to [-20, 20] (as verl) so that ``exp`` cannot
overflow: a clipped branch would otherwise multiply a zero gradient by inf and give NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# AGGS, KL_TYPES and RATIO_LEVELS are re-exported (``X as X``) for the callers that import them from here.
from diva_lightning.core.choices import AGGS as AGGS
from diva_lightning.core.choices import KL_TYPES as KL_TYPES
from diva_lightning.core.choices import RATIO_LEVELS as RATIO_LEVELS
from diva_lightning.core.choices import Agg, KlType, RatioLevel, check_choice

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
    agg: Agg = "token_mean",
    *,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
) -> Tensor:
    """Aggregate per-token values Tensor[B, T] over a bool mask Tensor[B, T] to a scalar.

    Masked entries are replaced by 0 with ``torch.where`` (not multiplied), so they can hold inf/NaN.
    """
    check_choice("agg", agg, Agg)
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


def truncation_mask(mask: Tensor, finished: Tensor) -> Tensor:
    """Drop the responses that hit the token budget (TRL ``mask_truncated_completions``).

    Args:
        mask: Tensor[B, T] bool or 0/1 completion mask.
        finished: Tensor[B] bool, True where the response ended by itself (EOS/stop) before the budget.

    Returns:
        Tensor[B, T] bool: ``mask`` with the rows of unfinished responses all False.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    if finished.shape != mask.shape[:1]:
        raise ValueError(f"finished must be [B] = [{mask.shape[0]}], got shape {tuple(finished.shape)}")
    if finished.dtype != torch.bool:
        raise ValueError(f"finished must be a bool tensor, got dtype {finished.dtype}")
    return mask.bool() & finished.unsqueeze(-1)


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


def _is_weights(is_weights: Tensor, m: Tensor, like: Tensor) -> Tensor:
    """Validate importance-sampling weights ([B] or [B, T]) and return them detached as [B, T], 1 off-mask."""
    if is_weights.shape not in (like.shape[:1], like.shape):
        raise ValueError(
            f"is_weights must be [B] or [B, T] = {tuple(like.shape)}, got shape {tuple(is_weights.shape)}"
        )
    w = is_weights.detach().to(like.dtype)
    w = w.unsqueeze(-1).expand_as(like) if w.dim() == 1 else w
    bad = m & ~(torch.isfinite(w) & (w >= 0))
    if bool(bad.any()):
        raise ValueError(
            f"is_weights must be finite and >= 0 on masked-in tokens; {int(bad.sum())} bad, "
            f"first at {bad.nonzero()[0].tolist()}"
        )
    return torch.where(m, w, torch.ones_like(w))


def _log_ratio(logp: Tensor, old_logp: Tensor, m: Tensor, ratio_level: str) -> tuple[Tensor, Tensor]:
    """Log importance ratio used by the loss and the per-token log-ratio, both Tensor[B, T], 0 off-mask.

    ``"token"``: ``clamp(logp - old_logp)``. ``"sequence"`` (GSPO-token): value ``clamp(mean_t(logp -
    old_logp))`` of the row at each of its tokens, gradient ``d logp_t`` (``logp - sg[logp]`` adds 0).
    """
    zeros = torch.zeros_like(logp)
    token_lr = torch.where(m, logp - old_logp, zeros).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    if ratio_level == "token":
        return token_lr, token_lr
    n = m.sum(dim=-1).clamp(min=1).to(logp.dtype)  # [B]
    seq_lr = (torch.where(m, logp - old_logp, zeros).sum(dim=-1) / n).detach()  # [B]
    seq_lr = seq_lr.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    lp = torch.where(m, logp, zeros)  # finite everywhere, so lp - lp.detach() is exactly 0
    return torch.where(m, seq_lr.unsqueeze(-1) + (lp - lp.detach()), zeros), token_lr


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip: float | None = 3.0,
    agg: Agg = "token_mean",
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: KlType = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    max_len: float | None = None,
    ratio_level: RatioLevel = "token",
    is_weights: Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """Clipped policy loss of one (micro-)batch (see module docstring).

    Args:
        logp: Tensor[B, T] log-probs of the sampled tokens under the current policy (with grad).
        old_logp: Tensor[B, T] log-probs under the rollout policy (no grad needed).
        advantages: Tensor[B] (one per sequence) or Tensor[B, T].
        mask: Tensor[B, T] bool or 0/1, True on completion tokens that count (see :func:`truncation_mask`).
        ref_logp: Tensor[B, T] reference log-probs; with ``kl_coef`` adds the KL term.
        entropy: Tensor[B, T] per-token entropy; with ``entropy_coef`` adds the bonus.
        num_tokens: global token count for ``"token_mean"`` under grad accumulation / several ranks.
        num_seqs: global sequence count for the ``seq_mean_*`` aggregations.
        max_len: the constant of ``"seq_mean_token_sum_norm"``: set it to ``max_new_tokens`` (default T,
            the padded width of this batch, which is not constant across steps and ranks).
        ratio_level: ``"token"`` (PPO/GRPO) or ``"sequence"`` (GSPO); one of ``RATIO_LEVELS``.
        is_weights: Tensor[B, T] or Tensor[B] importance-sampling weights (>= 0, finite on the mask)
            multiplying the clipped policy-gradient term; detached. None = all ones.

    Returns:
        (scalar loss with grad, :class:`PolicyLossStats`). Ratio statistics describe the ratio the loss
        used (the sequence ratio at each token for ``"sequence"``); ``approx_kl`` is always per token.
    """
    _check_inputs(logp, old_logp, advantages, mask)
    check_choice("kl_type", kl_type, KlType)
    check_choice("ratio_level", ratio_level, RatioLevel)
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

    log_ratio, token_log_ratio = _log_ratio(logp, old_logp, m, ratio_level)
    ratio = torch.exp(log_ratio)  # [B, T]; exactly 1 at masked positions
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    dual_active = torch.zeros_like(m)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = m & (adv < 0) & (pg > bound)
        pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)
    if is_weights is not None:
        pg = pg * _is_weights(is_weights, m, logp)

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
        tok_lr = token_log_ratio.detach()
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
            approx_kl=_masked_mean(torch.exp(tok_lr) - 1.0 - tok_lr, m),
        )
    return loss, stats
