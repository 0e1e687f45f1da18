"""``sdpa_varlen``: scaled-dot-product attention that attends within each packed sequence (issue 25 item 2).

Padding-free scoring packs several sequences into one row, told apart by text positions that restart at 0
(``models.logprobs.packed_logprobs``). Under transformers' ``sdpa`` such a row gets a dense block-causal mask of
``L x L`` and attention is computed across the whole row: quadratic in all its tokens, which is why the sdpa layout
used rows no longer than the longest sequence (and computed the rest of each row as padding). flash-attention's
varlen kernels attend within each sequence only, but they need CUDA and the flash-attn package.

This implementation, registered with transformers' public ``AttentionInterface`` / ``AttentionMaskInterface`` under
the name ``sdpa_varlen``, does what the varlen kernels do with plain sdpa calls: for a packed causal forward (text
positions given, no 2D attention mask, no cache) it finds each sequence from the positions and runs one causal sdpa
call per sequence, so attention costs ``sum(len_i^2)`` and one row needs no padding at all; no ``L x L`` mask is
built. Everything else (a left-padded batch, every decoding step with its KV cache, the vision tower, a padded
forward) goes to transformers' own sdpa unchanged, so the numbers there are identical; the prefill of unpadded
prompts arrives here as one causal segment per row, the same attention.

Shared prompts (issue 25 item 4). A segment whose text positions start at ``p0 > 0`` is a *continuation*: it
attends to the first ``p0`` tokens of the row's last segment that started at 0 (its *head*), then causally to
itself. ``packed_logprobs(share_prompt=True)`` lays out a prompt's G responses as ``[prompt + completion 1]
[completion 2] ... [completion G]``, each completion's positions starting at the prompt's length: every completion
then sees the one computation of its prompt, exactly as if the prompt were repeated before it (same attention
inputs, so equal log-probs; the prompt's gradient is the sum over its completions, as with copies). Only this
implementation reads the layout that way: transformers' masks would cut continuations off their prompt, which is
why :func:`varlen_calls` lets a caller check that a forward went through here.

Cost: the attention of each segment is one bucketed sdpa call (sequences of similar length padded to the
bucket's longest, :func:`length_buckets`); a bucket holding continuations passes an explicit mask (bottom-right
causal after the prefix), one without uses sdpa's own causal kernel.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

VARLEN = "sdpa_varlen"
# attention implementations whose packed forward attends within each sequence: padding-free scoring can put all of
# a micro-batch's sequences in one row (no padded position at all)
ONE_ROW_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", VARLEN)
# a length bucket takes sequences of at least this share of its longest: attention padding <= 1 / 0.8**2 - 1 = 56%
# of the bucket's attention in the worst case (measured on the benchmark's long tail: see docs/update.md)
BUCKET_RATIO = 0.8


def packs_in_one_row(attn_implementation: str | None) -> bool:
    """Whether packed scoring should use one row per forward under this attention implementation."""
    return attn_implementation in ONE_ROW_IMPLEMENTATIONS


def sequence_bounds(text_positions: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of the packed sequences of one row: a sequence starts where the text position does
    not follow the previous one by 1 (transformers' own packed-sequence rule), and at 0."""
    steps = torch.diff(text_positions) != 1
    starts = [0, *(steps.nonzero().flatten() + 1).tolist()]
    return list(zip(starts, [*starts[1:], int(text_positions.numel())], strict=True))


def _packed_causal(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: Any,
                   position_ids: torch.Tensor | None, sliding_window: int | None, is_causal: bool | None) -> bool:
    """A forward this implementation handles itself: causal, positions given, no mask, no cache, no window."""
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    return (attention_mask is None and position_ids is not None and position_ids.dim() == 2
            and query.shape[2] == key.shape[2] and sliding_window is None and bool(causal))


def length_buckets(lengths: list[int], ratio: float = BUCKET_RATIO) -> list[list[int]]:
    """Sequence indices grouped for one attention call each: longest first, a bucket takes sequences at least
    ``ratio`` times its longest, so right-padding a bucket to its longest costs at most ``1 / ratio**2`` of its
    attention (the linear layers never see the padding)."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if buckets and lengths[i] >= ratio * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


# forwards served by the packed path while a `varlen_calls` block is open (None: nobody is counting)
_SERVED: ContextVar[list[int] | None] = ContextVar("diva_sdpa_varlen_served", default=None)


@contextmanager
def varlen_calls() -> Iterator[list[int]]:
    """Count the attention calls this implementation serves on its packed path inside the block (one entry per
    call): a caller whose layout only this implementation understands checks the list is not empty."""
    served: list[int] = []
    token = _SERVED.set(served)
    try:
        yield served
    finally:
        _SERVED.reset(token)


def _segments(position_ids: torch.Tensor, width: int) -> list[tuple[int, int, int, int]]:
    """``(start, length, prefix, head)`` of every segment of every row, starts flat over ``[B * L]``: ``prefix``
    tokens of the head segment starting at flat position ``head`` come before the segment (0 for a head)."""
    out = []
    positions = position_ids.cpu()  # one device-to-host copy per forward
    for b in range(positions.shape[0]):
        row = positions[b]
        head_start, head_len = 0, 0
        for s, e in sequence_bounds(row):
            p0 = int(row[s])
            if p0 == 0:
                head_start, head_len = b * width + s, e - s
            elif p0 > head_len:
                raise ValueError(f"packed row {b}: a segment at {s} continues a prompt of {p0} tokens, but the "
                                 f"segment it follows has {head_len} (shared-prompt layout broken)")
            out.append((b * width + s, e - s, p0, head_start))
    return out


@dataclass
class _Bucket:
    """One sdpa call: ``n`` segments, their query slots right-padded to the longest (``real`` marks the real ones),
    their key slots (a continuation's: its prompt's, then its own) and what the mask is made from."""

    q_index: torch.Tensor  # [n, longest] flat token of each query slot
    k_index: torch.Tensor  # [n, keys] flat token of each key slot
    last_key: torch.Tensor | None  # [n, longest] the last key slot each query slot sees (None: plain causal)
    real: torch.Tensor  # [n, longest] bool

    def mask(self) -> torch.Tensor | None:
        """[n, 1, longest, keys] bool (built per call, not kept: it is the size of the bucket's attention)."""
        if self.last_key is None:
            return None
        slots = torch.arange(self.k_index.shape[1], device=self.k_index.device)
        return (slots[None, None, :] <= self.last_key[:, :, None])[:, None]


@dataclass
class _Plan:
    buckets: list[_Bucket]
    order: torch.Tensor  # [B * L]: where each flat token's output is among the buckets' concatenated real outputs


def _bucket(segments: list[tuple[int, int, int, int]], device: torch.device) -> _Bucket:
    start, size, prefix, head = (torch.tensor([seg[f] for seg in segments], device=device)[:, None] for f in range(4))
    longest = max(seg[1] for seg in segments)
    step = torch.arange(longest, device=device)[None]
    # a padded query slot repeats its segment's last token: its output is dropped, and no real query attends to it
    last = torch.minimum(step, size - 1)
    q_index = start + last
    if max(seg[2] for seg in segments) == 0:  # prompts / whole sequences: keys are the queries, plain causal
        return _Bucket(q_index=q_index, k_index=q_index, last_key=None, real=step < size)
    # continuations: keys are the head's first `prefix` tokens, then the segment's own; query slot a sees key slots
    # j <= prefix + a (bottom-right causal after the prefix)
    slots = torch.arange(max(seg[1] + seg[2] for seg in segments), device=device)[None]
    own = start + torch.clamp(slots - prefix, min=0).minimum(size - 1)
    k_index = torch.where(slots < prefix, head + slots, own)
    return _Bucket(q_index=q_index, k_index=k_index, last_key=prefix + last, real=step < size)


# the plan of the last packed forward: every layer of one forward gets the same position tensor, so the segments
# and index tensors are computed once per forward (and once more if gradient checkpointing recomputes it)
_LAST_PLAN: list[Any] = [None, None, None]  # [weakref to the position tensor, (width, device), _Plan]


def _plan(position_ids: torch.Tensor, width: int, device: torch.device) -> _Plan:
    ref, key, plan = _LAST_PLAN
    if ref is not None and ref() is position_ids and key == (width, device):
        return plan  # type: ignore[no-any-return]
    segments = _segments(position_ids, width)
    heads = [i for i, seg in enumerate(segments) if seg[2] == 0]
    continuations = [i for i, seg in enumerate(segments) if seg[2] > 0]
    buckets = []
    for members in (heads, continuations):  # a continuation's bucket needs a mask: prompts keep the causal kernel
        for bucket in length_buckets([segments[i][1] for i in members]):
            buckets.append(_bucket([segments[members[i]] for i in bucket], device))
    place = torch.cat([b.q_index[b.real] for b in buckets])
    order = torch.empty_like(place)
    order[place] = torch.arange(place.numel(), device=device)  # every flat token is in exactly one segment
    plan = _Plan(buckets=buckets, order=order)
    _LAST_PLAN[:] = [weakref.ref(position_ids), (width, device), plan]
    return plan


def varlen_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, *, position_ids: torch.Tensor | None = None,
                        scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
                        is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: query [B, H, L, D], key/value [B, H_kv, L, D] -> ([B, L, H, D], None).

    A packed causal forward: the segments (of every row) are gathered into length buckets (prompts and whole
    sequences apart from continuations), each right-padded to its longest and attended in one sdpa call (causal: a
    real token never sees the padding after it; a continuation: its prompt, then causal, by an explicit mask), and
    the real tokens' outputs are put back in place: gathers whose backward is an index-add."""
    if not _packed_causal(module, query, key, attention_mask, position_ids, sliding_window, is_causal):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, position_ids=position_ids, is_causal=is_causal,
                                      **kwargs)
    assert position_ids is not None
    served = _SERVED.get()
    if served is not None:
        served.append(1)
    batch, heads, width, dim = query.shape
    if position_ids.shape[0] != batch:  # one row of positions for every row of the batch
        position_ids = position_ids.expand(batch, -1)
    plan = _plan(position_ids, width, query.device)
    # [B * L, heads, D]: every token of every row, row-major
    q, k, v = (t.transpose(1, 2).reshape(batch * width, t.shape[1], dim) for t in (query, key, value))
    outputs = []
    for b in plan.buckets:
        qb = q.index_select(0, b.q_index.flatten()).view(*b.q_index.shape, heads, dim).transpose(1, 2)
        kb, vb = (t.index_select(0, b.k_index.flatten()).view(*b.k_index.shape, t.shape[1], dim).transpose(1, 2)
                  for t in (k, v))
        mask = b.mask()
        gqa = kb.shape[1] != heads
        if gqa and mask is not None and query.is_cuda:
            # CUDA's fused kernels take grouped-query attention only without a mask (else the math kernel runs)
            kb, vb = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (kb, vb))
            gqa = False
        out = torch.nn.functional.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling, enable_gqa=gqa)
        outputs.append(out.transpose(1, 2)[b.real])  # [real tokens of the bucket, heads, D]
    return torch.cat(outputs).index_select(0, plan.order).view(batch, width, heads, dim), None


def varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, q_length: int | None = None,
                kv_length: int | None = None, **kwargs: Any) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` function: no mask for a causal forward without a 2D mask, cache or local window
    (the attention function finds the sequences from the positions), transformers' sdpa mask otherwise."""
    if attention_mask is None and q_length == kv_length and not kwargs.get("q_offset") \
            and kwargs.get("local_size") is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length,  # type: ignore[misc]
                     **kwargs)


def register() -> None:
    """Make ``attn_implementation="sdpa_varlen"`` known to transformers (idempotent; ``load_policy`` calls it)."""
    AttentionInterface.register(VARLEN, varlen_sdpa_forward)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
