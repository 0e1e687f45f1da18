"""One DIVA round at real-model scale on one CUDA GPU: FSDP2, bf16-mixed, realistic lengths (issue 10 item 5).

    python benchmarks/gpu_check.py [--out DIR]              # make gpu-check: < 8 minutes on one H100/H200
    python benchmarks/gpu_check.py --device cpu --size tiny # the same code path on CPU (how the tests run it)

What runs (nothing is downloaded):
- a randomly initialised Qwen2.5-VL with 3B-like dimensions built from a config in code (hidden 2048, 36 layers,
  16 heads / 2 KV heads, MLP 11008, the real 151,936-token vocabulary; vision tower 32 blocks of 1280), saved
  with the tiny tokenizer (its ids are a subset of the vocabulary) and a processor budget of 448 x 448 pixels;
- the real system through `python -m diva_lightning fit`'s code (`run_cli`): Lightning's ModelParallelStrategy
  (FSDP2 on 1 GPU), `bf16-mixed`, the HF generate engine, DIVA advantages, one optimizer step;
- one round of 8 questions x (original + 1 variant) x 5 responses = 80 responses of up to 512 tokens (a random
  model rarely stops, so most responses use the whole budget), world boards drawn at 448 px, the image
  perturbations in Kornia on the GPU.

It prints and writes (`<out>/gpu_check.json`, `<out>/gpu_check.md`): rollout tokens/s (generated tokens / rollout
time), update tokens/s (prompt + completion tokens of the 80 sequences / update time), the update's MFU
(6 x non-embedding parameters x update tokens / update time / the GPU's dense bf16 peak; the vision tower's share
is left out, so the MFU is a slight under-estimate), and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
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
    """Collects the round's timings and token counts from the system's step outputs."""

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        enc = pl_module.bundle.encode(batch.problems, batch.images_per_prompt())
        self.prompt_tokens = enc["attention_mask"].sum(dim=1)  # [P]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
                           ) -> None:
        lengths = outputs["completion_lengths"].float()
        prompt = self.prompt_tokens.to(lengths.device)[outputs["prompt_ids"]].float()
        params = sum(p.numel() for n, p in pl_module.policy.named_parameters() if "embed_tokens" not in n)
        self.result = {
            "responses": int(lengths.numel()),
            "generated_tokens": int(lengths.sum()),
            "mean_response_tokens": float(lengths.mean()),
            "update_tokens": int((lengths + prompt).sum()),
            "timings_s": dict(outputs["timings"]),
            "step_s": time.perf_counter() - self.start,
            "non_embedding_params": int(params),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        }


def summarise(r: dict[str, Any], device_name: str) -> dict[str, Any]:
    t = r["timings_s"]
    out = dict(r)
    out["device"] = device_name
    out["rollout_tokens_per_s"] = r["generated_tokens"] / t["rollout"]
    out["update_tokens_per_s"] = r["update_tokens"] / t["update"]
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None)
    flops = 6.0 * r["non_embedding_params"] * r["update_tokens"]
    out["update_tflops_per_s"] = flops / t["update"] / 1e12
    out["update_mfu"] = None if peak is None else out["update_tflops_per_s"] / peak
    out["bf16_peak_tflops"] = peak
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from diva_lightning.cli import run_cli

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --device cpu --size tiny to try the code path on a CPU)")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    print(f"[gpu_check] building a random {args.size} Qwen2.5-VL in {work} ...", flush=True)
    t0 = time.perf_counter()
    policy = build_model(work / "policy", args.size, args.image_px)
    cell = args.image_px // 4
    records = generate_world(args.questions * 2, seed=0, split="train", cell_px=cell)
    data = write_records(records, work / "data" / "train.jsonl")
    print(f"[gpu_check] model and data ready in {time.perf_counter() - t0:.0f} s; one round ...", flush=True)
    probe = Probe()
    args_fit = [
        "--config", str(REPO / "experiments/full.yaml"), "--config", str(REPO / "experiments/fsdp.yaml"),
        "--model.init_args.policy", str(policy), "--build_base_policy", "false",
        "--trainer.accelerator", args.device, "--trainer.devices", "1",
        "--trainer.strategy.init_args.data_parallel_size", "1",
        "--trainer.precision", "bf16-mixed" if cuda else "32-true",
        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.val_check_interval", "1000",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--trainer.enable_checkpointing",
        "false", "--trainer.callbacks", "[]",
        "--data.init_args.train_source", str(data), "--data.init_args.val_source", str(data),
        "--data.init_args.test_source", "null", "--data.init_args.questions_per_step", str(args.questions),
        "--model.init_args.train_sampling.max_new_tokens", str(args.max_new_tokens),
        "--model.init_args.micro_batch_size", str(args.micro_batch),
        "--model.init_args.policy_config.gradient_checkpointing", "true",
        "--model.init_args.policy_config.min_pixels", "3136",
        "--model.init_args.policy_config.max_pixels", str(args.image_px * args.image_px),
    ]
    cli = run_cli(args_fit, run=False, save_config_callback=None)  # fit's objects, run below; no config.yaml
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    return summarise(probe.result, name)


def report(result: dict[str, Any], out: Path) -> str:
    t = result["timings_s"]
    mfu = "n/a (unknown GPU peak)" if result["update_mfu"] is None else f"{100 * result['update_mfu']:.1f}%"
    peak = "n/a" if result["peak_memory_gib"] is None else f"{result['peak_memory_gib']:.1f} GiB"
    lines = [
        f"# GPU check ({time.strftime('%Y-%m-%d')}, {result['device']})",
        "",
        "| what | value |",
        "|---|---|",
        f"| responses / mean length | {result['responses']} / {result['mean_response_tokens']:.0f} tokens |",
        f"| rollout (HF generate) | {t['rollout']:.1f} s, {result['rollout_tokens_per_s']:.0f} tokens/s |",
        f"| update (1 step, FSDP2) | {t['update']:.1f} s, {result['update_tokens_per_s']:.0f} tokens/s |",
        f"| update MFU (6 N T / t vs {result['bf16_peak_tflops']} TFLOP/s bf16) | {mfu} "
        f"({result['update_tflops_per_s']:.1f} TFLOP/s) |",
        f"| peak GPU memory | {peak} |",
        f"| reward + advantage | {t['reward'] + t['advantage']:.2f} s |",
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
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--image-px", type=int, default=448, help="board side in pixels (a multiple of 28 x 4)")
    parser.add_argument("--micro-batch", type=int, default=8, help="responses per forward/backward")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs/gpu_check")))
    args = parser.parse_args(argv)
    result = run(args)
    print(report(result, args.out), flush=True)


if __name__ == "__main__":
    main()
