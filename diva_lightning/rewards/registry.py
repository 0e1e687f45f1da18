"""Rewards: the `Reward` base class, the default combined reward, and plugging in your own.

Contract of a reward (the documented way to plug a user's own reward)
---------------------------------------------------------------------
The training system takes any :class:`Reward`: an object called as

    reward(responses: list[str], answers: list[str], **kwargs) -> RewardBreakdown

with ``len(responses) == len(answers) == N`` (one entry per sampled response, the answer repeated for the G
responses of a prompt). The trainer may pass extra keyword arguments (``prompts``, ``question_ids``, ...).
The breakdown holds N finite rewards, the N accuracies in [0, 1] that the difficulty update needs (design.md
2.6) and an optional format term. Three implementations ship:

- :class:`CombinedReward` (default): ``acc_weight * accuracy + format_weight * format``; its per-sample parts
  ``accuracy_fn(response, answer) -> float`` and ``format_fn`` may be import paths to your functions.
- :class:`~diva_lightning.rewards.function.FunctionReward`: any function by import path, batched
  ``fn(responses, answers, **kwargs) -> list | Tensor | ndarray | RewardBreakdown | dict`` or per sample
  ``fn(response, answer) -> float``; its return is checked (length, numbers, finite) with messages naming it.
- :class:`~diva_lightning.rewards.released.ReleasedReward`: the authors' released reward (mathruler grading, their
  looser format regex; ``class_path: diva_lightning.rewards.released.ReleasedReward``), for the released recipe.

From YAML / the command line::

    reward:
      class_path: diva_lightning.rewards.FunctionReward
      init_args:
        fn: my_package.my_module:my_reward    # or my_package.my_module.my_reward
        batched: true

A plain function (:class:`RewardFunction` protocol) is resolved by :func:`load_reward_fn`: the object after the
colon may be a dotted attribute path; a class is instantiated with no arguments (for stateful rewards). It must
be safe to call from a worker thread (no ``signal`` use) if you set ``num_workers`` anywhere.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from diva_lightning.rewards.accuracy import accuracy_reward
from diva_lightning.rewards.format import format_reward

SampleReward = Callable[[str, str], float]


@runtime_checkable
class RewardFunction(Protocol):
    """Batched reward: N responses and their N gold answers -> N rewards (see module docstring)."""

    def __call__(self, responses: list[str], answers: list[str], **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class RewardBreakdown:
    """Per-response reward and its parts, float32 tensors [N] on the CPU.

    Attributes:
        reward: the reward the advantage uses.
        accuracy: the correctness term, for the difficulty update and ``rewards/accuracy``.
        format: the format term (zeros when the function has none), for ``rewards/format``.
    """

    reward: Tensor
    accuracy: Tensor
    format: Tensor

    def __len__(self) -> int:
        return int(self.reward.shape[0])


def as_breakdown(result: Any, n: int, *, name: str = "reward function") -> RewardBreakdown:
    """Normalise a reward function's return value to a checked breakdown of N values.

    Accepted: a :class:`RewardBreakdown`; a dict with ``"reward"`` and optional ``"accuracy"`` / ``"format"``;
    anything ``torch.as_tensor`` reads as N numbers (list, tuple, tensor, numpy array; a [N, 1] or [1, N] shape
    is flattened). Without an accuracy the reward is used as the accuracy. Raises ValueError naming ``name``.
    """
    if isinstance(result, RewardBreakdown):
        parts = {"reward": result.reward, "accuracy": result.accuracy, "format": result.format}
    elif isinstance(result, dict):
        unknown = sorted(set(result) - {"reward", "accuracy", "format"})
        if "reward" not in result or unknown:
            raise ValueError(f"{name} returned a dict with keys {sorted(result)}; expected 'reward' and optionally "
                             "'accuracy' and 'format'")
        parts = {k: result.get(k) for k in ("reward", "accuracy", "format")}
    else:
        parts = {"reward": result, "accuracy": None, "format": None}
    values: dict[str, Tensor] = {}
    for part, value in parts.items():
        if value is None:
            continue
        try:
            t = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} returned {part} as {type(value).__name__} that is not a sequence of numbers: "
                             f"{err}") from None
        if t.dim() > 2 or (t.dim() == 2 and 1 not in t.shape):
            raise ValueError(f"{name} returned {part} of shape {tuple(t.shape)}, expected ({n},)")
        values[part] = t.reshape(-1)
    values.setdefault("accuracy", values["reward"].clone())
    values.setdefault("format", torch.zeros_like(values["reward"]))
    for part, t in values.items():
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name} returned {part} of shape {tuple(t.shape)} ({t.numel()} values) for {n} "
                             f"responses, expected ({n},)")
        bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{name} returned non-finite {part} at positions {bad[:10]}: "
                             f"{[t[i].item() for i in bad[:10]]}")
    return RewardBreakdown(values["reward"], values["accuracy"], values["format"])


class Reward(ABC):
    """A reward component of the training system: N responses and their answers -> a :class:`RewardBreakdown`.

    Subclass it (and give ``__init__`` typed arguments) to make a reward selectable by ``class_path``.
    """

    @abstractmethod
    def __call__(self, responses: list[str], answers: list[str], **kwargs: Any) -> RewardBreakdown:
        """Grade N responses (see the module docstring for the contract)."""


def _resolve(obj: str | Callable[..., Any]) -> Callable[..., Any]:
    return load_reward_fn(obj, check_batched=False) if isinstance(obj, str) else obj


class CombinedReward(Reward):
    """``reward = acc_weight * accuracy + format_weight * format`` per response (official 0.9 / 0.1).

    Args:
        acc_weight: weight of the accuracy term.
        format_weight: weight of the format term.
        accuracy_fn: per-sample ``(response, answer) -> float`` or its import path; default math-verify.
        format_fn: per-sample ``(response, answer) -> float`` or import path; default ignores the answer.
        num_workers: grade in a thread pool of this size (0 = in the calling thread). Sympy holds the GIL,
            so this does not speed up math-verify itself; it helps rewards that wait on I/O (a judge).
    """

    def __init__(
        self,
        acc_weight: float = 0.9,
        format_weight: float = 0.1,
        accuracy_fn: str | SampleReward = accuracy_reward,
        format_fn: str | SampleReward | None = None,
        num_workers: int = 0,
    ) -> None:
        if acc_weight < 0 or format_weight < 0:
            raise ValueError(f"weights must be >= 0, got {acc_weight=}, {format_weight=}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.acc_weight, self.format_weight, self.num_workers = acc_weight, format_weight, num_workers
        self.accuracy_fn = _resolve(accuracy_fn)
        self.format_fn = _resolve(format_fn) if format_fn is not None else None

    def _format(self, response: str, answer: str) -> float:
        return self.format_fn(response, answer) if self.format_fn is not None else format_reward(response)

    def _grade(self, pair: tuple[str, str]) -> tuple[float, float]:
        response, answer = pair
        return float(self.accuracy_fn(response, answer)), float(self._format(response, answer))

    def compute(self, responses: Sequence[str], answers: Sequence[str]) -> RewardBreakdown:
        """Grade N responses; returns the total and both terms as float32 [N] tensors."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        pairs = list(zip(responses, answers))
        if self.num_workers > 0 and len(pairs) > 1:
            with ThreadPoolExecutor(max_workers=self.num_workers) as pool:
                graded = list(pool.map(self._grade, pairs))
        else:
            graded = [self._grade(p) for p in pairs]
        acc = torch.tensor([a for a, _ in graded], dtype=torch.float32).reshape(-1)
        fmt = torch.tensor([f for _, f in graded], dtype=torch.float32).reshape(-1)
        return RewardBreakdown(self.acc_weight * acc + self.format_weight * fmt, acc, fmt)

    def __call__(self, responses: list[str], answers: list[str], **kwargs: Any) -> RewardBreakdown:
        return self.compute(responses, answers)

    def __repr__(self) -> str:
        return (f"CombinedReward(acc_weight={self.acc_weight}, format_weight={self.format_weight}, "
                f"num_workers={self.num_workers})")


def load_reward_fn(path: str | Callable[..., Any], *, check_batched: bool = True) -> Callable[..., Any]:
    """Resolve ``"package.module:attr.path"`` to a callable (a class is instantiated without arguments).

    The dotted form ``"package.module.function"`` (how jsonargparse writes a function into a config) is
    accepted too: its last component is the attribute.

    Args:
        path: the import path, or an already callable object (returned as is, after the checks).
        check_batched: also check that it accepts ``(responses, answers)`` positionally.

    Raises:
        ValueError: malformed path. ImportError: the module is missing or fails to import.
        AttributeError: the module has no such attribute. TypeError: the object is not callable or has an
        incompatible signature.
    """
    if isinstance(path, str):
        module_name, sep, attr_path = path.partition(":")
        if not sep and "." in path:
            module_name, sep, attr_path = path.rpartition(".")
        if not sep or not module_name or not attr_path:
            raise ValueError("reward function path must look like 'package.module:function' or "
                             f"'package.module.function', got {path!r}")
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
                raise ImportError(f"cannot import module {module_name!r} for reward function {path!r}: "
                                  f"no module named {err.name!r}") from err
            raise ImportError(f"module {module_name!r} (reward function {path!r}) failed to import: "
                              f"{err}") from err
        for part in attr_path.split("."):
            if not hasattr(obj, part):
                public = sorted(n for n in dir(obj) if not n.startswith("_"))[:20]
                owner = getattr(obj, "__name__", repr(obj))
                raise AttributeError(f"{path!r}: {owner} has no attribute {part!r} "
                                     f"(available: {', '.join(public)})")
            obj = getattr(obj, part)
        if inspect.isclass(obj):
            obj = obj()
    else:
        obj = path
    if not callable(obj):
        raise TypeError(f"reward function {path!r} resolved to a non-callable {type(obj).__name__}")
    if check_batched:
        try:
            inspect.signature(obj).bind([], [])
        except TypeError as err:
            raise TypeError(f"reward function {path!r} must accept (responses, answers, **kwargs): "
                            f"{err}") from err
        except ValueError:
            pass  # builtins without a signature: trust them
    return obj
