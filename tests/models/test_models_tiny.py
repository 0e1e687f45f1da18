"""The tiny offline policy: tokenizer, chat template, config ids, determinism, save/load round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diva_lightning.models.policy import load_policy
from diva_lightning.models.tiny import (
    QWEN_VL_SPECIAL_TOKENS,
    THINK_TOKENS,
    TinyDims,
    build_tiny_model,
    build_tiny_policy,
    sample_corpus,
    train_tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("tiny"), sample_corpus(), seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):  # type: ignore[no-untyped-def]
    return load_policy(tiny_dir).tokenizer


def test_digits_are_single_tokens(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("x = 1234567890", add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    # every digit is its own token (the Qwen pre-tokenizer isolates \p{N}), so 10 digit tokens
    assert [p for p in pieces if p.isdigit()] == list("1234567890")


def test_special_and_think_tokens_are_single_ids(tokenizer) -> None:  # type: ignore[no-untyped-def]
    for tok in QWEN_VL_SPECIAL_TOKENS + THINK_TOKENS:
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(tok)], tok


@pytest.mark.parametrize(
    "text",
    [
        "<think> 12 * 34 = 408 </think> The answer is \\boxed{408}.",
        "Which is larger? (A) 3.5 (B) 7/2 (C) 4 (D) none",
        "Ünïcödé and emoji 🙂 survive the byte-level round trip: 0.001",
    ],
)
def test_round_trip_text(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_decode_skips_chat_tokens_but_keeps_think(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "<|im_start|>assistant\n<think>a</think>\\boxed{5}<|im_end|><|endoftext|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n<think>a</think>\\boxed{5}"


def test_chat_template_is_chatml(tokenizer) -> None:  # type: ignore[no-untyped-def]
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    out = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
    ]
    out = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert (
        out
        == "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n"
    )


def test_config_ids_match_tokenizer(tiny_dir: Path) -> None:
    bundle = load_policy(tiny_dir)
    cfg, tok = bundle.model.config, bundle.tokenizer
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.text_config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert set(bundle.model.generation_config.eos_token_id) == set(bundle.stop_token_ids)
    # the processor settings give 16 merged tokens for a 112 x 112 image
    assert bundle.vision_spec.patch_size == 14 and bundle.vision_spec.merge_size == 2
    assert bundle.vision_spec.temporal_patch_size == 2


def test_build_is_deterministic_in_seed() -> None:
    corpus = sample_corpus(50)
    tok_a, tok_b = train_tiny_tokenizer(corpus), train_tiny_tokenizer(corpus)
    assert tok_a.get_vocab() == tok_b.get_vocab()
    dims = TinyDims(hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=64, vision_hidden_size=32)
    rng_before = torch.get_rng_state()
    m0, m0b, m1 = (build_tiny_model(tok_a, seed=s, dims=dims) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is untouched
    for (name, p0), p0b in zip(m0.named_parameters(), m0b.parameters()):
        assert torch.equal(p0, p0b), name
    assert not torch.equal(m0.lm_head.weight, m1.lm_head.weight)


def test_unknown_dims_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="unknown tiny dims"):
        build_tiny_policy(tmp_path, sample_corpus(10), hidden=64)
    with pytest.raises(ValueError, match="multiple of 8"):
        TinyDims(hidden_size=100, num_heads=4)


def test_save_load_round_trip_same_logits(tmp_path: Path) -> None:
    corpus = sample_corpus(80)
    path = build_tiny_policy(tmp_path / "p", corpus, seed=3)
    first, second = load_policy(path), load_policy(path)
    # an independent in-memory build from the same seed equals the saved weights
    fresh = build_tiny_model(first.tokenizer, seed=3, dims=TinyDims())
    g = torch.Generator().manual_seed(0)
    inputs = first.encode(
        ["<image> Find x: 3 + 4", "no image here"], [[torch.rand(3, 112, 112, generator=g)], []]
    )
    with torch.no_grad():
        logits = [m(**inputs).logits for m in (first.model, second.model, fresh)]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    torch.testing.assert_close(logits[0], logits[2], rtol=0, atol=0)
