"""What the update computes, before and after padding-free scoring (issue 25 items 2, 3, 5, 6).

    python benchmarks/update_cost.py [--repeats 3] [--budget 8192] [--threads 1] [--out FILE.md]

One process, the embedded policy (``policy: embedded``), two length distributions of one step's responses:

- ``embedded default``: 16 prompts with one image each (8 questions x 2 prompts, as experiments/full.yaml's step),
  G = 5 responses each, sampled by the embedded policy itself (temperature 1, 80-token budget);
- ``long tail``: the same prompts, response lengths drawn like the paper's recipe scaled to CPU (log-normal, mean
  ~ 0.2 x budget, budget 1,024 tokens, the longest ones truncated at the budget), random tokens.

For each, side by side in one run, **before** (the padded path: ``completion_logprobs``, prompts left-padded,
completions padded to the rollout's longest, micro-batches of ``micro_batch_size`` = 40 responses, each response's
image repeated) and **after** (``packed_logprobs``: real tokens only, packed per micro-batch of at most ``--budget``
tokens, each distinct image encoded once per forward; no-grad passes share the step's image features), in three
layouts: rows of the longest sequence under sdpa (the layout under sdpa/eager); one row per forward under sdpa
(which computes attention across the whole row: a dense block-causal mask); one row per forward under
``sdpa_varlen`` (the default: attention within each sequence, ``models.attention``, as flash-attention's varlen
kernels on a GPU):

- scored positions / real tokens: positions the decoder computed (a hook on the language model's input) over the
  real tokens (prompt without padding + completion through EOS) of the step;
- vision patch rows computed / distinct patch rows: rows the patch embedding saw (a hook) over the distinct images'
  rows, for generation (embedded default only: the lengths of the long tail are synthetic), the update, and the
  no-grad re-score an engine with its own weights needs (item 5);
- wall time of the update (one optimizer step's forwards and backwards, no optimizer) and of the re-score, medians
  over ``--repeats`` rounds that interleave the paths; and the largest difference of loss statistics, gradients and
  re-scored log-probs between the padded path and each packed one.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diva_lightning.data.schema import decode_image
from diva_lightning.data.world import generate_world
from diva_lightning.models.attention import VARLEN
from diva_lightning.models.embedded import EMBEDDED
from diva_lightning.models.logprobs import (
    completion_logprobs,
    packed_logprobs,
    repeat_prompt_inputs,
    sequence_lengths,
    step_images,
    vl_model,
)
from diva_lightning.models.policy import PolicyBundle, load_policy
from diva_lightning.rollout.base import Rollout
from diva_lightning.rollout.hf import HFGenerateEngine
from diva_lightning.training.config import LossConfig
from diva_lightning.training.ppo import PPOUpdate, UpdateBatch

ROOT = Path(__file__).resolve().parent.parent
G = 5
MICRO = 40  # experiments/full.yaml's micro_batch_size
# (label, packed, pack_width, attention, share_prompt): the padded path; packed rows of the longest sequence (the
# layout under sdpa/eager); one packed row per forward under sdpa (a dense mask across the row); one packed row per
# forward under sdpa_varlen (attention within each sequence, as flash-attention's varlen kernels do on a GPU); and
# the default: sdpa_varlen with each prompt computed once for its responses (share_prompt)
VARIANTS = (("before", False, None, "sdpa", False), ("after, rows, sdpa", True, None, "sdpa", False),
            ("after, one row, sdpa", True, 1 << 30, "sdpa", False),
            ("after, one row, sdpa_varlen", True, 1 << 30, VARLEN, False),
            ("after, shared prompt, sdpa_varlen", True, 1 << 30, VARLEN, True))
DEFAULT = "after, shared prompt, sdpa_varlen"


class Counter:
    """Positions the decoder computes and patch rows the vision tower embeds, via forward hooks."""

    def __init__(self, model: torch.nn.Module) -> None:
        inner = vl_model(model)
        self.positions = 0
        self.patch_rows = 0
        self.handles = [
            inner.language_model.register_forward_pre_hook(self._lm, with_kwargs=True),
            inner.visual.patch_embed.register_forward_hook(self._vision),
        ]

    def _lm(self, module: Any, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        self.positions += int(embeds.shape[0] * embeds.shape[1])

    def _vision(self, module: Any, args: tuple, out: Any) -> None:
        self.patch_rows += int(args[0].shape[0])

    def take(self) -> tuple[int, int]:
        out = (self.positions, self.patch_rows)
        self.positions = self.patch_rows = 0
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _prompts(bundle: PolicyBundle) -> dict[str, Tensor]:
    records = generate_world(16, seed=0, split="train")
    return bundle.encode([r.problem for r in records], [[decode_image(r.images[0])] for r in records])


def _long_tail(bundle: PolicyBundle, inputs: dict[str, Tensor], *, budget: int = 1024, seed: int = 0) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    n = inputs["input_ids"].shape[0] * G
    lengths = torch.exp(torch.randn(n, generator=g) * 0.9 + torch.log(torch.tensor(budget * 0.13))).long()
    lengths = lengths.clamp(8, budget)
    vocab = int(bundle.model.config.text_config.vocab_size)
    special = set(bundle.stop_token_ids) | set(bundle.vision_token_ids)
    allowed = torch.tensor([t for t in range(min(vocab, len(bundle.tokenizer))) if t not in special])
    ids = allowed[torch.randint(len(allowed), (n, int(lengths.max())), generator=g)]
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, int(bundle.tokenizer.pad_token_id)))
    return Rollout(prompt_index=torch.arange(n // G).repeat_interleave(G), completion_ids=ids, completion_mask=mask,
                   texts=[""] * n, finished=lengths < budget)


class Hooks:
    def __init__(self, model: torch.nn.Module, inputs: dict[str, Tensor], roll: Rollout, packed: bool,
                 pack_width: int | None = None, share_prompt: bool = False) -> None:
        self.model, self.inputs, self.roll, self.packed = model, inputs, roll, packed
        self.kw = {"pack_width": pack_width, "share_prompt": share_prompt} if packed else {}
        self.grads: dict[str, Tensor] = {}
        self.forwards = 0

    def score(self, rows: list[int], *, entropy: bool) -> tuple[Tensor, Tensor | None]:
        self.forwards += 1
        r = self.roll
        fn = packed_logprobs if self.packed else completion_logprobs
        return fn(self.model, self.inputs, r.completion_ids[rows], r.completion_mask[rows],  # type: ignore[operator]
                  prompt_index=r.prompt_index[rows], with_entropy=entropy, **self.kw)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.model.zero_grad(set_to_none=True)

    def token_denominator(self, mask: Tensor) -> float:
        return float(mask.sum())

    def max_over_ranks(self, value: int) -> int:
        return value


def _rescore(model: torch.nn.Module, inputs: dict[str, Tensor], roll: Rollout, packed: bool, budget: int,
             pack_width: int | None = None, share_prompt: bool = False) -> Tensor:
    """The no-grad pass that re-scores old log-probs (an engine with its own weights), micro-batched as the module."""
    n = roll.num_responses
    out = torch.zeros(roll.completion_ids.shape)
    with torch.no_grad():
        if not packed:
            for s in range(0, n, MICRO):
                rows = list(range(s, min(n, s + MICRO)))
                out[rows] = completion_logprobs(model, inputs, roll.completion_ids[rows], roll.completion_mask[rows],
                                                prompt_index=roll.prompt_index[rows])[0]
            return out
        batch = _batch(inputs, roll, share_prompt)
        parts = PPOUpdate(LossConfig(), max_tokens_per_micro_batch=budget).micro_batches(
            list(range(n)), batch, Hooks(model, inputs, roll, True))
        images = step_images(model, inputs)
        for rows in parts:
            out[rows] = packed_logprobs(model, inputs, roll.completion_ids[rows], roll.completion_mask[rows],
                                        prompt_index=roll.prompt_index[rows], images=images, pack_width=pack_width,
                                        share_prompt=share_prompt)[0]
    return out


def _batch(inputs: dict[str, Tensor], roll: Rollout, share_prompt: bool = False) -> UpdateBatch:
    """The update's batch; with ``share_prompt`` the token budget counts each prompt once per micro-batch, as the
    module does (``UpdateBatch.shared_prompt_lens``)."""
    g = torch.Generator().manual_seed(0)
    mask = roll.completion_mask.bool()
    shared = inputs["attention_mask"].sum(dim=1)[roll.prompt_index] if share_prompt else None
    return UpdateBatch(advantages=torch.randn(mask.shape[0], generator=g), mask=mask,
                       seq_lens=sequence_lengths(inputs, roll.prompt_index, roll.completion_mask),
                       groups=roll.prompt_index, shared_prompt_lens=shared)


def measure(name: str, bundle: PolicyBundle, inputs: dict[str, Tensor], roll: Rollout, *, budget: int,
            repeats: int, generation: dict[str, float] | None) -> dict[str, Any]:
    model = bundle.model.train()
    counter = Counter(model)
    real = int(sequence_lengths(inputs, roll.prompt_index, roll.completion_mask).sum())
    distinct = int(inputs["image_grid_thw"].prod(-1).sum())
    out: dict[str, Any] = {"name": name, "responses": roll.num_responses, "real_tokens": real,
                           "distinct_patch_rows": distinct,
                           "mean_completion": float(roll.completion_mask.sum(1).float().mean()),
                           "max_completion": int(roll.completion_mask.sum(1).max())}
    results: dict[str, dict[str, Any]] = {}
    runs = {}
    for label, packed, width, attention, share in VARIANTS:  # one step each: the counts, and a warm-up
        model.set_attn_implementation(attention)
        update = PPOUpdate(LossConfig(), micro_batch_size=None if packed else MICRO,
                           max_tokens_per_micro_batch=budget if packed else None, max_len=roll.completion_ids.shape[1])
        hooks = Hooks(model, inputs, roll, packed, width, share)
        counter.take()
        stats = update.run(_batch(inputs, roll, share), hooks, generator=torch.Generator())
        positions, rows = counter.take()
        rescored = _rescore(model, inputs, roll, packed, budget, width, share)
        _, rescore_rows = counter.take()
        results[label] = {"stats": stats, "grads": hooks.grads, "rescored": rescored}
        out[label] = {"positions_per_real_token": positions / real, "update_patch_rows_per_distinct": rows / distinct,
                      "rescore_patch_rows_per_distinct": rescore_rows / distinct, "forwards": hooks.forwards,
                      "update_times": [], "rescore_times": []}
        if generation is not None:
            out[label]["generation_patch_rows_per_distinct"] = generation["after" if packed else "before"] / distinct
        runs[label] = (update, hooks, packed, width, attention, share)
    for _ in range(repeats):  # timed rounds interleave the paths, so load drift on a shared machine hits all alike
        for label, (update, hooks, packed, width, attention, share) in runs.items():
            model.set_attn_implementation(attention)
            t = time.perf_counter()
            update.run(_batch(inputs, roll, share), hooks, generator=torch.Generator())
            out[label]["update_times"].append(time.perf_counter() - t)
            t = time.perf_counter()
            _rescore(model, inputs, roll, packed, budget, width, share)
            out[label]["rescore_times"].append(time.perf_counter() - t)
    for label in runs:
        out[label]["update_s"] = statistics.median(out[label]["update_times"])
        out[label]["rescore_s"] = statistics.median(out[label]["rescore_times"])
    counter.close()
    model.set_attn_implementation("sdpa")
    b = results["before"]
    after = [results[label] for label, packed, *_ in VARIANTS if packed]
    out["max_stat_diff"] = max(abs(b["stats"][k] - a["stats"][k]) for a in after for k in b["stats"])
    out["max_grad_diff"] = max(float((b["grads"][k] - a["grads"][k]).abs().max()) for a in after for k in b["grads"])
    out["max_rescore_diff"] = max(float((b["rescored"] - a["rescored"]).abs().max()) for a in after)
    return out


def _generation_rows(bundle: PolicyBundle, inputs: dict[str, Tensor]) -> tuple[dict[str, float], Rollout]:
    """Patch rows embedded by one rollout: before (each prompt repeated G times, as the engine used to), after."""
    counter = Counter(bundle.model)
    engine = HFGenerateEngine()
    with torch.no_grad():
        rep = repeat_prompt_inputs(inputs, torch.arange(inputs["input_ids"].shape[0]).repeat_interleave(G),
                                   image_token_id=bundle.image_token_id, merge_size=bundle.vision_spec.merge_size)
        bundle.model.generate(**rep, generation_config=engine.generation_config(
            bundle, temperature=1.0, top_p=1.0, max_new_tokens=4, do_sample=True))
        before = counter.take()[1]
        roll = engine.generate(bundle, inputs, num_generations=G, max_new_tokens=80, seed=0)
        after = counter.take()[1]
    counter.close()
    return {"before": before, "after": after}, roll


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=8192, help="max_tokens_per_micro_batch of the after path")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "update_cost.md"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a machine shared with other work, OpenMP threads that wait "
                             "for a descheduled peer made 2-thread timings up to 10x slower and noisy)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bundle = load_policy(EMBEDDED)
    inputs = _prompts(bundle)
    print("[update_cost] sampling the embedded default's responses ...", flush=True)
    gen_rows, roll = _generation_rows(bundle, inputs)
    rows = []
    for name, r, gen in (("embedded default", roll, gen_rows), ("long tail (CPU-scaled paper recipe)",
                                                                  _long_tail(bundle, inputs), None)):
        print(f"[update_cost] {name}: {r.num_responses} responses ...", flush=True)
        rows.append(measure(name, bundle, inputs, r, budget=args.budget, repeats=args.repeats, generation=gen))
    write(rows, args, Path(args.out))


def write(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> None:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"# update_cost ({time.strftime('%Y-%m-%d')}, {cpu}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; before = padded, micro_batch_size {MICRO}; after = packed, "
        f"max_tokens_per_micro_batch {args.budget}, rows of the longest sequence or one row, under sdpa or "
        f"sdpa_varlen; medians of "
        f"{args.repeats})", "",
        "| distribution | responses | mean / max completion | real tokens | path | scored positions / real tokens "
        "| patch rows / distinct: generation, update, re-score | forwards | update s | re-score s |",
        "|---|---:|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        for label, *_ in VARIANTS:
            m = r[label]
            gen = m.get("generation_patch_rows_per_distinct")
            lines.append(
                f"| {r['name']} | {r['responses']} | {r['mean_completion']:.0f} / {r['max_completion']} | "
                f"{r['real_tokens']:,} | {label} | {m['positions_per_real_token']:.3f} | "
                f"{'-' if gen is None else f'{gen:.2f}'}, {m['update_patch_rows_per_distinct']:.2f}, "
                f"{m['rescore_patch_rows_per_distinct']:.2f} | {m['forwards']} | {m['update_s']:.2f} | "
                f"{m['rescore_s']:.2f} |")
    lines.append("")
    for r in rows:
        b, d = r["before"], r[DEFAULT]
        others = ", ".join(f"{label}: {b['update_s'] / r[label]['update_s']:.2f}x"
                           for label, packed, *_ in VARIANTS if packed and label != DEFAULT)
        lines.append(f"- {r['name']}: the default ({DEFAULT}) updates {b['update_s'] / d['update_s']:.2f}x as fast "
                     f"as before ({others}) and re-scores {b['rescore_s'] / d['rescore_s']:.2f}x as fast; the re-score "
                     f"costs {d['rescore_s'] / d['update_s']:.0%} of the default's update; largest difference to the "
                     f"padded path: loss statistics {r['max_stat_diff']:.1e}, gradients {r['max_grad_diff']:.1e}, "
                     f"re-scored log-probs {r['max_rescore_diff']:.1e}")
    text = "\n".join(lines) + "\n"
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"[update_cost] written {out}")


if __name__ == "__main__":
    main()
