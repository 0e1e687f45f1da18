"""completion_logprobs against a plain forward, batching invariance, chunking and causality; the chunked
token scorer (token_logprobs) against hand-worked values, the full-logits formula, finite differences and
properties, and proof that it never saves [tokens, V] logits for backward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from diva_lightning.models.logprobs import (
    _ChunkedTokenScores,
    completion_logprobs,
    images_per_row,
    repeat_prompt_inputs,
    token_logprobs,
)
from diva_lightning.models.policy import PolicyBundle

PROBLEMS = [
    "<image> What is 12 + 30?",
    "Compare <image> with <image>: which side is longer, (A) or (B)?",
    "7 * 6 = ?",
]


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


# ------------------------------------------------------------------ chunked scoring (token_logprobs)
def _full_logits_scores(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-chunking formula: all [..., V] logits at once, upcast, tempered, logsumexp, softmax."""
    logits = F.linear(hidden, weight, bias)
    logits = (logits if logits.dtype == torch.float64 else logits.float()) / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
    return logp, entropy


def _random_problem(n: int, h: int, v: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    bias = torch.randn(v, generator=g).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    g_logp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)  # upstream gradients
    return hidden, weight, bias, targets, g_logp, g_ent


def _values_and_grads(fn, hidden, weight, bias, g_logp, g_ent):  # type: ignore[no-untyped-def]
    logp, ent = fn()
    loss = (logp * g_logp).sum() + (0 if g_ent is None else (ent * g_ent).sum())
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    return (logp.detach(), ent.detach(), *grads)


def test_token_logprobs_hand_worked() -> None:
    # logits z = W h = [0, ln 3] -> p = [1/4, 3/4]; target 1: log p = ln(3/4);
    # H = log Z - E_p[z] = ln 4 - (3/4) ln 3 = 0.562335
    # d log p / dz = onehot - p = [-1/4, 1/4]    -> dW = dz h^T = [[-1/4], [1/4]], dh = W^T dz = ln(3)/4
    # dH / dz = -p (z - E_p[z]) = -[1/4 (0 - 0.823959), 3/4 (ln 3 - 0.823959)] = [0.205990, -0.205990]
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [math.log(3)]], requires_grad=True)
    logp, ent = token_logprobs(hidden, weight, torch.tensor([1]), with_entropy=True)
    assert ent is not None
    torch.testing.assert_close(logp, torch.tensor([math.log(0.75)]))
    torch.testing.assert_close(ent, torch.tensor([math.log(4) - 0.75 * math.log(3)]))
    gh, gw = torch.autograd.grad(logp.sum(), (hidden, weight), retain_graph=True)
    torch.testing.assert_close(gw, torch.tensor([[-0.25], [0.25]]))
    torch.testing.assert_close(gh, torch.tensor([[math.log(3) / 4]]))
    (gw_ent,) = torch.autograd.grad(ent.sum(), (weight,))
    torch.testing.assert_close(gw_ent, torch.tensor([[0.205990], [-0.205990]]), rtol=0, atol=1e-6)
    # temperature 2 halves the logits: z = [0, ln 3 / 2] -> p_1 = sqrt3 / (1 + sqrt3)
    half, _ = token_logprobs(hidden, weight, torch.tensor([1]), temperature=2.0)
    torch.testing.assert_close(half, torch.tensor([math.log(math.sqrt(3) / (1 + math.sqrt(3)))]))


@pytest.mark.parametrize("chunk_tokens", [1, 5, 7, 64, None])
@pytest.mark.parametrize("terms", ["both", "logp", "entropy"])
def test_token_logprobs_equals_full_logits_values_and_grads(chunk_tokens: int | None, terms: str) -> None:
    hidden, weight, bias, targets, g_logp, g_ent = _random_problem(n=23, h=16, v=50, seed=4)
    g_logp = g_logp * (terms != "entropy")
    entropy_grad = None if terms == "logp" else g_ent
    temp = 0.7

    def run(fn, scale: float):  # type: ignore[no-untyped-def]
        h = (hidden.detach() * scale).requires_grad_()
        return _values_and_grads(lambda: fn(h), h, weight, bias, g_logp, entropy_grad)

    def chunked(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return token_logprobs(
            h, weight, targets, bias=bias, temperature=temp, with_entropy=True, chunk_tokens=chunk_tokens
        )

    names = ["logp", "entropy", "d_hidden", "d_weight", "d_bias"]
    # logits of a few units: float32 rounding is far below 1e-5, so the two formulas must agree to 1e-5
    new = run(chunked, 0.25)
    ref = run(lambda h: _full_logits_scores(h, weight, bias, targets, temp), 0.25)
    for name, a, b in zip(names, new, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    # logits up to ~30 (like a real LM's): both float32 paths are ~1e-5 off the float64 truth. The chunked one sums
    # its weight gradient chunk by chunk, a different order of float32 additions whose rounding depends on the
    # CPU's kernels (CI measured 2.0e-5 against full-logits' 7.8e-6 on a gradient of size 2.4): it must stay
    # within a few times the full-logits error, or within 1e-5 of the quantity's size (~80 float32 epsilons)
    new = run(chunked, 1.0)
    ref = run(lambda h: _full_logits_scores(h, weight, bias, targets, temp), 1.0)
    truth = run(
        lambda h: _full_logits_scores(h.double(), weight.double(), bias.double(), targets, temp), 1.0
    )
    for name, a, b, c in zip(names, new, ref, truth):
        ours, theirs = (a.double() - c).abs().max(), (b.double() - c.double()).abs().max()
        size = float(c.abs().max().clamp_min(1.0))
        assert ours <= max(4 * theirs, 1e-5 * size), (
            f"{name}: chunked {ours:.2e} vs full-logits {theirs:.2e} off float64 (size {size:.2g})"
        )


def test_token_logprobs_batched_shapes_and_no_entropy() -> None:
    hidden, weight, _, _, _, _ = _random_problem(n=12, h=8, v=30, seed=5)
    targets = torch.randint(0, 30, (3, 4), generator=torch.Generator().manual_seed(0))
    logp, ent = token_logprobs(hidden.detach().view(3, 4, 8), weight.detach(), targets, chunk_tokens=5)
    assert ent is None and logp.shape == (3, 4)
    ref, _ = _full_logits_scores(hidden.detach().view(3, 4, 8), weight.detach(), None, targets, 1.0)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_tokens"):
        token_logprobs(hidden, weight, targets.view(-1), chunk_tokens=0)
    with pytest.raises(ValueError, match="shapes do not match"):
        token_logprobs(hidden, weight, targets)


def test_token_logprobs_backward_matches_finite_differences() -> None:
    hidden, weight, bias, targets, _, _ = _random_problem(n=5, h=3, v=7, seed=6)
    args = (hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_(),
            bias.detach().double().requires_grad_())
    fn = lambda h, w, b: _ChunkedTokenScores.apply(h, w, b, targets, 0.8, True, 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12), v=st.integers(2, 40), chunk=st.integers(1, 14),
    temp=st.floats(0.5, 4.0), seed=st.integers(0, 2**16),
)
def test_token_logprobs_properties(n: int, v: int, chunk: int, temp: float, seed: int) -> None:
    hidden, weight, bias, targets, _, _ = _random_problem(n=n, h=4, v=v, seed=seed)
    with torch.no_grad():
        logp, ent = token_logprobs(
            hidden, weight, targets, bias=bias, temperature=temp, with_entropy=True, chunk_tokens=chunk
        )
        whole, whole_ent = token_logprobs(
            hidden, weight, targets, bias=bias, temperature=temp, with_entropy=True, chunk_tokens=None
        )
    assert ent is not None and whole_ent is not None
    # chunking only changes how the matmul and reductions are blocked: equal up to float32 rounding
    torch.testing.assert_close(logp, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, whole_ent, rtol=1e-5, atol=1e-5)
    assert (logp <= 0).all()
    assert (ent >= -1e-5).all() and (ent <= math.log(v) + 1e-5).all()  # 0 <= H <= log V
    # the probabilities of all V targets sum to one
    every = token_logprobs(
        hidden.detach().repeat_interleave(v, 0), weight.detach(), torch.arange(v).repeat(n), bias=bias.detach(),
        chunk_tokens=chunk,
    )[0]
    torch.testing.assert_close(every.exp().view(n, v).sum(-1), torch.ones(n), rtol=0, atol=1e-5)


def _saved_tensor_shapes(fn) -> list[tuple[int, ...]]:  # type: ignore[no-untyped-def]
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_token_logprobs_saves_no_vocabulary_sized_activations() -> None:
    hidden, weight, bias, targets, _, _ = _random_problem(n=64, h=8, v=100, seed=7)
    kw = {"bias": bias, "temperature": 0.7, "with_entropy": True, "chunk_tokens": 16}
    shapes = _saved_tensor_shapes(lambda: token_logprobs(hidden, weight, targets, **kw))
    activations = [s for s in shapes if s not in {tuple(weight.shape), tuple(bias.shape)}]
    assert activations and all(math.prod(s) <= 64 * 8 for s in activations), shapes  # [N, H], [N]: no [N, V]
    reference = _saved_tensor_shapes(lambda: _full_logits_scores(hidden, weight, bias, targets, 0.7))
    assert (64, 100) in reference  # the full formula does keep [N, V] tensors


def test_token_logprobs_under_bf16_autocast() -> None:
    hidden, weight, bias, targets, g_logp, g_ent = _random_problem(n=20, h=16, v=50, seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = _values_and_grads(
            lambda: token_logprobs(hidden, weight, targets, bias=bias, with_entropy=True, chunk_tokens=6),
            hidden, weight, bias, g_logp, g_ent,
        )
        ref = _values_and_grads(
            lambda: _full_logits_scores(hidden, weight, bias, targets, 1.0), hidden, weight, bias, g_logp, g_ent
        )
    for name, a, b in zip(["logp", "entropy", "d_hidden", "d_weight", "d_bias"], new, ref):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=name)  # both round the matmuls to bf16


def test_tiny_model_chunked_grads_equal_full_logits(bundle: PolicyBundle, images) -> None:  # type: ignore[no-untyped-def]
    model = bundle.model
    enc = bundle.encode(PROBLEMS, images)
    comp, mask = _completions(bundle, 3, 7, seed=9)
    g = torch.Generator().manual_seed(1)
    w_logp, w_ent = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    temp = 0.7
    params = [p for p in model.parameters() if p.requires_grad]
    lm_weight = model.get_output_embeddings().weight  # [V, H]

    def chunked() -> torch.Tensor:
        logp, ent = completion_logprobs(model, enc, comp, mask, temperature=temp, with_entropy=True, chunk_tokens=5)
        assert ent is not None
        return (logp * w_logp).sum() + (ent * w_ent).sum()

    def full() -> torch.Tensor:
        inputs = {
            **enc,
            "input_ids": torch.cat([enc["input_ids"], comp], 1),
            "attention_mask": torch.cat([enc["attention_mask"], torch.ones_like(comp)], 1),
            "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"], torch.zeros_like(comp)], 1),
        }
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][:, -8:-1]
        logp, ent = _full_logits_scores(hidden, model.lm_head.weight, None, comp, temp)
        return (logp * mask * w_logp).sum() + (ent * mask * w_ent).sum()

    shapes = _saved_tensor_shapes(lambda: torch.autograd.grad(chunked(), params))
    # the only vocabulary-sized tensors saved are the output weight (the empty lm_head call saves it transposed)
    vocab_sized = [s for s in shapes if lm_weight.shape[0] in s and math.prod(s) != lm_weight.numel()]
    assert not vocab_sized, f"[..., V] activations saved for backward: {vocab_sized}"
    new = torch.autograd.grad(chunked(), params)
    ref = torch.autograd.grad(full(), params)
    assert any(r.abs().sum() > 0 for r in ref)
    for p_new, p_ref in zip(new, ref):
        torch.testing.assert_close(p_new, p_ref, rtol=1e-5, atol=1e-5)


def test_output_layer_must_be_linear(bundle: PolicyBundle, images) -> None:  # type: ignore[no-untyped-def]
    model = copy.deepcopy(bundle.model)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    enc = bundle.encode(PROBLEMS[2:], images[2:])
    comp, mask = _completions(bundle, 1, 3)
    with pytest.raises(TypeError, match=r"get_output_embeddings\(\) is Sequential"):
        completion_logprobs(model, enc, comp, mask)
