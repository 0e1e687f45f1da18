"""DIVA rounds at real-model scale on one CUDA GPU: FSDP2, bf16-mixed, a realistic length distribution (issues 10, 25).

    python benchmarks/gpu_check.py [--out DIR]              # make gpu-check: < 10 minutes on one H100/H200
    python benchmarks/gpu_check.py --device cpu --size tiny # the same code path on CPU (how the tests run it)

What runs (nothing is downloaded):
- a randomly initialised Qwen2.5-VL with 3B-like dimensions built from a config in code (hidden 2048, 36 layers,
  16 heads / 2 KV heads, MLP 11008, the real 151,936-token vocabulary; vision tower 32 blocks of 1280), saved
  with the tiny tokenizer (its ids are a subset of the vocabulary) and a processor budget of 448 x 448 pixels;
- the real system through `python -m diva_lightning fit`'s code (`run_cli`): Lightning's ModelParallelStrategy
  (FSDP2 on 1 GPU), `bf16-mixed`, padding-free token-budget micro-batches, DIVA advantages;
- `--warmup` rounds (not timed: CUDA kernels, allocator, vLLM graphs) then `--steps` timed rounds, each bracketed by
  `torch.cuda.synchronize()`; every figure is the median over the timed rounds;
- the rollout engine: vLLM (`diva_lightning.rollout.vllm.VLLMEngine`, its public constructor and `generate` only)
  when `vllm` is importable and the device is CUDA, else HF generate (`--engine` forces one); the report names it;
- a realistic response-length distribution: a random model never stops by itself, so each response is cut at a
  length drawn from a clipped log-normal like the paper's recipe (mean ~ 0.25 x budget, a tail to the budget;
  `--lengths budget` keeps the old behaviour, every response at the budget). The rollout still generates to the
  longest response of the batch, which a batched long-tail rollout does anyway;
- one round = 8 questions x (original + 1 variant) x 5 responses = 80 responses, world boards drawn at 448 px.

It prints and writes (`<out>/gpu_check.json`, `<out>/gpu_check.md`) the figures EasyR1 publishes for its baseline
(Qwen2.5-VL-7B GRPO on 8xH100: 1,600-2,000 tokens/s per GPU, 120-145 s per step of 2,560 responses, actor MFU
16-23%): tokens/s per GPU (prompt + response tokens of the round / round time / GPUs), seconds per round and per
2,560-response step (linear extrapolation at 320 responses per GPU, labelled as such), and the update's MFU from
FLOPs counted by component (:func:`step_flops`): the vision tower per distinct image (its windowed and full
attention included), the text layers per real token (no padding is computed any more), causal attention per
sequence (2 L^2 d per layer), the LM head only on the scored completion positions; the update is forward + backward
(3x the forward; activation recomputation is not counted, as MFU conventions require). Peak GPU memory too.
The counts are those of the work as EasyR1 counts it, every response with its own prompt: under the default
``share_prompt`` (docs/update.md 4) the model computes each prompt once for its responses, so fewer FLOPs run than
are counted and the MFU reads as an effective one (the report says so). The default attention is ``sdpa_varlen``
(no flash-attn needed); ``--attention flash_attention_2`` measures flash-attention instead (share_prompt then off).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diva_lightning.data.schema import write_records  # noqa: E402
from diva_lightning.data.world import generate_world, world_corpus  # noqa: E402
from diva_lightning.models.attention import VARLEN  # noqa: E402
from diva_lightning.rollout.base import Rollout, RolloutEngine, mask_after_stop  # noqa: E402

# EasyR1's published baseline (v0.3.2 assets/baselines.md): Qwen2.5-VL-7B GRPO, 8xH100, 2,560 responses per step.
EASYR1_RESPONSES_PER_STEP = 2560
EASYR1_GPUS = 8

# Dense bf16 tensor-core peak (TFLOP/s) by device name substring; vendor data sheets (SXM parts).
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}
SIZES: dict[str, dict[str, int]] = {
    # Qwen2.5-VL-3B-like text model; a full-size vision tower (the real 3B's).
    "3b": {"hidden_size": 2048, "num_layers": 36, "num_heads": 16, "num_kv_heads": 2, "intermediate_size": 11008,
           "vision_depth": 32, "vision_hidden_size": 1280, "vision_heads": 16, "vision_intermediate_size": 3420,
           "vocab": 151_936},
    # The same code path on a CPU in seconds.
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128,
             "vision_depth": 1, "vision_hidden_size": 32, "vision_heads": 2, "vision_intermediate_size": 64,
             "vocab": 151_936},
}


def build_model(out: Path, size: str, image_px: int) -> Path:
    """A random Qwen2.5-VL of `size` with the tiny tokenizer, saved in the standard layout (no download)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from diva_lightning.models.tiny import TinyDims, tiny_image_processor, tiny_model_config, train_tiny_tokenizer

    dims = dict(SIZES[size])
    vocab = dims.pop("vocab")
    tokenizer = train_tiny_tokenizer(world_corpus(generate_world(200, seed=0, split="train")))
    config = tiny_model_config(tokenizer, TinyDims(**dims, rope_theta=1_000_000.0, max_position_embeddings=8192))
    config.text_config.vocab_size = config.vocab_size = vocab
    # initialised on the GPU when there is one (minutes faster at 3B), saved in bf16 (half the disk and time)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    del model
    tokenizer.save_pretrained(out)
    processor = tiny_image_processor()
    processor.size = {"shortest_edge": 3136, "longest_edge": image_px * image_px}
    processor.save_pretrained(out)
    return out


class Probe(pl.Callback):
    """Collects each round's timings, token counts and FLOP inputs from the system's step outputs."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        enc = pl_module.bundle.encode(batch.problems, batch.images_per_prompt())
        self.prompt_tokens = enc["attention_mask"].sum(dim=1)  # [P]
        grid = enc.get("image_grid_thw")
        self.image_patches = [] if grid is None else grid.prod(dim=-1).tolist()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
                           ) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        step_s = time.perf_counter() - self.start
        lengths = outputs["completion_lengths"].float()
        prompt = self.prompt_tokens.to(lengths.device)[outputs["prompt_ids"]].float()
        self.steps.append({
            "responses": int(lengths.numel()),
            "generated_tokens": int(lengths.sum()),
            "mean_response_tokens": float(lengths.mean()),
            "max_response_tokens": int(lengths.max()),
            "update_tokens": int((lengths + prompt).sum()),
            "sequence_lengths": (lengths + prompt).long().tolist(),
            "image_patches": self.image_patches,
            "timings_s": dict(outputs["timings"]),
            "step_s": step_s,
            "world_size": trainer.world_size,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        })


class CutLengths(RolloutEngine):
    """Wraps an engine and cuts each response at a length drawn from a long-tail distribution (a random model never
    stops by itself): the response's token at that length becomes the stop token, so masks, rewards and the update
    see realistic lengths. Everything else is the wrapped engine's (weights sync, sleep, log-probs)."""

    def __init__(self, inner: RolloutEngine, *, mean_fraction: float = 0.25, seed: int = 0) -> None:
        self.inner, self.mean_fraction = inner, mean_fraction
        self.samples_from_module = inner.samples_from_module
        self.generator = torch.Generator().manual_seed(seed)

    def setup(self, bundle: Any, **kwargs: Any) -> None:
        self.inner.setup(bundle, **kwargs)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.inner.sync_weights(model)

    def sleep(self) -> None:
        self.inner.sleep()

    def wake(self) -> None:
        self.inner.wake()

    def generate(self, bundle: Any, inputs: Any, **kwargs: Any) -> Rollout:
        roll = self.inner.generate(bundle, inputs, **kwargs)
        n, t = roll.completion_ids.shape
        budget = int(kwargs.get("max_new_tokens", t))
        want = draw_lengths(n, budget, self.mean_fraction, self.generator).to(roll.completion_ids.device)
        ids = roll.completion_ids.clone()
        cut = want <= roll.lengths.to(want.device)  # shorter than what was generated: end it there
        rows = cut.nonzero().flatten()
        ids[rows, want[rows] - 1] = int(bundle.stop_token_ids[0])
        mask, finished = mask_after_stop(ids, bundle.stop_token_ids)
        old = None if roll.old_logp is None else roll.old_logp * mask
        return Rollout(prompt_index=roll.prompt_index, completion_ids=ids, completion_mask=mask, texts=roll.texts,
                       old_logp=old, finished=finished)


def draw_lengths(n: int, budget: int, mean_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """[n] response lengths: log-normal (sigma 0.9) with mean ~ mean_fraction x budget, clipped to [8, budget]."""
    sigma = 0.9
    mu = math.log(mean_fraction * budget) - sigma**2 / 2
    return torch.exp(torch.randn(n, generator=generator) * sigma + mu).long().clamp(8, budget)


def vision_flops(patches: int, v: dict[str, int], *, window_patches: int = 64, full_blocks: int = 4) -> float:
    """Forward FLOPs of the vision tower on one image of ``patches`` patch rows (multiply-add = 2 FLOPs)."""
    h, i, depth = v["vision_hidden_size"], v["vision_intermediate_size"], v["vision_depth"]
    full = min(full_blocks, depth)
    linear = 2 * patches * (4 * h * h + 3 * h * i)  # qkv + proj, gated MLP
    attention = [4 * patches * (patches if k < full else min(patches, window_patches)) * h for k in range(depth)]
    embed = 2 * patches * 3 * 2 * 14 * 14 * h  # Conv3d patch embedding (C=3, T=2, 14 x 14)
    merger = 2 * (patches // 4) * (4 * h * 4 * h + 4 * h * v["hidden_size"])
    return float(depth * linear + sum(attention) + embed + merger)


def step_flops(r: dict[str, Any], dims: dict[str, int]) -> dict[str, float]:
    """Forward FLOPs of one round's update by component, and the update's total (forward + backward = 3x)."""
    hsz, layers, inter, vocab = dims["hidden_size"], dims["num_layers"], dims["intermediate_size"], dims["vocab"]
    kv = hsz * dims["num_kv_heads"] // dims["num_heads"]
    tokens = sum(r["sequence_lengths"])
    per_token = 2 * layers * (2 * hsz * hsz + 2 * hsz * kv + 3 * hsz * inter)  # q, o, k, v, gated MLP
    out = {
        "vision": sum(vision_flops(p, dims) for p in r["image_patches"]),
        "text_layers": float(per_token * tokens),
        "attention": float(sum(2 * layers * length**2 * hsz for length in r["sequence_lengths"])),
        "lm_head": float(2 * hsz * vocab * r["generated_tokens"]),
    }
    out["update_total"] = 3 * sum(out.values())
    return out


def summarise(steps: list[dict[str, Any]], device_name: str, dims: dict[str, int], engine: str) -> dict[str, Any]:
    """Medians over the timed rounds of the figures EasyR1 reports, and the FLOPs by component."""
    def med(f: Any) -> float:
        return float(statistics.median(f(r) for r in steps))

    world = steps[0]["world_size"]
    flops = [step_flops(r, dims) for r in steps]
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None)
    update_tflops = float(statistics.median(f["update_total"] / r["timings_s"]["update"] / 1e12
                                            for f, r in zip(flops, steps)))
    per_gpu_responses = EASYR1_RESPONSES_PER_STEP / EASYR1_GPUS
    out: dict[str, Any] = {
        "device": device_name, "engine": engine, "timed_steps": len(steps), "world_size": world,
        "responses": steps[0]["responses"],
        "mean_response_tokens": med(lambda r: r["mean_response_tokens"]),
        "max_response_tokens": med(lambda r: r["max_response_tokens"]),
        "generated_tokens": med(lambda r: r["generated_tokens"]), "update_tokens": med(lambda r: r["update_tokens"]),
        "step_s": med(lambda r: r["step_s"]),
        "rollout_s": med(lambda r: r["timings_s"]["rollout"]), "update_s": med(lambda r: r["timings_s"]["update"]),
        "reward_advantage_s": med(lambda r: r["timings_s"]["reward"] + r["timings_s"]["advantage"]),
        "tokens_per_s_per_gpu": med(lambda r: r["update_tokens"] / r["step_s"] / world),
        "rollout_tokens_per_s": med(lambda r: r["generated_tokens"] / r["timings_s"]["rollout"]),
        "update_tokens_per_s": med(lambda r: r["update_tokens"] / r["timings_s"]["update"]),
        "s_per_2560_step_extrapolated": med(lambda r: r["step_s"] * per_gpu_responses / (r["responses"] / world)),
        "flops_by_component": {k: float(statistics.median(f[k] for f in flops)) for k in flops[0]},
        "update_tflops_per_s": update_tflops,
        "bf16_peak_tflops": peak,
        "update_mfu": None if peak is None else update_tflops / peak,
        "peak_memory_gib": max((r["peak_memory_gib"] or 0.0) for r in steps) if steps[0]["peak_memory_gib"] else None,
    }
    return out


def pick_engine(choice: str, cuda: bool) -> str:
    """``vllm`` when asked, or on ``auto`` when vllm is importable on a CUDA device; else ``hf``."""
    if choice != "auto":
        return choice
    return "vllm" if cuda and importlib.util.find_spec("vllm") is not None else "hf"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from diva_lightning.cli import run_cli

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --device cpu --size tiny to try the code path on a CPU)")
    engine = pick_engine(args.engine, cuda)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    print(f"[gpu_check] building a random {args.size} Qwen2.5-VL in {work} ...", flush=True)
    t0 = time.perf_counter()
    policy = build_model(work / "policy", args.size, args.image_px)
    cell = args.image_px // 4
    records = generate_world(args.questions * 2 * (args.warmup + args.steps), seed=0, split="train", cell_px=cell)
    data = write_records(records, work / "data" / "train.jsonl")
    print(f"[gpu_check] model and data ready in {time.perf_counter() - t0:.0f} s; {args.warmup} warm-up + "
          f"{args.steps} timed rounds, engine {engine} ...", flush=True)
    probe = Probe()
    args_fit = [
        "--config", str(REPO / "experiments/full.yaml"), "--config", str(REPO / "experiments/fsdp.yaml"),
        "--model.init_args.policy", str(policy), "--build_base_policy", "false",
        "--trainer.accelerator", args.device, "--trainer.devices", "1",
        "--trainer.strategy.init_args.data_parallel_size", "1",
        "--trainer.precision", "bf16-mixed" if cuda else "32-true",
        "--trainer.max_steps", str(args.warmup + args.steps), "--trainer.limit_val_batches", "0",
        "--trainer.val_check_interval", "1000",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.enable_checkpointing",
        "false", "--trainer.callbacks", "[]",
        "--data.init_args.train_source", str(data), "--data.init_args.val_source", str(data),
        "--data.init_args.test_source", "null", "--data.init_args.questions_per_step", str(args.questions),
        "--model.init_args.train_sampling.max_new_tokens", str(args.max_new_tokens),
        "--model.init_args.micro_batch_size", str(args.micro_batch),
        "--model.init_args.policy_config.max_tokens_per_micro_batch", str(args.token_budget),
        "--model.init_args.policy_config.gradient_checkpointing", "true",
        "--model.init_args.policy_config.min_pixels", "3136",
        "--model.init_args.policy_config.max_pixels", str(args.image_px * args.image_px),
    ]
    args_fit += ["--model.init_args.policy_config.attn_implementation", args.attention]
    if engine == "vllm":
        args_fit += ["--model.init_args.rollout.class_path", "diva_lightning.rollout.vllm.VLLMEngine",
                     "--model.init_args.rollout.init_args.gpu_memory_utilization", str(args.vllm_memory)]
    cli = run_cli(args_fit, run=False, save_config_callback=None)  # fit's objects, run below; no config.yaml
    if args.lengths == "longtail":
        cli.model.engine = CutLengths(cli.model.engine)
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    timed = probe.steps[args.warmup:]
    if not timed:
        raise SystemExit(f"gpu_check: {len(probe.steps)} rounds ran, none after the {args.warmup} warm-up rounds")
    out = summarise(timed, name, SIZES[args.size], "vLLM (VLLMEngine)" if engine == "vllm" else "HF generate")
    out["lengths"] = args.lengths
    out["token_budget"] = args.token_budget
    out["attention"] = args.attention  # sdpa_varlen: share_prompt on (the config default)
    return out


def report(result: dict[str, Any], out: Path) -> str:
    mfu = "n/a (unknown GPU peak)" if result["update_mfu"] is None else f"{100 * result['update_mfu']:.1f}%"
    peak = "n/a" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']:.1f} GiB"
    f = result["flops_by_component"]
    total = sum(v for k, v in f.items() if k != "update_total")
    share = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in f.items() if k != "update_total")
    shared = ", each prompt once per forward: MFU counts it per response" if result["attention"] == VARLEN else ""
    lines = [
        f"# GPU check ({time.strftime('%Y-%m-%d')}, {result['device']}, {result['world_size']} GPU(s), rollout engine: "
        f"{result['engine']}; medians of {result['timed_steps']} timed rounds after warm-up)",
        "",
        "| what | value | EasyR1 baseline (7B, 8xH100) |",
        "|---|---|---|",
        f"| responses per round / mean, max length ({result['lengths']}) | {result['responses']} / "
        f"{result['mean_response_tokens']:.0f}, {result['max_response_tokens']:.0f} tokens | 2,560 per step |",
        f"| tokens/s per GPU (prompt + response tokens / round time) | {result['tokens_per_s_per_gpu']:.0f} | "
        "1,600-2,000 |",
        f"| seconds per round | {result['step_s']:.1f} s | - |",
        f"| seconds per 2,560-response step (linear extrapolation, 320 per GPU) | "
        f"{result['s_per_2560_step_extrapolated']:.0f} s | 120-145 s |",
        f"| update MFU (component FLOPs x 3 / t vs {result['bf16_peak_tflops']} TFLOP/s bf16) | {mfu} "
        f"({result['update_tflops_per_s']:.1f} TFLOP/s) | 16-23% (actor) |",
        f"| rollout | {result['rollout_s']:.1f} s, {result['rollout_tokens_per_s']:.0f} generated tokens/s | - |",
        f"| update (1 step, FSDP2, token budget {result['token_budget']}, attention {result['attention']}{shared}) | "
        f"{result['update_s']:.1f} s, {result['update_tokens_per_s']:.0f} tokens/s | - |",
        f"| forward FLOPs by component | {share} | - |",
        f"| peak GPU memory | {peak} | - |",
        f"| reward + advantage | {result['reward_advantage_s']:.2f} s | - |",
    ]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", choices=tuple(SIZES), default="3b")
    parser.add_argument("--questions", type=int, default=8, help="questions per round (each + 1 variant, x5)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--lengths", choices=("longtail", "budget"), default="longtail",
                        help="longtail: responses cut at drawn lengths (mean ~ 0.25 x budget); budget: as generated")
    parser.add_argument("--image-px", type=int, default=448, help="board side in pixels (a multiple of 28 x 4)")
    parser.add_argument("--micro-batch", type=int, default=80, help="responses per forward/backward at most")
    parser.add_argument("--token-budget", type=int, default=16384, help="max_tokens_per_micro_batch")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--steps", type=int, default=3, help="timed rounds")
    parser.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto")
    parser.add_argument("--attention", choices=("sdpa_varlen", "sdpa", "flash_attention_2"), default="sdpa_varlen",
                        help="policy_config.attn_implementation (default sdpa_varlen: the system's default)")
    parser.add_argument("--vllm-memory", type=float, default=0.35, help="VLLMEngine gpu_memory_utilization")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs/gpu_check")))
    args = parser.parse_args(argv)
    result = run(args)
    print(report(result, args.out), flush=True)


if __name__ == "__main__":
    main()
