"""HF generate engine on the real tiny model: grouping, suppression, stop masking, seeds, log-probs."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from diva_lightning.models.logprobs import completion_logprobs, repeat_prompt_inputs
from diva_lightning.models.policy import PolicyBundle
from diva_lightning.rollout import HFGenerateEngine, Rollout, RolloutEngine, mask_after_stop


@pytest.fixture(scope="module")
def inputs(bundle: PolicyBundle) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    problems = ["<image> What is 12 + 30?", "Which is larger, (A) 3 or (B) 4? <image>", "7 * 6 = ?"]
    images = [[torch.rand(3, 112, 112, generator=g)], [torch.rand(3, 56, 84, generator=g)], []]
    return bundle.encode(problems, images)


def test_mask_after_stop_hand_values() -> None:
    ids = torch.tensor([[5, 6, 9, 7, 9], [5, 8, 6, 6, 6], [9, 1, 2, 3, 4], [1, 2, 3, 4, 8]])
    mask, finished = mask_after_stop(ids, [9, 8])
    # row 0: first stop at t=2, kept (the policy must learn to stop), the rest dropped
    # row 1: stop 8 at t=1; row 2: stop first; row 3: stop is the last token
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert finished.tolist() == [True, True, True, True]
    mask, finished = mask_after_stop(torch.tensor([[1, 2, 3]]), [9])
    assert mask.tolist() == [[1, 1, 1]] and finished.tolist() == [False]


def test_rollout_groups_and_shapes(bundle: PolicyBundle, inputs) -> None:  # type: ignore[no-untyped-def]
    engine = HFGenerateEngine()
    assert isinstance(engine, RolloutEngine)
    out = engine.generate(bundle, inputs, num_generations=2, max_new_tokens=12, seed=0)
    assert isinstance(out, Rollout)
    assert out.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert out.completion_ids.shape == out.completion_mask.shape and out.completion_ids.shape[0] == 6
    assert out.completion_ids.shape[1] <= 12 and out.old_logp is None
    stops = torch.tensor(bundle.stop_token_ids)
    for ids, m, text in zip(out.completion_ids, out.completion_mask, out.texts):
        kept = ids[m.bool() & ~torch.isin(ids, stops)]
        assert text == bundle.tokenizer.decode(kept, skip_special_tokens=True)


def test_seed_reproducible_and_global_rng_untouched(bundle: PolicyBundle, inputs) -> None:  # type: ignore[no-untyped-def]
    engine = HFGenerateEngine()
    state = torch.get_rng_state()
    a = engine.generate(bundle, inputs, num_generations=2, max_new_tokens=8, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = engine.generate(bundle, inputs, num_generations=2, max_new_tokens=8, seed=7)
    c = engine.generate(bundle, inputs, num_generations=2, max_new_tokens=8, seed=8)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # the G samples of one prompt differ (sampling, not G copies of one draw)
    assert not torch.equal(a.completion_ids[0], a.completion_ids[1])


def test_never_emits_vision_tokens_and_rescoring_works(bundle: PolicyBundle, inputs) -> None:  # type: ignore[no-untyped-def]
    engine = HFGenerateEngine()
    kwargs = dict(num_generations=6, temperature=1.5, max_new_tokens=48, seed=1)
    out = engine.generate(bundle, inputs, **kwargs)
    vision = torch.tensor(bundle.vision_token_ids)
    assert not torch.isin(out.completion_ids, vision).any()
    # control: the same draw without suppression does produce vision tokens, so the check has teeth
    cfg = engine.generation_config(bundle, temperature=1.5, top_p=1.0, max_new_tokens=48, do_sample=True)
    cfg = GenerationConfig(**{**cfg.to_dict(), "suppress_tokens": None})
    batch = repeat_prompt_inputs(inputs, out.prompt_index, image_token_id=bundle.image_token_id, merge_size=2)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        raw = bundle.model.generate(**batch, generation_config=cfg).sequences[
            :, batch["input_ids"].shape[1] :
        ]
    assert torch.isin(raw, vision).any()
    # the suppressed rollout re-scores without "Image features and image tokens do not match"
    logp, _ = completion_logprobs(
        bundle.model,
        inputs,
        out.completion_ids,
        out.completion_mask,
        prompt_index=out.prompt_index,
        temperature=1.5,
    )
    assert torch.isfinite(logp).all()


def test_stop_masking_in_rollout(bundle: PolicyBundle, inputs) -> None:  # type: ignore[no-untyped-def]
    out = HFGenerateEngine().generate(
        bundle, inputs, num_generations=8, temperature=1.5, max_new_tokens=64, seed=2
    )
    stops = torch.tensor(bundle.stop_token_ids)
    assert out.finished is not None and out.finished.any() and not out.finished.all()
    for ids, m, fin in zip(out.completion_ids, out.completion_mask, out.finished):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # a prefix
        if fin:
            assert ids[n - 1] in stops and not torch.isin(ids[: n - 1], stops).any()
            assert (ids[n:] == bundle.tokenizer.pad_token_id).all()
        else:
            assert n == ids.shape[0] and not torch.isin(ids, stops).any()


def test_old_logp_matches_completion_logprobs(bundle: PolicyBundle, inputs) -> None:  # type: ignore[no-untyped-def]
    out = HFGenerateEngine(return_old_logp=True).generate(
        bundle, inputs, num_generations=2, temperature=0.8, max_new_tokens=16, seed=3
    )
    assert out.old_logp is not None
    logp, _ = completion_logprobs(
        bundle.model,
        inputs,
        out.completion_ids,
        out.completion_mask,
        prompt_index=out.prompt_index,
        temperature=0.8,
    )
    # KV-cached incremental decoding vs one full forward: equal up to float32 rounding
    torch.testing.assert_close(out.old_logp, logp, rtol=1e-4, atol=1e-4)


def test_greedy_is_deterministic_without_seed(bundle: PolicyBundle, inputs) -> None:  # type: ignore[no-untyped-def]
    engine = HFGenerateEngine()
    a = engine.generate(bundle, inputs, num_generations=1, do_sample=False, max_new_tokens=8)
    b = engine.generate(bundle, inputs, num_generations=1, do_sample=False, max_new_tokens=8)
    assert torch.equal(a.completion_ids, b.completion_ids)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        engine.generate(bundle, inputs, num_generations=1, temperature=0.0)
