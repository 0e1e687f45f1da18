"""Log-prob memory benchmark: peak extra memory of scoring + backward, full-vocabulary logits vs chunked.

    python benchmarks/logprob_memory.py [--sizes 8x512,2x512] [--chunk-tokens 256] [--out FILE]   # ~5 min, 12 GiB

Issue #10 item 2. Target: the chunked path's peak extra memory is at most 1/4 of one float32 [B, T, V] logits
tensor (B=8 responses, T=512 completion tokens, V=151,936: one tensor is 2.32 GiB, so <= 0.58 GiB).

Model. A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` built from a config in code (no download)
with Qwen2.5-VL's real 151,936-token vocabulary and special-token ids, untied embeddings as in the 7B, and small
hidden sizes (text: 64 wide, 1 layer; vision: 1 block), so that the output layer dominates as it does at scale.
Prompts are 16 text tokens (no image: images change nothing in the output layer). Each row is scored and
back-propagated once: loss = -(sum log p + 0.01 * sum H) / tokens, with entropy, at the shipped temperature 1.0.

The two paths, on the same model, inputs and seed:
- ``full``: today's formula before chunking (``model(...).logits`` over the completion, ``.float() /
  temperature``, ``logsumexp``, ``gather``, ``softmax`` for the entropy), copied here verbatim as the baseline;
- ``chunked``: ``diva_lightning.models.logprobs.completion_logprobs`` (hidden states scored ``chunk_tokens``
  at a time by a custom autograd function that recomputes each chunk's logits in backward).
A third run, ``probe``, allocates and fills exactly one float32 [B, T, V] tensor: the method must report 1.00
for it, which checks the measurement itself.

How memory is measured (CPU). Each (size, path) runs in a fresh subprocess, so nothing one path allocated or
cached can hide in the other's numbers. In the child: build the model and inputs, run the same path once at a
small size (first-call allocations such as thread pools are not the step's memory), drop the gradients, then
reset the kernel's resident-set high-water mark (write ``5`` to ``/proc/self/clear_refs``), read ``VmRSS`` as
the baseline, run forward + backward, and read ``VmHWM``: peak extra = VmHWM - baseline. The kernel updates the
high-water mark before it unmaps or discards pages, so short-lived peaks are caught (no sampling). Children run
with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every large block with mmap and returns it on free
instead of raising the threshold and recycling freed heap that the RSS would not show as new. tracemalloc
would not see torch's allocations, and a sampling thread would miss short peaks. Peak extra includes the
parameter gradients (the same for both paths; printed separately) and all autograd-saved activations.

The children's log-probs, entropies and output/embedding-layer gradients are compared: the chunked path must
equal the full-logits one (max abs difference printed). The full path needs about 6 float32 [B, T, V] tensors of
free memory; it is skipped (and the table says so) when /proc/meminfo's MemAvailable is short, unless --force.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from diva_lightning.models.logprobs import DEFAULT_CHUNK_TOKENS, completion_logprobs

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
VOCAB = 151_936  # Qwen2.5-VL
# Qwen2.5-VL's special-token ids (tokenizer.json of the released checkpoints)
QWEN_IDS = {"pad": 151643, "eos": 151645, "vision_start": 151652, "vision_end": 151653, "image": 151655,
            "video": 151656}
TARGET_FRACTION = 0.25
TARGET_SIZE = (8, 512)  # the issue sets the target at B=8, T=512; the chunked peak does not grow with B * T
PROMPT_TOKENS = 16
ENTROPY_COEF = 0.01
Score = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def build_model(*, vocab: int, hidden: int, seed: int) -> Qwen2_5_VLForConditionalGeneration:
    """A random Qwen2.5-VL with the real vocabulary and small hidden sizes (float32, CPU)."""
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
            "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": QWEN_IDS["eos"],
            "pad_token_id": QWEN_IDS["pad"],
        },
        vision_config={
            "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": hidden,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
            "fullatt_block_indexes": [0],
        },
        image_token_id=QWEN_IDS["image"], video_token_id=QWEN_IDS["video"],
        vision_start_token_id=QWEN_IDS["vision_start"], vision_end_token_id=QWEN_IDS["vision_end"],
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.train()


def make_inputs(batch: int, tokens: int, *, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Text-only prompts [B, 16] and completions [B, T] of ordinary tokens (ids below the special tokens)."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(0, QWEN_IDS["pad"], (batch, PROMPT_TOKENS), generator=g)
    prompt = {"input_ids": prompt_ids, "attention_mask": torch.ones_like(prompt_ids),
              "mm_token_type_ids": torch.zeros_like(prompt_ids, dtype=torch.int32)}
    completion = torch.randint(0, QWEN_IDS["pad"], (batch, tokens), generator=g)
    mask = torch.ones_like(completion)
    mask[0, tokens // 2:] = 0  # one response ended early
    return prompt, completion, mask


def full_logits_score(model: Any, prompt_inputs: Mapping[str, torch.Tensor], completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor, *, temperature: float, **_: Any
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: ``models/logprobs._score`` as it was before chunking (commit af53763), plus the mask."""
    t = completion_ids.shape[1]
    inputs = dict(prompt_inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(completion_ids)], dim=1)
    mm = inputs["mm_token_type_ids"]
    inputs["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(completion_ids, dtype=mm.dtype)], dim=1)
    logits = model(**inputs, use_cache=False, logits_to_keep=t + 1).logits[:, :-1, :]
    logits = logits.float() / temperature  # [n, T, V]
    logz = torch.logsumexp(logits, dim=-1)  # [n, T]
    logp = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - logz
    probs = torch.softmax(logits, dim=-1)
    entropy = logz - (probs * logits).sum(dim=-1)  # H = log Z - E_p[logit]
    mask = completion_mask.float()
    return logp * mask, entropy * mask


def chunked_score(model: Any, prompt_inputs: Mapping[str, torch.Tensor], completion_ids: torch.Tensor,
                  completion_mask: torch.Tensor, *, temperature: float, chunk_tokens: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    return completion_logprobs(model, prompt_inputs, completion_ids, completion_mask, temperature=temperature,
                               with_entropy=True, chunk_tokens=chunk_tokens)


PATHS: dict[str, Score] = {"full": full_logits_score, "chunked": chunked_score}


# ------------------------------------------------------------------------------------------------ measurement
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status (Linux only)")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _step(model: Any, score: Score, prompt: dict[str, torch.Tensor], comp: torch.Tensor, mask: torch.Tensor,
          args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    logp, ent = score(model, prompt, comp, mask, temperature=args.temperature, chunk_tokens=args.chunk_tokens)
    assert ent is not None
    loss = -(logp.sum() + ENTROPY_COEF * ent.sum()) / mask.sum()
    loss.backward()
    return logp.detach(), ent.detach()


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One (size, path) measurement in this fresh process; prints and returns a JSON-able dict."""
    torch.set_num_threads(args.threads)
    vocab = args.vocab
    if args.path == "probe":  # one float32 [B, T, V] tensor, filled: the method must read 1.00 tensor
        gc.collect()
        _reset_peak()
        base = _status_kib("VmRSS")
        x = torch.empty(args.batch, args.tokens, vocab).fill_(1.0)
        del x
        return {"path": "probe", "peak_extra_bytes": (_status_kib("VmHWM") - base) * 1024, "seconds": 0.0}
    model = build_model(vocab=vocab, hidden=args.hidden, seed=args.seed)
    score = PATHS[args.path]
    small = make_inputs(1, 8, seed=args.seed + 1)
    _step(model, score, *small, args)  # warm-up: first-call allocations are not the step's memory
    model.zero_grad(set_to_none=True)
    prompt, comp, mask = make_inputs(args.batch, args.tokens, seed=args.seed)
    del small
    gc.collect()
    _reset_peak()
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    logp, ent = _step(model, score, prompt, comp, mask, args)
    seconds = time.perf_counter() - start
    peak_extra = (_status_kib("VmHWM") - base) * 1024
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    if args.dump:
        keep = ("lm_head.weight", "model.language_model.embed_tokens.weight")
        torch.save({"logp": logp, "entropy": ent, **{k: grads[k] for k in keep}}, args.dump)
    return {"path": args.path, "peak_extra_bytes": peak_extra, "seconds": seconds,
            "param_grad_bytes": sum(g.numel() * g.element_size() for g in grads.values())}


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(path: str, batch: int, tokens: int, args: argparse.Namespace, dump: Path | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", path, "--sizes", f"{batch}x{tokens}", "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--chunk-tokens", str(args.chunk_tokens), "--temperature",
           str(args.temperature), "--threads", str(args.threads), "--seed", str(args.seed)]
    if dump is not None:
        cmd += ["--dump", str(dump)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{path} {batch}x{tokens} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(batch: int, tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    tensor = batch * tokens * args.vocab * 4
    row: dict[str, Any] = {"batch": batch, "tokens": tokens, "tensor_bytes": tensor}
    with tempfile.TemporaryDirectory() as tmp:
        dumps = {p: Path(tmp) / f"{p}.pt" for p in PATHS}
        row["probe"] = run_child("probe", batch, tokens, args, None)
        print(f"[{batch}x{tokens}] probe: {row['probe']['peak_extra_bytes'] / tensor:.2f} tensor", flush=True)
        for path in ("chunked", "full"):
            need = 6 * tensor + GIB if path == "full" else 2 * GIB
            if _mem_available() < need and not args.force:
                row[path] = {"skipped": f"needs ~{need / GIB:.1f} GiB, {_mem_available() / GIB:.1f} GiB available"}
                print(f"[{batch}x{tokens}] {path}: skipped ({row[path]['skipped']})", flush=True)
                continue
            row[path] = run_child(path, batch, tokens, args, dumps[path])
            r = row[path]
            print(f"[{batch}x{tokens}] {path}: peak extra {r['peak_extra_bytes'] / GIB:.3f} GiB "
                  f"= {r['peak_extra_bytes'] / tensor:.3f} tensor, {r['seconds']:.1f} s", flush=True)
        if all("peak_extra_bytes" in row[p] for p in PATHS):
            a, b = torch.load(dumps["full"]), torch.load(dumps["chunked"])
            row["max_abs_diff"] = {k: float((a[k] - b[k]).abs().max()) for k in a}
    return row


# ---------------------------------------------------------------------------------------------------- report
def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def _cell(r: dict[str, Any], tensor: int) -> str:
    if "skipped" in r:
        return f"not run ({r['skipped']})"
    return f"{r['peak_extra_bytes'] / GIB:.3f} GiB ({r['peak_extra_bytes'] / tensor:.2f}x)"


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> tuple[str, bool]:
    lines = [
        "# Log-prob memory: full-vocabulary logits vs chunked scoring",
        "",
        f"Date: {args.date}. Machine: {_cpu_name()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, "
        f"{args.threads} threads, Python {platform.python_version()}.",
        f"Model: random Qwen2.5-VL, V = {args.vocab:,}, text hidden {args.hidden}, 1 layer; prompts "
        f"{PROMPT_TOKENS} tokens; temperature {args.temperature}; entropy on; chunk_tokens = {args.chunk_tokens}.",
        "Peak extra = VmHWM - VmRSS around one forward + backward, each path in a fresh process "
        "(`benchmarks/logprob_memory.py` docstring). `x` = multiples of one float32 [B, T, V] tensor; "
        "the probe (one such tensor, allocated and filled) checks the method.",
        "",
        "| B x T | one [B,T,V] fp32 | probe | full logits (today) | chunked (new) | chunked / full | "
        "param grads (both) | time full / chunked | target: chunked <= 0.25x at 8 x 512 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ok = True
    for row in rows:
        tensor = row["tensor_bytes"]
        full, chunked = row["full"], row["chunked"]
        ratio = (f"{chunked['peak_extra_bytes'] / full['peak_extra_bytes']:.3f}"
                 if "skipped" not in full and "skipped" not in chunked else "-")
        times = " / ".join("-" if "skipped" in r else f"{r['seconds']:.1f} s" for r in (full, chunked))
        grads = "-" if "skipped" in chunked else f"{chunked['param_grad_bytes'] / GIB:.3f} GiB"
        passed = "skipped" not in chunked and chunked["peak_extra_bytes"] <= TARGET_FRACTION * tensor
        at_target = (row["batch"], row["tokens"]) == TARGET_SIZE
        ok &= passed or not at_target
        verdict = ("PASS" if passed else "FAIL") if at_target else "n/a (other size)"
        lines.append(
            f"| {row['batch']} x {row['tokens']} | {tensor / GIB:.2f} GiB | "
            f"{row['probe']['peak_extra_bytes'] / tensor:.2f}x | {_cell(full, tensor)} | {_cell(chunked, tensor)} | "
            f"{ratio} | {grads} | {times} | {verdict} |"
        )
    lines += ["", "Equal values (max abs difference, chunked vs full logits):", ""]
    for row in rows:
        diff = row.get("max_abs_diff")
        text = ", ".join(f"{k} {v:.1e}" for k, v in diff.items()) if diff else "not compared (a path was skipped)"
        lines.append(f"- {row['batch']} x {row['tokens']}: {text}")
    buffers = 2 * args.chunk_tokens * args.vocab * 4
    lines += [
        "",
        f"The chunked peak is about two float32 [chunk_tokens, V] buffers ({buffers / GIB:.2f} GiB) plus the parameter "
        "gradients, whatever B x T is (compare the rows); `chunk_tokens` trades it against the number of matmuls. "
        "The full path grows as ~5 [B, T, V] tensors. Times are single runs on a shared machine, not a speed claim.",
    ]
    return "\n".join(lines) + "\n", ok


def _sizes(text: str) -> list[tuple[int, int]]:
    return [(int(b), int(t)) for b, t in (s.split("x") for s in text.split(","))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="8x512,2x512", help="comma-separated BxT (default: the issue's 8x512 and a "
                    "smaller 2x512, which shows the full path growing with B * T and the chunked one not)")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--hidden", type=int, default=64, help="text hidden size of the random model")
    ap.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="run the full path even when memory looks short")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "logprob_memory.md")
    ap.add_argument("--child", choices=["probe", *PATHS], help=argparse.SUPPRESS)
    ap.add_argument("--dump", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--report-only", type=Path, metavar="JSON", help="re-render --out from a saved run's .json")
    args = ap.parse_args(argv)
    if args.child:
        args.path = args.child
        args.batch, args.tokens = _sizes(args.sizes)[0]
        print(json.dumps(child(args)))
        return 0
    if args.report_only:
        rows = json.loads(args.report_only.read_text())
    else:
        rows = [measure(b, t, args) for b, t in _sizes(args.sizes)]
    text, ok = report(rows, args)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
