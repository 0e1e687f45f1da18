"""Rollout container and the engine protocol shared by the HF and vLLM generation back-ends."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diva_lightning.models.policy import PolicyBundle


@dataclass
class Rollout:
    """N = P * G sampled responses, grouped by prompt (the G responses of prompt p are contiguous).

    Attributes:
        prompt_index: [N] long, the prompt row (of the encoded batch) each response answers.
        completion_ids: [N, T] long, generated tokens, padded after the end.
        completion_mask: [N, T] long, 1 through the first stop token (inclusive), 0 after.
        texts: N decoded responses (up to, not including, the stop token; special tokens dropped).
        old_logp: [N, T] float32 log-probs under the sampling policy, when the engine provides them.
        finished: [N] bool, whether the response ended with a stop token (False = truncated).
    """

    prompt_index: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    old_logp: torch.Tensor | None = None
    finished: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.completion_ids.shape[0]
        if self.prompt_index.shape != (n,) or self.completion_mask.shape != self.completion_ids.shape:
            raise ValueError("prompt_index must be [N] and completion_mask [N, T] like completion_ids")
        if len(self.texts) != n:
            raise ValueError(f"{len(self.texts)} texts for {n} responses")

    def select(self, rows: list[int], prompt_index: torch.Tensor) -> Rollout:
        """Responses ``rows``, answering the prompts ``prompt_index`` [len(rows)] of some other batch."""
        index = torch.tensor(rows, dtype=torch.long, device=self.completion_ids.device)
        return Rollout(
            prompt_index=prompt_index.to(self.completion_ids.device),
            completion_ids=self.completion_ids[index],
            completion_mask=self.completion_mask[index],
            texts=[self.texts[i] for i in rows],
            old_logp=None if self.old_logp is None else self.old_logp[index],
            finished=None if self.finished is None else self.finished[index],
        )

    @staticmethod
    def cat(parts: Sequence[Rollout], *, pad_id: int) -> Rollout:
        """The responses of several rollouts, in order (completions right-padded to the longest)."""
        width = max(p.completion_ids.shape[1] for p in parts)

        def pad(t: torch.Tensor, value: float) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        with_logp = all(p.old_logp is not None for p in parts)
        with_finished = all(p.finished is not None for p in parts)
        return Rollout(
            prompt_index=torch.cat([p.prompt_index for p in parts]),
            completion_ids=torch.cat([pad(p.completion_ids, pad_id) for p in parts]),
            completion_mask=torch.cat([pad(p.completion_mask, 0) for p in parts]),
            texts=[t for p in parts for t in p.texts],
            old_logp=torch.cat([pad(p.old_logp, 0.0) for p in parts]) if with_logp else None,  # type: ignore[arg-type]
            finished=torch.cat([p.finished for p in parts]) if with_finished else None,  # type: ignore[misc]
        )

    @property
    def num_responses(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """[N] number of real tokens per response."""
        return self.completion_mask.sum(dim=1)


class RolloutEngine(ABC):
    """Samples ``num_generations`` responses for each encoded prompt, and keeps training on-policy.

    A base class rather than a Protocol: jsonargparse resolves ``class_path`` against it, so a user's engine is one
    subclass and one config line away. The contract with the training system (issue 11 item 3):

    - ``samples_from_module``: True when the engine samples from the trained module itself (HF ``generate``):
      the weights it samples with are always the current ones. Only then may the trainer take old log-probs
      equal to the current ones in a single-step round. Otherwise (vLLM holds its own copy of the weights) the
      trainer re-scores old log-probs before the first update, and ``Rollout.old_logp`` holds the *engine's*
      log-probs, used for the optional importance-sampling correction. The safe default is False.
    - ``setup`` is called once per process when ranks and devices exist (the system's ``on_fit_start`` etc.),
      never at config parsing time.
    - ``sync_weights`` is called after every optimizer step (the engine pushes the new weights to its copy).
    - ``sleep`` / ``wake`` bracket the update, so an engine can free its memory while the trainer works.
    """

    samples_from_module: bool = False

    def setup(self, bundle: PolicyBundle, *, rank: int, world_size: int, seed: int, sharded: bool) -> None:
        """Create what needs ranks and devices (default: nothing)."""
        return None  # default: engines that need none of it

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Take the trained weights after an optimizer step (default: nothing)."""
        return None  # default: engines that need none of it

    def sleep(self) -> None:
        """Free memory during the update (default: nothing)."""
        return None  # default: engines that need none of it

    def wake(self) -> None:
        """Restore after the update (default: nothing)."""
        return None  # default: engines that need none of it

    @abstractmethod
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
    ) -> Rollout: ...


def mask_after_stop(
    completion_ids: torch.Tensor, stop_token_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion mask that keeps tokens through the first stop token and drops everything after.

    Args:
        completion_ids: [N, T] long.
        stop_token_ids: ids that end a response (e.g. ``<|im_end|>``, ``<|endoftext|>``).
    Returns:
        mask [N, T] long (1 = real token, the stop token included so the policy learns to stop),
        finished [N] bool (a stop token occurred).
    """
    stops = torch.tensor(list(stop_token_ids), device=completion_ids.device, dtype=completion_ids.dtype)
    is_stop = torch.isin(completion_ids, stops)  # [N, T]
    # number of stop tokens strictly before each position: 0 means "not yet ended"
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    mask = (stops_before == 0).long()
    return mask, is_stop.any(dim=1)
