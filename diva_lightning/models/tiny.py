"""The tiny offline Qwen2.5-VL policy: tokenizer, image processor and model built from a seed.

Everything here is made locally (no hub access): a byte-level BPE tokenizer trained on a given
corpus with exactly the Qwen2 pre-tokenizer (so digits are single tokens, as in Qwen), the
Qwen2.5-VL special tokens and a Qwen-style chat template; the PIL (torchvision-free) Qwen2-VL image
processor; and a randomly initialised ``Qwen2_5_VLForConditionalGeneration`` with small dims.

The saved directory has the standard layout (``config.json`` + weights, ``tokenizer.json`` +
``tokenizer_config.json``, ``preprocessor_config.json``), so ``load_policy`` reads it through the
same code path as a real Qwen2.5-VL checkpoint. The processor itself is not saved: its
``save_pretrained`` needs a video processor, which needs torchvision (see stack-notes.md).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from diva_lightning.models.prompt import R1_INSTRUCTION

# The Qwen2.5-VL added tokens, in the checkpoint's order (ids differ: ours follow the small BPE vocab).
QWEN_VL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Reasoning tags as ordinary added tokens: one id each, and kept by ``skip_special_tokens`` decoding
# (the format reward needs to see them in the response text).
THINK_TOKENS: tuple[str, ...] = ("<think>", "</think>")

# Qwen-style ChatML template. String contents are emitted verbatim (``PolicyBundle.build_prompt``
# puts the vision placeholders in the string); list contents follow the Qwen2-VL convention.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# 112 x 112 pixels -> 8 x 8 patches of 14 -> 16 merged tokens; larger images are shrunk to this budget.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112


@dataclass(frozen=True)
class TinyDims:
    """Sizes of the tiny policy. The defaults give about 0.7M parameters (fast on 2 CPU threads)."""

    vocab_size: int = 768  # BPE target incl. the 256 bytes; special tokens come on top
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_heads: int = 2
    vision_intermediate_size: int = 128
    max_position_embeddings: int = 4096
    # Qwen's 1e6 is tuned for head_dim 128 and long contexts. With the tiny head_dim (32) it leaves the
    # M-RoPE height/width sections rotating by ~1e-4..1e-2 rad per position, so the LM cannot tell the rows
    # and columns of an image apart. 10 spreads them over ~0.06..1 rad (measured: the warm-up policy then uses the
    # image: loss 0.095 with true vs 0.25 with blank images, where 1e6 gave no difference at all).
    rope_theta: float = 10.0

    def __post_init__(self) -> None:
        head_dim = self.hidden_size // self.num_heads
        if head_dim * self.num_heads != self.hidden_size or head_dim % 8 != 0:
            raise ValueError(
                f"hidden_size / num_heads must be a multiple of 8, got {self.hidden_size}/{self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.vision_hidden_size % self.vision_heads != 0:
            raise ValueError("vision_hidden_size must be a multiple of vision_heads")


def train_tiny_tokenizer(corpus: Iterable[str], *, vocab_size: int = 768) -> Qwen2Tokenizer:
    """Train a byte-level BPE on ``corpus`` and wrap it as a ``Qwen2Tokenizer``.

    The normaliser and pre-tokenizer are Qwen2's (NFC, the Qwen split regex that isolates every
    digit, byte-level), so the tiny tokenizer splits text the way the real one does. BPE training in
    ``tokenizers`` is deterministic for a fixed corpus, so no seed is needed.
    """
    trainer_tok = Tokenizer(BPE())
    trainer_tok.normalizer = normalizers.NFC()
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        special_tokens=[],  # added below, after the BPE vocabulary, as in the real checkpoint
        show_progress=False,
    )
    trainer_tok.train_from_iterator(corpus, trainer)
    model_state = json.loads(trainer_tok.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model_state["vocab"],
        merges=[tuple(m) for m in model_state["merges"]],
        eos_token="<|im_end|>",  # the chat turn end, as in Qwen2.5-VL-*-Instruct
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in QWEN_VL_SPECIAL_TOKENS], special_tokens=True
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def tiny_image_processor() -> Qwen2VLImageProcessorPil:
    """Qwen2-VL image processor (PIL backend): patch 14, merge 2, temporal patch 2, <= 16 tokens."""
    return Qwen2VLImageProcessorPil(
        min_pixels=TINY_MIN_PIXELS,
        max_pixels=TINY_MAX_PIXELS,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )


def tiny_model_config(tokenizer: Qwen2Tokenizer, dims: TinyDims) -> Qwen2_5_VLConfig:
    """A small ``Qwen2_5_VLConfig`` whose special-token ids are the tokenizer's."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_VL_SPECIAL_TOKENS}
    half_head = dims.hidden_size // dims.num_heads // 2
    # M-RoPE splits the rotary half-dimension into (temporal, height, width) sections; Qwen uses
    # 16/24/24 of 64, i.e. 1/4, 3/8, 3/8.
    t_sec = half_head // 4
    h_sec = (half_head - t_sec) // 2
    mrope_section = [t_sec, h_sec, half_head - t_sec - h_sec]
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.num_layers,
        "num_attention_heads": dims.num_heads,
        "num_key_value_heads": dims.num_kv_heads,
        "max_position_embeddings": dims.max_position_embeddings,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(dims.rope_theta),
            "mrope_section": mrope_section,
        },
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": dims.vision_depth,
        "hidden_size": dims.vision_hidden_size,
        "intermediate_size": dims.vision_intermediate_size,
        "num_heads": dims.vision_heads,
        "out_hidden_size": dims.hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        # Qwen mixes windowed and full attention; the last block attends over the whole image.
        "fullatt_block_indexes": [dims.vision_depth - 1],
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_model(
    tokenizer: Qwen2Tokenizer, *, seed: int, dims: TinyDims
) -> Qwen2_5_VLForConditionalGeneration:
    """Randomly initialise the tiny model; the same seed gives the same weights (global RNG untouched)."""
    config = tiny_model_config(tokenizer, dims)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    im_end, eot = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    # Neutral sampling defaults: engines pass their own settings, but ``generate()`` falls back to these.
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=True, temperature=1.0, top_p=1.0, top_k=0
    )
    return model.eval()


def build_tiny_policy(out_dir: str | Path, corpus: Iterable[str], *, seed: int = 0, **dims: int) -> Path:
    """Build the tiny policy and save it under ``out_dir`` in the standard layout; returns ``out_dir``.

    ``dims`` overrides fields of :class:`TinyDims` (e.g. ``hidden_size=256, num_layers=4``).
    """
    unknown = set(dims) - {f.name for f in fields(TinyDims)}
    if unknown:
        raise TypeError(f"unknown tiny dims {sorted(unknown)}; valid: {[f.name for f in fields(TinyDims)]}")
    tiny_dims = TinyDims(**dims)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The default prompt template ends every prompt with the R1 instruction: the tokenizer learns it too
    # (41 tokens instead of 137 bytes-level ones).
    tokenizer = train_tiny_tokenizer([*corpus, R1_INSTRUCTION], vocab_size=tiny_dims.vocab_size)
    model = build_tiny_model(tokenizer, seed=seed, dims=tiny_dims)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tiny_image_processor().save_pretrained(out)
    (out / "tiny_dims.json").write_text(json.dumps({"seed": seed, **asdict(tiny_dims)}, indent=2))
    return out


def sample_corpus(n: int = 300, *, seed: int = 0) -> list[str]:
    """A small fixed corpus of math-question-like text (problems, reasoning, boxed answers, choices).

    Enough to train the tiny tokenizer for tests and examples; training runs use the world generator's
    corpus instead. Deterministic in ``seed``.
    """
    rng = random.Random(seed)
    shapes = ["triangle", "square", "circle", "rectangle", "hexagon", "angle", "line", "point"]
    asks = [
        "What is the area of the",
        "Find the perimeter of the",
        "How many sides does the",
        "Compute the length of the",
    ]
    lines: list[str] = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        shape = rng.choice(shapes)
        choices = " ".join(f"({c}) {rng.randint(0, 500)}" for c in "ABCD")
        lines.append(
            f"<image> {rng.choice(asks)} {shape} with side {a} and height {b}? Choices: {choices}\n"
            f"<think> The {shape} has side {a}. Multiply {a} by {b} to get {a * b}, then add {b}: "
            f"{a * b + b}. So the answer is ({rng.choice('ABCD')}). </think> "
            f"The answer is \\boxed{{{a * b + b}}}. x = {a} + {b} = {a + b}, \\frac{{{a}}}{{{b}}}"
        )
    return lines
