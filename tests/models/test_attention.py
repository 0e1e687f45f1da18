"""``sdpa_varlen`` (models.attention): attention within each packed sequence, transformers' sdpa everywhere else.

Three ways: hand-worked sequence bounds; a property against an independent reference (softmax attention under an
explicit block-causal mask, written out here) for random packings, head counts and grouped-query attention; and the
real tiny model, where a padded forward and generation give exactly what transformers' sdpa gives.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diva_lightning.data.schema import decode_image
from diva_lightning.data.world import generate_world
from diva_lightning.models.attention import (
    VARLEN,
    packs_in_one_row,
    sequence_bounds,
    varlen_calls,
    varlen_sdpa_forward,
)
from diva_lightning.models.logprobs import completion_logprobs
from diva_lightning.models.policy import load_policy
from diva_lightning.rollout.hf import HFGenerateEngine
from diva_lightning.training.config import PolicyConfig


def test_sequence_bounds_hand_worked() -> None:
    # sequences of 3, 2 and 1 tokens; a sequence of one token at position 0 right after another one
    assert sequence_bounds(torch.tensor([0, 1, 2, 0, 1, 0])) == [(0, 3), (3, 5), (5, 6)]
    assert sequence_bounds(torch.tensor([0, 0, 0])) == [(0, 1), (1, 2), (2, 3)]
    assert sequence_bounds(torch.tensor([0, 1, 2, 3])) == [(0, 4)]
    # the tail of a row packed to a width is a segment of its own (positions restart at 0)
    assert sequence_bounds(torch.tensor([0, 1, 2, 0, 1])) == [(0, 3), (3, 5)]


class _Causal(torch.nn.Module):
    is_causal = True


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_of: torch.Tensor, scale: float
               ) -> torch.Tensor:
    """Softmax attention under an explicit block-causal mask, [B, H, L, D] -> [B, L, H, D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    idx = torch.arange(q.shape[2])
    allowed = (idx[None, :] <= idx[:, None])[None] & (seq_of[:, :, None] == seq_of[:, None, :])  # [B, L, L]
    scores = scores.masked_fill(~allowed[:, None], -math.inf)
    return (scores.softmax(-1) @ v).transpose(1, 2)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=4), min_size=1, max_size=3),
       kv_heads=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_packed_rows_attend_within_each_sequence(lengths: list[list[int]], kv_heads: int, groups: int,
                                                 seed: int) -> None:
    width = max(sum(row) for row in lengths)
    positions = torch.zeros((len(lengths), width), dtype=torch.long)
    seq_of = torch.full((len(lengths), width), -1, dtype=torch.long)
    label = 0
    for b, row in enumerate(lengths):
        used = 0
        for n in [*row, width - sum(row)]:  # the row's tail: a segment of its own, as packed_logprobs lays it out
            positions[b, used : used + n] = torch.arange(n)
            seq_of[b, used : used + n] = label
            used, label = used + n, label + 1
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lengths), kv_heads * groups, width, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(len(lengths), kv_heads, width, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out, weights = varlen_sdpa_forward(_Causal(), q, k, v, None, position_ids=positions, scaling=0.3)
    assert weights is None and out.shape == (len(lengths), width, kv_heads * groups, 8)
    torch.testing.assert_close(out, _reference(q, k, v, seq_of, 0.3), atol=1e-10, rtol=1e-10)


@settings(max_examples=30, deadline=None)
@given(groups=st.lists(st.tuples(st.integers(1, 6), st.lists(st.integers(1, 5), min_size=1, max_size=3)),
                       min_size=1, max_size=3),
       kv_heads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_continuations_attend_to_their_prompt_then_to_themselves(groups: list[tuple[int, list[int]]],
                                                                  kv_heads: int, seed: int) -> None:
    """Shared-prompt layout, one row: [prompt + completion 1][completion 2]... per group; the reference is softmax
    attention under an explicit mask (a continuation token sees its group's prompt and its own earlier tokens)."""
    width = sum(p + sum(rs) for p, rs in groups)
    positions = torch.zeros((1, width), dtype=torch.long)
    allowed = torch.zeros((1, width, width), dtype=torch.bool)
    used = 0
    for prompt, completions in groups:
        head = used
        for j, r in enumerate(completions):
            size = prompt + r if j == 0 else r
            first = prompt if j else 0  # text position of the segment's first token
            positions[0, used : used + size] = first + torch.arange(size)
            for a in range(size):
                allowed[0, used + a, used : used + a + 1] = True  # causal within the segment
                if j:
                    allowed[0, used + a, head : head + prompt] = True  # ... after the group's prompt
            used += size
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2 * kv_heads, width, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, kv_heads, width, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out, _ = varlen_sdpa_forward(_Causal(), q, k, v, None, position_ids=positions, scaling=0.3)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = ((q @ kk.transpose(-1, -2)) * 0.3).masked_fill(~allowed[:, None], -math.inf)
    torch.testing.assert_close(out, (scores.softmax(-1) @ vv).transpose(1, 2), atol=1e-10, rtol=1e-10)


def test_a_continuation_without_its_prompt_is_refused() -> None:
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="continues a prompt of 3 tokens"):
        varlen_sdpa_forward(_Causal(), q, q, q, None, position_ids=torch.tensor([[0, 1, 3, 4]]))


def test_share_prompt_is_refused_where_it_cannot_work() -> None:
    """Only sdpa_varlen on the padding-free path lets a response attend to a prompt computed once."""
    assert PolicyConfig(share_prompt=True).check() == []
    for cfg in (PolicyConfig(share_prompt=True, attn_implementation="sdpa"),
                PolicyConfig(share_prompt=True, attn_implementation="flash_attention_2"),
                PolicyConfig(share_prompt=True, attn_implementation="sdpa_varlen", padding_free=False)):
        assert any("policy_config.share_prompt needs" in p for p in cfg.check()), cfg
    assert PolicyConfig(attn_implementation="sdpa").shares_prompt() is False  # null: off where it cannot work
    assert PolicyConfig().shares_prompt() is True


def test_the_default_policy_config_packs_in_one_row() -> None:
    assert PolicyConfig().attention() == VARLEN and packs_in_one_row(PolicyConfig().attention())
    assert PolicyConfig(padding_free=False).attention() is None  # the padded path: transformers' choice
    assert PolicyConfig(attn_implementation="sdpa").attention() == "sdpa"  # rows of the longest sequence
    assert not packs_in_one_row("sdpa") and not packs_in_one_row("eager")
    assert packs_in_one_row("flash_attention_2")


def test_outside_packed_forwards_it_is_transformers_sdpa(tiny_policy_dir: str) -> None:
    """Left-padded scoring and sampled generation (KV cache) give exactly what sdpa gives; so does the generation
    of one unpadded prompt, whose prefill is one causal segment per row on the packed path."""
    sdpa, varlen = (load_policy(tiny_policy_dir, attn_implementation=a) for a in ("sdpa", VARLEN))
    records = generate_world(3, seed=1, split="train")
    inputs = sdpa.encode([r.problem for r in records], [[decode_image(r.images[0])] for r in records])
    engine = HFGenerateEngine()
    rolls = [engine.generate(b, inputs, num_generations=2, max_new_tokens=12, seed=3) for b in (sdpa, varlen)]
    assert torch.equal(rolls[0].completion_ids, rolls[1].completion_ids)
    one = sdpa.encode([records[0].problem], [[decode_image(records[0].images[0])]])
    with varlen_calls() as served:
        single = [engine.generate(b, one, num_generations=3, max_new_tokens=12, seed=4) for b in (sdpa, varlen)]
    assert torch.equal(single[0].completion_ids, single[1].completion_ids)
    assert served  # the unpadded prefill did take the packed path
    roll = rolls[0]
    with torch.no_grad():
        a, b = (completion_logprobs(m.model, inputs, roll.completion_ids, roll.completion_mask,
                                    prompt_index=roll.prompt_index)[0] for m in (sdpa, varlen))
    assert torch.equal(a, b)
