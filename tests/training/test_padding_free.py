"""Padding-free scoring and token-budget micro-batches equal the padded path (issue 25 items 2 and 3).

On the real tiny model, with image and text-only prompts and responses of different lengths: packed log-probs,
entropies and gradients equal ``completion_logprobs``; a token-budget PPO update gives the losses, statistics and
gradients of one padded forward over the whole mini-batch for every loss aggregation (GSPO and Dr.GRPO included);
each distinct image runs through the vision tower once per forward.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from diva_lightning.data.schema import decode_image
from diva_lightning.data.world import generate_world
from diva_lightning.models.logprobs import (
    _first_fit,
    completion_logprobs,
    packed_logprobs,
    sequence_lengths,
    step_images,
    vl_model,
)
from diva_lightning.models.policy import PolicyBundle, load_policy
from diva_lightning.rollout.hf import HFGenerateEngine
from diva_lightning.training.config import LossConfig
from diva_lightning.training.ppo import PPOUpdate, UpdateBatch, token_budget_partition
from tests.helpers.update_hooks import RecordingHooks

G = 3


@pytest.fixture(scope="module")
def setup(tiny_policy_dir: str) -> tuple[PolicyBundle, dict[str, Tensor], object]:
    """3 prompts (the middle one text-only) x G responses of 1 .. 200 tokens, so that padding would show."""
    bundle = load_policy(tiny_policy_dir)
    records = generate_world(3, seed=0, split="train")
    problems = [r.problem for r in records]
    images = [[decode_image(r.images[0])] for r in records]
    problems[1], images[1] = problems[1].replace("<image>", ""), []
    inputs = bundle.encode(problems, images)
    roll = HFGenerateEngine().generate(bundle, inputs, num_generations=G, max_new_tokens=10, seed=0)
    # one long response (sampled tokens repeated to 200): packing then puts several short ones in one row
    roll.completion_ids = roll.completion_ids.repeat(1, 20)
    lengths = torch.tensor([200, 3, 7, 1, 9, 5, 2, 10, 4])
    roll.completion_mask = (torch.arange(200)[None] < lengths[:, None]).long()
    return bundle, inputs, roll


def _grads(model: torch.nn.Module) -> dict[str, Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_close(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    """Equal up to float32 summation order: within 1e-5 of each tensor's largest entry (measured: ~1e-6)."""
    assert a.keys() == b.keys() and a
    for name in a:
        scale = float(b[name].abs().max())
        assert float((a[name] - b[name]).abs().max()) <= 1e-5 * scale + 1e-9, name


@pytest.mark.parametrize(("pack", "width", "attention", "share"), [
    (True, None, "sdpa", False), (True, 1 << 30, "sdpa", False), (False, None, "sdpa", False),
    (True, 1 << 30, "sdpa_varlen", False), (True, None, "sdpa_varlen", False), (True, 1 << 30, "sdpa_varlen", True),
    (True, None, "sdpa_varlen", True)])
def test_packed_scores_and_gradients_equal_the_padded_path(setup: tuple, pack: bool, width: int | None,
                                                           attention: str, share: bool) -> None:
    """Packed rows of the longest sequence, everything in one row (the layout of flash-attention and of
    sdpa_varlen, the default), or right-padded; each prompt once for its responses (share_prompt); the padded
    reference always under sdpa."""
    bundle, inputs, roll = setup
    model = bundle.model
    kw = {"prompt_index": roll.prompt_index, "with_entropy": True, "temperature": 0.7}
    ref, ref_ent = completion_logprobs(model, inputs, roll.completion_ids, roll.completion_mask, **kw)
    (ref.sum() + ref_ent.sum()).backward()
    want = _grads(model)
    model.set_attn_implementation(attention)
    try:
        logp, ent = packed_logprobs(model, inputs, roll.completion_ids, roll.completion_mask, pack=pack,
                                    pack_width=width, share_prompt=share, **kw)
    finally:
        model.set_attn_implementation("sdpa")
    (logp.sum() + ent.sum()).backward()
    torch.testing.assert_close(logp, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=2e-6, rtol=1e-5)
    assert torch.equal(logp == 0, roll.completion_mask == 0)  # 0 exactly where nothing was scored
    _assert_close(_grads(model), want)


def test_a_shared_prompt_with_empty_completions_equals_the_padded_path(setup: tuple) -> None:
    """Zero-length completions (the first of a prompt's too) score nothing and shift nothing."""
    bundle, inputs, roll = setup
    model = bundle.model
    mask = roll.completion_mask.clone()
    mask[[0, 3, 4]] = 0  # the first response of prompt 0, and of prompt 1, and another
    kw = {"prompt_index": roll.prompt_index, "with_entropy": True}
    ref, _ = completion_logprobs(model, inputs, roll.completion_ids, mask, **kw)
    ref.sum().backward()
    want = _grads(model)
    model.set_attn_implementation("sdpa_varlen")
    try:
        logp, _ = packed_logprobs(model, inputs, roll.completion_ids, mask, pack_width=1 << 30, share_prompt=True,
                                  **kw)
    finally:
        model.set_attn_implementation("sdpa")
    logp.sum().backward()
    torch.testing.assert_close(logp, ref, atol=2e-6, rtol=1e-5)
    assert torch.equal(logp == 0, mask == 0)
    _assert_close(_grads(model), want)


def test_a_shared_prompt_needs_sdpa_varlen(setup: tuple) -> None:
    """Under sdpa the completions after the first would not see their prompt: refused, not silently wrong."""
    bundle, inputs, roll = setup
    with pytest.raises(ValueError, match="sdpa_varlen"), torch.no_grad():
        packed_logprobs(bundle.model, inputs, roll.completion_ids, roll.completion_mask,
                        prompt_index=roll.prompt_index, pack_width=1 << 30, share_prompt=True)


def test_packing_puts_short_sequences_in_one_row(setup: tuple) -> None:
    _, inputs, roll = setup
    sizes = sequence_lengths(inputs, roll.prompt_index, roll.completion_mask).tolist()
    rows = _first_fit(sizes, max(sizes))
    assert sorted(i for r in rows for i in r) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in r) <= max(sizes) for r in rows)
    assert len(rows) < len(sizes)  # several sequences share a row: the equality test above covers packed rows


def test_step_images_and_the_dummy_image_change_nothing(setup: tuple) -> None:
    bundle, inputs, roll = setup
    model = bundle.model
    args = (model, inputs, roll.completion_ids, roll.completion_mask)
    with torch.no_grad():
        ref, _ = packed_logprobs(*args, prompt_index=roll.prompt_index)
        shared, _ = packed_logprobs(*args, prompt_index=roll.prompt_index, images=step_images(model, inputs))
    torch.testing.assert_close(shared, ref, atol=1e-6, rtol=1e-6)
    # a text-only call with sync_vision runs the tower on a dummy image, whose gradient is exactly zero
    rows = (roll.prompt_index == 1).nonzero().flatten()
    plain, _ = packed_logprobs(model, inputs, roll.completion_ids[rows], roll.completion_mask[rows],
                               prompt_index=roll.prompt_index[rows])
    plain.sum().backward()
    g_plain = _grads(model)
    synced, _ = packed_logprobs(model, inputs, roll.completion_ids[rows], roll.completion_mask[rows],
                                prompt_index=roll.prompt_index[rows], sync_vision=True)
    synced.sum().backward()
    g_synced = _grads(model)
    torch.testing.assert_close(synced, plain, atol=0, rtol=0)
    vision = {n for n in g_synced if ".visual." in n or n.startswith("visual.")}
    assert vision and not vision & g_plain.keys()  # the tower ran and got a gradient ...
    assert all(float(g_synced[n].abs().max()) == 0.0 for n in vision)  # ... of zero
    _assert_close({n: g for n, g in g_synced.items() if n not in vision}, g_plain)


def test_each_distinct_image_is_encoded_once(setup: tuple) -> None:
    bundle, inputs, roll = setup
    model = bundle.model
    rows_seen: list[int] = []
    hook = vl_model(model).visual.patch_embed.register_forward_hook(lambda m, a, o: rows_seen.append(a[0].shape[0]))
    try:
        with torch.no_grad():
            packed_logprobs(model, inputs, roll.completion_ids, roll.completion_mask, prompt_index=roll.prompt_index)
            distinct = int(inputs["image_grid_thw"].prod(-1).sum())
            assert rows_seen == [distinct]  # 2 images for 6 image responses: once each
            rows_seen.clear()
            completion_logprobs(model, inputs, roll.completion_ids, roll.completion_mask,
                                prompt_index=roll.prompt_index)
            assert rows_seen == [G * distinct]  # the padded path encodes each image once per response
            rows_seen.clear()
            HFGenerateEngine().generate(bundle, inputs, num_generations=G, max_new_tokens=2, seed=0)
            assert rows_seen == [distinct]  # generation too: G responses share their prompt's features
    finally:
        hook.remove()


def _batch(inputs: dict[str, Tensor], roll: object) -> UpdateBatch:
    g = torch.Generator().manual_seed(1)
    mask = roll.completion_mask.bool()  # type: ignore[attr-defined]
    return UpdateBatch(advantages=torch.randn(mask.shape[0], generator=g), mask=mask,
                       old_logp=-torch.rand(mask.shape, generator=g) * mask,
                       ref_logp=-torch.rand(mask.shape, generator=g) * mask,
                       seq_lens=sequence_lengths(inputs, roll.prompt_index, roll.completion_mask),  # type: ignore[attr-defined]
                       groups=roll.prompt_index)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("agg", "ratio_level", "max_len"), [
    ("token_mean", "token", 10), ("seq_mean_token_mean", "token", 10), ("seq_mean_token_sum_norm", "token", 10),
    ("seq_mean_token_sum_norm", "token", None), ("token_mean", "sequence", 10), ("seq_mean_token_mean", "sequence", 10),
])
def test_token_budget_update_equals_one_padded_forward(setup: tuple, agg: str, ratio_level: str,
                                                       max_len: int | None) -> None:
    """Aggregation over a token budget does not change what a token weighs: same loss, statistics, gradients."""
    bundle, inputs, roll = setup
    loss = LossConfig(agg=agg, ratio_level=ratio_level, entropy_coef=0.01, kl_coef=0.05)
    ref_hooks = RecordingHooks(bundle, inputs, roll, packed=False)
    want = PPOUpdate(loss, max_len=max_len).run(_batch(inputs, roll), ref_hooks, generator=torch.Generator())
    hooks = RecordingHooks(bundle, inputs, roll, packed=True)
    budget = 300  # two or three responses per forward (sequences are 94-129 tokens here, one 312)
    got = PPOUpdate(loss, max_len=max_len, max_tokens_per_micro_batch=budget).run(
        _batch(inputs, roll), hooks, generator=torch.Generator())
    assert len(ref_hooks.forwards) == 1 and len(hooks.forwards) > 2 and max(map(len, hooks.forwards)) > 1
    lens = _batch(inputs, roll).seq_lens.tolist()  # type: ignore[union-attr]
    assert all(sum(lens[r] for r in rows) <= budget or len(rows) == 1 for rows in hooks.forwards)
    assert want.keys() == got.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    _assert_close(hooks.steps[0], ref_hooks.steps[0])


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum_norm"])
def test_a_shared_prompt_budget_counts_each_prompt_once(setup: tuple, agg: str) -> None:
    """With shared prompts a forward holds each prompt once, and so does the budget: fewer, fuller micro-batches,
    and still the loss, statistics and gradients of one padded forward."""
    bundle, inputs, roll = setup
    loss = LossConfig(agg=agg, entropy_coef=0.01, kl_coef=0.05)
    ref_hooks = RecordingHooks(bundle, inputs, roll, packed=False)
    want = PPOUpdate(loss, max_len=10).run(_batch(inputs, roll), ref_hooks, generator=torch.Generator())
    batch = _batch(inputs, roll)
    batch.shared_prompt_lens = inputs["attention_mask"].sum(dim=1)[roll.prompt_index]
    hooks = RecordingHooks(bundle, inputs, roll, packed=True, share=True)
    budget = 300
    got = PPOUpdate(loss, max_len=10, max_tokens_per_micro_batch=budget).run(batch, hooks,
                                                                             generator=torch.Generator())
    lens, plen = batch.seq_lens.tolist(), batch.shared_prompt_lens.tolist()  # type: ignore[union-attr]
    groups = roll.prompt_index.tolist()
    for rows in hooks.forwards:
        held = sum(lens[r] - plen[r] for r in rows) + sum(plen[min(r for r in rows if groups[r] == g)]
                                                          for g in {groups[r] for r in rows})
        assert held <= budget or len(rows) == 1
    plain = token_budget_partition(list(range(len(batch))), _batch(inputs, roll), budget, 100, lambda v: v)
    assert len(hooks.forwards) < len(plain)  # each prompt counted once: fewer forwards for the same budget
    assert want.keys() == got.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    _assert_close(hooks.steps[0], ref_hooks.steps[0])


def test_every_rank_runs_as_many_micro_batches_as_the_neediest(setup: tuple) -> None:
    bundle, inputs, roll = setup
    batch = _batch(inputs, roll)
    rows = list(range(len(batch)))
    own = token_budget_partition(rows, batch, 300, 100, lambda v: v)
    more = token_budget_partition(rows, batch, 300, 100, lambda v: len(own) + 2)
    assert len(more) == len(own) + 2
    for parts in (own, more):
        assert sorted(r for p in parts for r in p) == rows  # every response once
        assert all(p for p in parts)
    # a prompt's responses (3 x 94-312 tokens) stay together when they fit the budget: its image is encoded once
    together = token_budget_partition(rows, batch, 1000, 100, lambda v: v)
    groups = batch.groups.tolist()  # type: ignore[union-attr]
    homes = {g: {k for k, part in enumerate(together) for r in part if groups[r] == g} for g in set(groups)}
    assert len(together) > 1 and all(len(h) == 1 for h in homes.values())
    with pytest.raises(ValueError, match="another rank needs 20 micro-batches"):
        token_budget_partition(rows, batch, 300, 100, lambda v: 20)
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch must be >= 1"):
        PPOUpdate(LossConfig(), max_tokens_per_micro_batch=0)
