"""`FunctionReward`: a user's reward function, by import path, as the training system's reward component.

    reward:
      class_path: diva_lightning.rewards.FunctionReward
      init_args:
        fn: my_package.my_module:my_reward
        batched: true              # fn(responses, answers, **kwargs) -> N values; false: fn(response, answer) -> float
        accuracy_threshold: null   # null: the reward is the accuracy (must be in [0, 1]); t: accuracy = reward >= t

What comes back is checked every call, with messages that name the function: N values (a list, tuple, tensor or
numpy array; or a dict / `RewardBreakdown` with a separate accuracy and format), numbers, all finite, and
accuracies in [0, 1] (the difficulty update reads them as the fraction of correct answers).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from diva_lightning.rewards.registry import Reward, RewardBreakdown, as_breakdown, load_reward_fn


def _name(fn: str | Callable[..., Any]) -> str:
    if isinstance(fn, str):
        return fn
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


class FunctionReward(Reward):
    """A reward computed by a user's function.

    Args:
        fn: import path ``"package.module:function"`` (or ``package.module.function``; a class is instantiated
            with no arguments), or the callable itself.
        batched: True: ``fn(responses, answers, **kwargs)`` is called once per step and returns N values or a
            breakdown; only the keyword arguments its signature accepts are passed (all with ``**kwargs``).
            False: ``fn(response, answer) -> float`` is called per response.
        accuracy_threshold: None: the reward doubles as the accuracy unless ``fn`` returns one (a dict with
            ``"accuracy"`` or a :class:`RewardBreakdown`), and must then lie in [0, 1]. A number ``t``: the
            accuracy is ``reward >= t`` (for rewards on another scale, e.g. -1 / +1).
        num_workers: per-sample only: grade in a thread pool of this size (0 = in the calling thread).
    """

    def __init__(self, fn: str | Callable[..., Any], batched: bool = True, accuracy_threshold: float | None = None,
                 num_workers: int = 0) -> None:
        if num_workers < 0:
            raise ValueError(f"FunctionReward: num_workers must be >= 0, got {num_workers}")
        if batched and num_workers:
            raise ValueError("FunctionReward: num_workers applies to per-sample functions (batched=false) only")
        self.name = _name(fn)
        self.fn = load_reward_fn(fn, check_batched=False)
        self.batched, self.accuracy_threshold, self.num_workers = batched, accuracy_threshold, num_workers
        self._check_signature()
        params = self._parameters()
        self._takes_all_kwargs = params is None or any(p.kind is p.VAR_KEYWORD for p in params.values())
        self._kwarg_names = set(params or ())

    def _parameters(self) -> dict[str, inspect.Parameter] | None:
        try:
            return dict(inspect.signature(self.fn).parameters)
        except (TypeError, ValueError):  # builtins without a signature
            return None

    def _check_signature(self) -> None:
        try:
            sig = inspect.signature(self.fn)
        except (TypeError, ValueError):
            return
        probe = ([], []) if self.batched else ("", "")
        try:
            sig.bind(*probe)
        except TypeError as err:
            shape = "(responses, answers, **kwargs)" if self.batched else "(response, answer)"
            raise TypeError(f"FunctionReward: {self.name} must accept {shape} with batched={self.batched}: "
                            f"{err}") from None

    def _call_batched(self, responses: list[str], answers: list[str], kwargs: dict[str, Any]) -> Any:
        passed = kwargs if self._takes_all_kwargs else {k: v for k, v in kwargs.items() if k in self._kwarg_names}
        return self.fn(list(responses), list(answers), **passed)

    def _call_one(self, pair: tuple[str, str]) -> Any:
        value = self.fn(*pair)
        if isinstance(value, bool) or not isinstance(value, int | float | torch.Tensor):
            try:
                return float(value)
            except (TypeError, ValueError):
                hint = "; a batched function needs batched=true" if isinstance(value, list | tuple) else ""
                raise ValueError(f"reward function {self.name} returned {type(value).__name__} {value!r:.60} for "
                                 f"one response, expected a number{hint}") from None
        return float(value)

    def __call__(self, responses: list[str], answers: list[str], **kwargs: Any) -> RewardBreakdown:
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        if self.batched:
            result = self._call_batched(responses, answers, kwargs)
            if isinstance(result, int | float) or (isinstance(result, torch.Tensor) and result.dim() == 0):
                raise ValueError(f"reward function {self.name} returned one number for {len(responses)} responses; "
                                 "a per-sample function (response, answer) -> float needs batched=false")
        elif self.num_workers > 0 and len(responses) > 1:
            with ThreadPoolExecutor(max_workers=self.num_workers) as pool:
                result = list(pool.map(self._call_one, zip(responses, answers)))
        else:
            result = [self._call_one(pair) for pair in zip(responses, answers)]
        name = f"reward function {self.name}"
        out = as_breakdown(result, len(responses), name=name)
        explicit = isinstance(result, RewardBreakdown) or (isinstance(result, dict) and "accuracy" in result)
        if self.accuracy_threshold is not None and not explicit:
            out = RewardBreakdown(out.reward, (out.reward >= self.accuracy_threshold).float(), out.format)
        outside = ((out.accuracy < 0) | (out.accuracy > 1)).nonzero().flatten().tolist()
        if outside:
            hint = ("" if explicit else "; the reward doubles as the accuracy: set accuracy_threshold, or return "
                    "{'reward': ..., 'accuracy': ...}")
            raise ValueError(f"{name} gave accuracies outside [0, 1] at positions {outside[:10]} "
                             f"({[out.accuracy[i].item() for i in outside[:10]]}){hint}")
        return out

    def __repr__(self) -> str:
        return (f"FunctionReward(fn={self.name!r}, batched={self.batched}, "
                f"accuracy_threshold={self.accuracy_threshold}, num_workers={self.num_workers})")
