"""One real-vLLM session on the shipped tiny policy, run in its own process by tests/vllm/test_vllm_engine.py.

vLLM initialises torch.distributed, replaces ``torch.set_num_threads`` and seeds globally, so it never runs inside
the pytest process. This script drives ``VLLMEngine`` (the code path training uses) and the trainer's own scoring
(``completion_logprobs``), and writes what it measured as JSON to the path given as its only argument; the test
asserts on it.
"""

from __future__ import annotations

import copy
import json
import sys

import torch

from diva_lightning.data.schema import decode_image
from diva_lightning.data.world import generate_world
from diva_lightning.models.logprobs import completion_logprobs
from diva_lightning.models.policy import PolicyBundle, load_policy
from diva_lightning.rollout.base import Rollout
from diva_lightning.rollout.vllm import VLLMEngine

G, MAX_NEW = 3, 12


def encode(bundle: PolicyBundle, records: list) -> dict[str, torch.Tensor]:
    return bundle.encode([r.problem for r in records], [[decode_image(r.images[0])] for r in records])


@torch.no_grad()
def trainer_logp(model: torch.nn.Module, inputs: dict, roll: Rollout, temperature: float) -> torch.Tensor:
    logp, _ = completion_logprobs(model, inputs, roll.completion_ids, roll.completion_mask,
                                  prompt_index=roll.prompt_index, temperature=temperature)
    return logp


def gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest |a - b| over the real tokens."""
    return float(((a - b).abs() * mask).max())


def sequences(roll: Rollout) -> list[list[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(roll.completion_ids, roll.completion_mask)]


def main(out_path: str) -> None:
    torch.manual_seed(0)
    bundle = load_policy("embedded")
    model = bundle.model
    engine = VLLMEngine(llm_kwargs={"enforce_eager": True, "max_model_len": 1024})
    engine.setup(bundle, rank=0, world_size=1, seed=0, sharded=False)
    records = [r for r in generate_world(12, seed=3, split="val") if r.images][:3]
    inputs = encode(bundle, records)
    result: dict = {"dtype": str(engine.llm.llm_engine.model_config.dtype)}

    # 1. generation with images, at two temperatures: shapes, text tokens only, engine vs trainer log-probs
    for temperature in (1.0, 0.7):
        roll = engine.generate(bundle, inputs, num_generations=G, temperature=temperature,
                               max_new_tokens=MAX_NEW, seed=11)
        mask = roll.completion_mask.float()
        real = roll.completion_ids[roll.completion_mask.bool()]
        result[f"t{temperature}"] = {
            "ids_shape": list(roll.completion_ids.shape), "logp_shape": list(roll.old_logp.shape),
            "prompt_index": roll.prompt_index.tolist(), "texts": len(roll.texts),
            "vision_tokens_sampled": int(torch.isin(real, torch.tensor(bundle.vision_token_ids)).sum()),
            "max_token_id": int(real.max()), "vocab": int(model.config.get_text_config().vocab_size),
            "real_tokens": int(mask.sum()),
            "gap": gap(roll.old_logp, trainer_logp(model, inputs, roll, temperature), mask),
            "mean_logp": float((roll.old_logp * mask).sum() / mask.sum()),
        }

    # 2. weight sync after an optimizer step (language model and vision tower both move)
    before = copy.deepcopy(model)
    roll = engine.generate(bundle, inputs, num_generations=G, temperature=1.0, max_new_tokens=MAX_NEW, seed=5)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    logp, _ = completion_logprobs(model, inputs, roll.completion_ids, roll.completion_mask,
                                  prompt_index=roll.prompt_index)
    (-(logp * roll.completion_mask).sum()).backward()  # make the sampled tokens likelier
    optimizer.step()
    model.eval()
    engine.sync_weights(model)
    loads = engine.weight_loads
    after = engine.generate(bundle, inputs, num_generations=G, temperature=1.0, max_new_tokens=MAX_NEW, seed=5)
    mask = after.completion_mask.float()
    result["sync"] = {
        "weight_loads": engine.weight_loads - loads,
        "gap_new": gap(after.old_logp, trainer_logp(model, inputs, after, 1.0), mask),
        "gap_old": gap(after.old_logp, trainer_logp(before, inputs, after, 1.0), mask),
    }

    # 3. the encoder cache: only the vision tower changes, the same images are sent again
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".visual." in f".{name}":
                p.add_(torch.randn_like(p) * 0.5 * p.std().clamp_min(1e-3))
    engine.sync_weights(model)
    again = engine.generate(bundle, inputs, num_generations=G, temperature=1.0, max_new_tokens=MAX_NEW, seed=5)
    mask = again.completion_mask.float()
    vision_before = copy.deepcopy(model)
    vision_before.load_state_dict(
        {k: v for k, v in after_state(before, model).items()})  # the language model of now, the old vision tower
    result["vision"] = {
        "gap_new": gap(again.old_logp, trainer_logp(model, inputs, again, 1.0), mask),
        "gap_stale": gap(again.old_logp, trainer_logp(vision_before, inputs, again, 1.0), mask),
    }

    # 4. seeding: one prompt twice in a batch, on rank 0 and on rank 1, and the same call repeated
    # (with the output layer zeroed the next-token distribution is uniform over the text vocabulary: two different
    # streams give the same 12 tokens with negligible probability, the same stream always does)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    engine.sync_weights(model)
    twice = encode(bundle, [records[0], records[0]])
    hot = {"num_generations": 4, "temperature": 1.0, "max_new_tokens": MAX_NEW, "seed": 21}
    r0 = engine.generate(bundle, twice, **hot)
    r0_again = engine.generate(bundle, twice, **hot)
    engine.setup(bundle, rank=1, world_size=1, seed=0, sharded=False)  # the engine exists: only the rank changes
    r1 = engine.generate(bundle, twice, **hot)
    s0, s1 = sequences(r0), sequences(r1)
    result["seeding"] = {
        "row0": s0[:4], "row1": s0[4:], "rank1_row0": s1[:4],
        "repeat_equal": sequences(r0_again) == s0,
        "distinct_rank0": len({tuple(s) for s in s0}), "distinct_both_ranks": len({tuple(s) for s in s0 + s1}),
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


def after_state(before: torch.nn.Module, now: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``now``'s state with the vision tower's entries taken from ``before``."""
    old = before.state_dict()
    return {k: (old[k] if ".visual." in f".{k}" else v) for k, v in now.state_dict().items()}


if __name__ == "__main__":
    main(sys.argv[1])
