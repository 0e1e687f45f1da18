"""`training.ppo.UpdateHooks` over the tiny model for tests: scores padded, packed, or packed with shared prompts,
records the forwards and each optimizer step's gradients instead of stepping; and a small round to update on."""

from __future__ import annotations

from torch import Tensor

from diva_lightning.data.schema import decode_image
from diva_lightning.data.world import generate_world
from diva_lightning.models.logprobs import completion_logprobs, packed_logprobs
from diva_lightning.models.policy import PolicyBundle, load_policy
from diva_lightning.rollout.base import Rollout
from diva_lightning.rollout.hf import HFGenerateEngine


def small_round(policy_dir: str, *, prompts: int = 2, generations: int = 4, max_new_tokens: int = 6
                ) -> tuple[PolicyBundle, dict[str, Tensor], Rollout]:
    """The tiny policy, ``prompts`` world questions with their image, and ``generations`` sampled responses each."""
    bundle = load_policy(policy_dir)
    records = generate_world(prompts, seed=0, split="train")
    inputs = bundle.encode([r.problem for r in records], [[decode_image(r.images[0])] for r in records])
    roll = HFGenerateEngine().generate(bundle, inputs, num_generations=generations, max_new_tokens=max_new_tokens,
                                       seed=0)
    return bundle, inputs, roll


class RecordingHooks:
    """UpdateHooks over ``bundle.model``: the padded path (``completion_logprobs``, the reference), packed
    (``packed_logprobs``), or packed in one row under ``sdpa_varlen`` with each prompt once (``share``, the module's
    default); ``forwards`` lists each forward's responses, ``steps`` each optimizer step's gradients."""

    def __init__(self, bundle: PolicyBundle, inputs: dict[str, Tensor], roll: Rollout, *, packed: bool = False,
                 share: bool = False, ranks_need: int = 0) -> None:
        self.model, self.inputs, self.roll, self.packed, self.share = bundle.model, inputs, roll, packed, share
        self.steps: list[dict[str, Tensor]] = []
        self.forwards: list[list[int]] = []
        self.ranks_need = ranks_need  # what another rank needs: max_over_ranks returns the larger

    @property
    def grads(self) -> dict[str, Tensor]:
        """The last optimizer step's gradients ({} before any)."""
        return self.steps[-1] if self.steps else {}

    def score(self, rows: list[int], *, entropy: bool) -> tuple[Tensor, Tensor | None]:
        self.forwards.append(rows)
        r = self.roll
        args = (self.model, self.inputs, r.completion_ids[rows], r.completion_mask[rows])
        if self.share:
            self.model.set_attn_implementation("sdpa_varlen")
            try:
                return packed_logprobs(*args, prompt_index=r.prompt_index[rows], with_entropy=entropy,
                                       pack_width=1 << 30, share_prompt=True)
            finally:
                self.model.set_attn_implementation("sdpa")
        fn = packed_logprobs if self.packed else completion_logprobs
        return fn(*args, prompt_index=r.prompt_index[rows], with_entropy=entropy)  # type: ignore[operator]

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.steps.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
        self.model.zero_grad(set_to_none=True)

    def token_denominator(self, mask: Tensor) -> float:
        return float(mask.sum())

    def max_over_ranks(self, value: int) -> int:
        return max(value, self.ranks_need)

