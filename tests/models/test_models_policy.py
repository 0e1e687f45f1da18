"""PolicyBundle prompt building and encoding on the real tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diva_lightning.models.policy import PolicyBundle, load_policy
from diva_lightning.models.prompt import R1_INSTRUCTION, PromptConfig
from diva_lightning.models.tiny import build_tiny_policy, sample_corpus


def test_build_prompt_places_vision_block(bundle: PolicyBundle) -> None:
    text = bundle.build_prompt("Look: <image> What is 3+4?")
    assert text.endswith(
        "<|im_start|>user\nLook: <|vision_start|><|image_pad|><|vision_end|> What is 3+4? "
        f"{R1_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    # the authors use no custom system prompt: the template's default system turn stays
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    bare = PolicyBundle(bundle.model, bundle.tokenizer, bundle.image_processor, PromptConfig(None, "Be brief."))
    assert bare.build_prompt("Q") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


def test_encoded_prompt_carries_the_format_instruction(bundle: PolicyBundle) -> None:
    """A policy loaded from any path is told the answer format (issue 11: a real model never was)."""
    enc = bundle.encode(["<image> How many?"], [[torch.rand(3, 56, 56)]])
    text = bundle.tokenizer.decode(enc["input_ids"][0].tolist())
    assert text.rstrip().endswith(f"How many? {R1_INSTRUCTION}<|im_end|>\n<|im_start|>assistant")


def test_prompt_config_check_names_blank_settings() -> None:
    assert PromptConfig().check() == []
    problems = PromptConfig(instruction="  ", system="").check()
    assert len(problems) == 2 and "instruction is blank" in problems[0] and "system is blank" in problems[1]


def test_encode_expands_pads_and_left_pads(bundle: PolicyBundle) -> None:
    problems = [
        "<image> short",
        "two images <image> and <image>, then a much longer question text 123",
        "text only",
    ]
    images = [[torch.rand(3, 112, 112)], [torch.rand(3, 56, 56), torch.rand(3, 112, 84)], []]
    enc = bundle.encode(problems, images)
    ids, mask, mm = enc["input_ids"], enc["attention_mask"], enc["mm_token_type_ids"]
    pad_id = bundle.image_token_id
    # one pad per merged patch: 112x112 -> 16, 56x56 -> 4, 112x84 -> 12
    assert (ids == pad_id).sum(1).tolist() == [16, 16, 0]
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8], [1, 4, 4], [1, 8, 6]]
    assert enc["pixel_values"].shape[0] == 64 + 16 + 48
    assert torch.equal(mm, (ids == pad_id).long())
    # left padding: mask is 0...0 1...1 and every row ends with the assistant header
    for row, m in zip(ids, mask):
        n_pad = int((m == 0).sum())
        assert m[:n_pad].sum() == 0 and m[n_pad:].all()
        assert (row[:n_pad] == bundle.tokenizer.pad_token_id).all()
    header = bundle.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert all(r[-len(header) :].tolist() == header for r in ids)
    # decoding a row without its padding gives back the templated prompt with the pads expanded
    text = bundle.tokenizer.decode(ids[0][mask[0].bool()])
    assert text == bundle.build_prompt("<image> short").replace("<|image_pad|>", "<|image_pad|>" * 16)


def test_encode_text_only_batch_has_no_pixels(bundle: PolicyBundle) -> None:
    enc = bundle.encode(["1+1?", "2+2?"], [[], []])
    assert "pixel_values" not in enc and "image_grid_thw" not in enc
    assert enc["mm_token_type_ids"].sum() == 0


def test_encode_rejects_mismatched_images(bundle: PolicyBundle) -> None:
    with pytest.raises(ValueError, match="1 '<image>' marks but 2 images"):
        bundle.encode(["<image> q"], [[torch.rand(3, 56, 56), torch.rand(3, 56, 56)]])
    with pytest.raises(ValueError, match="2 problems but 1 image lists"):
        bundle.encode(["a", "b"], [[]])


def test_vision_and_stop_ids(bundle: PolicyBundle) -> None:
    tok = bundle.tokenizer
    names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]
    assert bundle.vision_token_ids == sorted(tok.convert_tokens_to_ids(names))
    assert bundle.stop_token_ids == sorted(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))


def test_load_policy_dtype(tmp_path: Path) -> None:
    path = build_tiny_policy(tmp_path / "p", sample_corpus(40), seed=1)
    half = load_policy(path, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    enc = half.encode(["<image> x"], [[torch.rand(3, 112, 112)]])
    with torch.no_grad():
        assert torch.isfinite(half.model(**enc).logits.float()).all()


def test_load_policy_never_guesses_a_hub_id_for_a_path(tmp_path: Path) -> None:
    for missing in (tmp_path / "nope", str(tmp_path / "nope"), "./nope", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
            load_policy(missing)


def test_an_empty_or_incomplete_policy_folder_is_named_with_what_is_missing(tmp_path: Path,
                                                                            tiny_policy_dir: str) -> None:
    """Issue 22: an empty folder failed inside transformers ("install sentencepiece or tiktoken")."""
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"policy folder {empty} is empty: expected a checkpoint"):
        load_policy(empty)
    partial = tmp_path / "partial"
    shutil.copytree(tiny_policy_dir, partial)
    (partial / "tokenizer.json").unlink()
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_policy(partial)
    assert str(info.value).startswith(f"policy folder {partial} is incomplete: missing the tokenizer (tokenizer.json, "
                                      "or vocab.json + merges.txt); the image processor settings "
                                      "(preprocessor_config.json) (found: ")
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_policy_dir, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(FileNotFoundError, match=r"missing weight shard\(s\) model-00002-of-00002.safetensors listed "
                                                r"in model.safetensors.index.json"):
        load_policy(sharded)
