"""The policy bundle: a Qwen2(.5)-VL model with its tokenizer and image processor, and prompt encoding.

One code path serves the tiny offline checkpoint (``models/tiny.py``) and a real Qwen2.5-VL
checkpoint: both are read with ``AutoModelForImageTextToText``/``AutoTokenizer`` and the image
processor is loaded on its own with the PIL backend (the joint ``AutoProcessor`` needs a video
processor, hence torchvision, which the CPU stack cannot have; see stack-notes.md). The
``<|image_pad|>`` expansion the processor would do is done here: one pad per merged patch.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, PreTrainedModel

from diva_lightning.models.attention import register as register_attention
from diva_lightning.models.embedded import resolve_embedded
from diva_lightning.models.prompt import PromptConfig
from diva_lightning.models.tiny import QWEN_CHAT_TEMPLATE
from diva_lightning.models.vision import VisionSpec, num_image_tokens, preprocess_images

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"  # how a record's ``problem`` marks where an image goes (design.md section 8)
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class PolicyBundle:
    """A Qwen2(.5)-VL policy with what it takes to build its inputs.

    Attributes:
        model: the ``Qwen2_5_VLForConditionalGeneration`` (or Qwen2-VL) model.
        tokenizer: its tokenizer, with a ChatML chat template.
        image_processor: its Qwen2-VL image processor (only settings are read; preprocessing is torch).
        prompt: the format instruction appended to every problem and the system turn (``models.prompt``).
        source: the checkpoint directory or hub id it was loaded from (engines with their own copy reload it).
    """

    model: PreTrainedModel
    tokenizer: Any
    image_processor: Any
    prompt: PromptConfig = field(default_factory=PromptConfig)
    source: str | None = None
    vision_spec: VisionSpec = field(init=False)

    def __post_init__(self) -> None:
        self.vision_spec = VisionSpec.from_processor(self.image_processor)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; left padding needs one")
        params = inspect.signature(self.model.forward).parameters
        # transformers >= 5 computes M-RoPE positions from mm_token_type_ids; older versions lack it.
        self.needs_mm_token_type_ids = "mm_token_type_ids" in params

    # ids of the tokens the model treats as vision structure -------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    @property
    def vision_token_ids(self) -> list[int]:
        """Tokens a response must never contain: feeding them back breaks image/token alignment."""
        cfg = self.model.config
        ids = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
        pad = self.tokenizer.convert_tokens_to_ids("<|vision_pad|>")
        if isinstance(pad, int) and pad != self.tokenizer.unk_token_id:
            ids.add(pad)
        return sorted(int(i) for i in ids if i is not None)

    @property
    def stop_token_ids(self) -> list[int]:
        """End-of-response ids: the turn end ``<|im_end|>`` and ``<|endoftext|>``, plus the tokenizer EOS."""
        ids = {self.tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return sorted(int(i) for i in ids if i is not None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save(self, out_dir: str | Path) -> Path:
        """Write model, tokenizer and image processor in the standard layout that `load_policy` reads.

        The image processor is saved on its own: a full Qwen-VL processor save needs a video processor.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        return out

    def set_pixel_budget(self, *, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        """Resize images to at least ``min_pixels`` and at most ``max_pixels`` (None keeps that bound)."""
        spec = self.vision_spec
        lo = spec.min_pixels if min_pixels is None else int(min_pixels)
        hi = spec.max_pixels if max_pixels is None else int(max_pixels)
        if not 0 < lo <= hi:
            raise ValueError(f"pixel budget needs 0 < min_pixels <= max_pixels, got {lo}, {hi}")
        self.vision_spec = replace(spec, min_pixels=lo, max_pixels=hi)

    # prompts ---------------------------------------------------------------------------------------
    def build_prompt(self, problem: str) -> str:
        """Chat-formatted prompt: the problem plus the format instruction as the user turn (``<image>`` ->
        vision placeholder), after the configured system turn, ending with the assistant header."""
        messages: list[dict[str, str]] = []
        if self.prompt.system is not None:
            messages.append({"role": "system", "content": self.prompt.system})
        user = self.prompt.user_text(problem).replace(IMAGE_PLACEHOLDER, VISION_PLACEHOLDER)
        messages.append({"role": "user", "content": user})
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def encode(
        self, problems: Sequence[str], images: Sequence[Sequence[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Model inputs for P problems, left-padded for generation.

        Args:
            problems: P problem texts; the k-th ``<image>`` in problem p is ``images[p][k]``.
            images: per problem, float tensors [3, H, W] in [0, 1] (any device, sizes may differ).
        Returns (on the model's device):
            input_ids [P, L] long, attention_mask [P, L] long (0 on the left padding),
            pixel_values [sum patches, 3*T*p*p] and image_grid_thw [K, 3] when any image is present,
            mm_token_type_ids [P, L] long (1 on image pads) when the model takes it.
        """
        if len(problems) != len(images):
            raise ValueError(f"{len(problems)} problems but {len(images)} image lists")
        flat_images: list[torch.Tensor] = []
        for p, (problem, imgs) in enumerate(zip(problems, images)):
            n_marks = problem.count(IMAGE_PLACEHOLDER)
            if n_marks != len(imgs):
                raise ValueError(f"problem {p} has {n_marks} '<image>' marks but {len(imgs)} images")
            flat_images.extend(imgs)
        device = self.device
        out: dict[str, torch.Tensor] = {}
        tokens_per_image: list[int] = []
        if flat_images:
            pixel_values, grid_thw = preprocess_images(flat_images, self.vision_spec)
            out["pixel_values"] = pixel_values.to(device)
            out["image_grid_thw"] = grid_thw.to(device)
            tokens_per_image = num_image_tokens(grid_thw, self.vision_spec.merge_size).tolist()

        texts = [self.build_prompt(problem) for problem in problems]
        token_lists = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        image_iter = iter(tokens_per_image)
        rows: list[list[int]] = []
        for ids in token_lists:
            row: list[int] = []
            for tid in ids:
                # the template puts a single pad per image; the vision tower yields n features for it
                row.extend([tid] * next(image_iter) if tid == self.image_token_id else [tid])
            rows.append(row)
        if next(image_iter, None) is not None:
            raise ValueError("more images than <|image_pad|> placeholders after templating")

        width = max(len(r) for r in rows)
        pad_id = int(self.tokenizer.pad_token_id)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
        out["input_ids"] = input_ids.to(device)
        out["attention_mask"] = attention_mask.to(device)
        if self.needs_mm_token_type_ids:
            mm = (input_ids == self.image_token_id).long() + 2 * (input_ids == self.video_token_id).long()
            out["mm_token_type_ids"] = mm.to(device)
        return out


def check_policy_folder(folder: Path) -> None:
    """Raise naming ``folder`` and what it lacks when it is not a whole checkpoint (model config, weights with
    every shard its index lists, tokenizer, image processor): an empty folder used to fail in transformers with
    "Couldn't instantiate the backend tokenizer ... install sentencepiece", naming neither the folder nor the gap."""
    names = {p.name for p in folder.iterdir()}
    if not names:
        raise FileNotFoundError(f"policy folder {folder} is empty: expected a checkpoint (config.json, "
                                "model.safetensors, tokenizer.json, preprocessor_config.json), e.g. the policy/ "
                                "folder a run exports or a Qwen2.5-VL download")
    missing = []
    if "config.json" not in names:
        missing.append("config.json (the model config)")
    indexes = sorted(n for n in names if n.endswith((".safetensors.index.json", ".bin.index.json")))
    if indexes:
        for index in indexes:
            try:
                shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError) as err:
                missing.append(f"a readable {index} ({type(err).__name__}: {err})")
                continue
            absent = sorted(shards - names)
            if absent:
                missing.append(f"weight shard(s) {', '.join(absent)} listed in {index}")
    elif not any(n.endswith(".safetensors") or n == "pytorch_model.bin" for n in names):
        missing.append("the weights (model.safetensors, sharded *.safetensors with their index, or pytorch_model.bin)")
    if not ("tokenizer.json" in names or {"vocab.json", "merges.txt"} <= names or "tokenizer.model" in names):
        missing.append("the tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    if not names & {"preprocessor_config.json", "processor_config.json"}:
        missing.append("the image processor settings (preprocessor_config.json)")
    if missing:
        raise FileNotFoundError(f"policy folder {folder} is incomplete: missing " + "; ".join(missing)
                                + f" (found: {', '.join(sorted(names)[:12])}{' ...' if len(names) > 12 else ''})")


def resolve_policy_source(path_or_hub_id: str | Path) -> tuple[str, bool]:
    """(source, is_local) for ``from_pretrained``; raises naming the path when nothing can be loaded.

    ``"embedded"`` is the shipped base policy (checked against its recorded sha256 first). A local directory wins
    (``~`` expanded). Only an ``org/name``-shaped string that is not a local directory goes to the hub; anything else
    that does not exist is an error that says it was not tried as a hub id.
    """
    path_or_hub_id = resolve_embedded(path_or_hub_id)
    raw = str(path_or_hub_id)
    local = Path(raw).expanduser()
    if local.is_dir():
        check_policy_folder(local)
        return str(local), True
    looks_like_path = isinstance(path_or_hub_id, Path) or raw.startswith(("/", ".", "~")) or raw.count("/") != 1
    if looks_like_path or not all(raw.split("/")):
        raise FileNotFoundError(f"policy {raw!r}: no checkpoint directory at {local.absolute()} (not tried as a "
                                "hub id: hub ids look like 'org/name')")
    return raw, False


def load_tokenizer_and_processor(source: str, *, local_only: bool) -> tuple[Any, Any]:
    """The checkpoint's tokenizer (with a pad token and a chat template) and its PIL image processor."""
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    # PIL backend: the torchvision one cannot import on the CPU stack; we only read its settings anyway.
    image_processor = AutoImageProcessor.from_pretrained(source, backend="pil", local_files_only=local_only)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = "<|endoftext|>"
    if tokenizer.chat_template is None:
        # some Qwen checkpoints keep the (identical ChatML) template only in the processor's
        # chat_template.json, which the tokenizer does not read
        logger.warning("%s: tokenizer has no chat template; using the Qwen ChatML template", source)
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer, image_processor


def load_policy(
    path_or_hub_id: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    prompt: PromptConfig | None = None,
    attn_implementation: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> PolicyBundle:
    """Load a Qwen2(.5)-VL policy from a local directory or, only if no such directory exists, the hub.

    Args:
        path_or_hub_id: a checkpoint directory (tiny or real) or a hub id (``Qwen/Qwen2.5-VL-3B-Instruct``).
        dtype: weights dtype, a ``torch.dtype`` or its name (default: transformers' default, float32).
        device: where to put the model (default: stays on CPU).
        prompt: the prompt template (default: the authors' R1 instruction, the template's system turn).
        attn_implementation: e.g. "sdpa", "sdpa_varlen" (``models.attention``), "eager", "flash_attention_2"
            (default: transformers' choice).
        min_pixels / max_pixels: override the image processor's pixel budget per image (default: its own).
    Raises:
        FileNotFoundError: no such directory, and not a hub id, or the hub id could not be loaded (the message
            says which was tried).
        ImportError: ``flash_attention_2`` without the flash-attn package.
    """
    source, local_only = resolve_policy_source(path_or_hub_id)
    register_attention()  # "sdpa_varlen" (models.attention)
    model_kwargs: dict[str, Any] = {"local_files_only": local_only}
    if dtype is not None:
        model_kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, **model_kwargs)
    except ImportError as err:
        if attn_implementation and attn_implementation.startswith("flash_attention"):
            raise ImportError(f"attn_implementation {attn_implementation!r} needs the flash-attn package (CUDA "
                              f"only): pip install flash-attn, or use 'sdpa' ({err})") from err
        raise
    except OSError as err:
        if local_only:
            raise
        raise FileNotFoundError(f"policy {source!r}: no local directory {Path(source).absolute()}, and loading it "
                                f"as a hub id failed (offline, or no such repository): {err}") from err
    if device is not None:
        model = model.to(device)
    tokenizer, image_processor = load_tokenizer_and_processor(source, local_only=local_only)
    bundle = PolicyBundle(
        model=model.eval(), tokenizer=tokenizer, image_processor=image_processor,
        prompt=prompt if prompt is not None else PromptConfig(), source=source,
    )
    if min_pixels is not None or max_pixels is not None:
        bundle.set_pixel_budget(min_pixels=min_pixels, max_pixels=max_pixels)
    return bundle
