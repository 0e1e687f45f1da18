"""completion_logprobs against a plain forward, batching invariance, chunking and causality."""

from __future__ import annotations

import pytest
import torch

from diva_lightning.models.logprobs import completion_logprobs, images_per_row, repeat_prompt_inputs
from diva_lightning.models.policy import PolicyBundle, load_policy
from diva_lightning.models.tiny import build_tiny_policy, sample_corpus

PROBLEMS = [
    "<image> What is 12 + 30?",
    "Compare <image> with <image>: which side is longer, (A) or (B)?",
    "7 * 6 = ?",
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> PolicyBundle:
    return load_policy(build_tiny_policy(tmp_path_factory.mktemp("tiny"), sample_corpus(), seed=0))


@pytest.fixture(scope="module")
def images() -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        [torch.rand(3, 112, 112, generator=g)],
        [torch.rand(3, 56, 84, generator=g), torch.rand(3, 84, 84, generator=g)],
        [],
    ]


def _completions(bundle: PolicyBundle, n: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, t), generator=g)  # byte tokens: never vision tokens
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, t // 2 :] = 0  # one response ended early
    return ids, mask


def test_equals_log_softmax_of_plain_forward(bundle: PolicyBundle, images) -> None:  # type: ignore[no-untyped-def]
    enc = bundle.encode(PROBLEMS, images)
    comp, mask = _completions(bundle, 3, 7)
    temp = 0.7
    logp, ent = completion_logprobs(bundle.model, enc, comp, mask, temperature=temp, with_entropy=True)
    # reference: full-sequence forward, all logits, torch.distributions for the entropy
    full = {
        **enc,
        "input_ids": torch.cat([enc["input_ids"], comp], 1),
        "attention_mask": torch.cat([enc["attention_mask"], torch.ones_like(comp)], 1),
        "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"], torch.zeros_like(comp)], 1),
    }
    with torch.no_grad():
        logits = bundle.model(**full).logits[:, enc["input_ids"].shape[1] - 1 : -1] / temp
    dist = torch.distributions.Categorical(logits=logits)
    torch.testing.assert_close(logp, dist.log_prob(comp) * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, dist.entropy() * mask, rtol=1e-5, atol=1e-5)
    assert (logp[0, 3:] == 0).all() and (logp[1:] < 0).all()


def test_left_padded_batch_equals_unbatched(bundle: PolicyBundle, images) -> None:  # type: ignore[no-untyped-def]
    enc = bundle.encode(PROBLEMS, images)
    assert (enc["attention_mask"] == 0).any()  # the batch really is padded
    comp, mask = _completions(bundle, 3, 6, seed=1)
    batched, _ = completion_logprobs(bundle.model, enc, comp, mask)
    for i, (problem, imgs) in enumerate(zip(PROBLEMS, images)):
        single = bundle.encode([problem], [imgs])
        alone, _ = completion_logprobs(bundle.model, single, comp[i : i + 1], mask[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-4, atol=1e-4)


def test_prompt_index_and_chunking(bundle: PolicyBundle, images) -> None:  # type: ignore[no-untyped-def]
    enc = bundle.encode(PROBLEMS, images)
    index = torch.tensor([2, 0, 1, 1, 0, 2])  # responses in any order, several per prompt
    comp, mask = _completions(bundle, 6, 5, seed=2)
    whole, _ = completion_logprobs(bundle.model, enc, comp, mask, prompt_index=index)
    chunked, _ = completion_logprobs(bundle.model, enc, comp, mask, prompt_index=index, chunk_size=4)
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-5)
    explicit = repeat_prompt_inputs(enc, index, image_token_id=bundle.image_token_id, merge_size=2)
    direct, _ = completion_logprobs(bundle.model, explicit, comp, mask)
    torch.testing.assert_close(whole, direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prompt_index is required"):
        completion_logprobs(bundle.model, enc, comp, mask)


def test_repeat_prompt_inputs_selects_matching_images(bundle: PolicyBundle, images) -> None:  # type: ignore[no-untyped-def]
    enc = bundle.encode(PROBLEMS, images)
    assert images_per_row(enc, image_token_id=bundle.image_token_id, merge_size=2).tolist() == [1, 2, 0]
    sel = repeat_prompt_inputs(
        enc, torch.tensor([1, 1, 0]), image_token_id=bundle.image_token_id, merge_size=2
    )
    ref = bundle.encode([PROBLEMS[1], PROBLEMS[1], PROBLEMS[0]], [images[1], images[1], images[0]])
    assert torch.equal(sel["image_grid_thw"], ref["image_grid_thw"])
    assert torch.equal(sel["pixel_values"], ref["pixel_values"])
    # rows keep the batch's padding width; their unpadded tokens equal the fresh encoding's
    for a, ma, b, mb in zip(sel["input_ids"], sel["attention_mask"], ref["input_ids"], ref["attention_mask"]):
        assert torch.equal(a[ma.bool()], b[mb.bool()])


def test_causal_tokens_after_mask_do_not_matter_and_grads_flow(bundle: PolicyBundle, images) -> None:  # type: ignore[no-untyped-def]
    enc = bundle.encode(PROBLEMS[:1], images[:1])
    comp, _ = _completions(bundle, 1, 8, seed=3)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]])
    other = comp.clone()
    other[0, 4:] = (other[0, 4:] + 1) % 256  # change only the masked tail
    a, _ = completion_logprobs(bundle.model, enc, comp, mask)
    b, _ = completion_logprobs(bundle.model, enc, other, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    bundle.model.zero_grad()
    a.sum().backward()
    grad = bundle.model.lm_head.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    bundle.model.zero_grad()
