"""One-line messages for errors before training starts (`python -m diva_lightning`): a parse error names where the
value came from (a --config file and key, or the option) and why; any other start-up error names its cause."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import yaml

from diva_lightning.training.config import former_word

# Options people reach for that are spelled differently here: the real ones to name in the error.
OPTION_HINTS = {
    "batch_size": ["questions_per_step (questions per training round)", "val_batch_size (questions per "
                   "validation batch)"],
    "num_samples": ["num_generations (G, responses per prompt in training)"],
    "learning_rate": ["lr"],
    "epochs": ["ppo_epochs (passes over a round's responses)", "trainer.max_steps (rounds)"],
}
_KEY = re.compile(r"""(?:Parser key|Key) ["']([^"']+)["']|Option ["']([^"']+)["'] is not accepted""")
_CLASS = re.compile(r"Problem with given class_path '([\w.]+)'")
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*?)\](?:\. Got value: (.*))?$")


def _chain(err: BaseException) -> list[BaseException]:
    """The exception and its causes, outermost first."""
    out: list[BaseException] = []
    while err is not None and all(err is not e for e in out):
        out.append(err)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return out


def _raised_here(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in this package (one of our checks raised it)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "diva_lightning" in Path(tb.tb_frame.f_code.co_filename).parts


def startup_error_summary(err: BaseException) -> str:
    """One line (plus the problem list of a record file) naming what is wrong, for errors before training: the
    outermost exception a check of ours raised (under jsonargparse's wrappers, over the library error it
    explains), else the innermost."""
    chain = _chain(err)
    root = next((e for e in chain if _raised_here(e)), chain[-1])
    lines = (str(root).strip() or type(root).__name__).splitlines()
    if len(lines) > 41:
        lines = [*lines[:40], f"... and {len(lines) - 40} more lines"]
    return f"diva-lightning: {type(root).__name__}: " + "\n".join(lines)


def _sources(argv: list[str], key: str) -> list[str]:
    """In command-line order, the --config files and command-line options that may set ``key`` (dotted): the
    last one is where the parsed value came from."""
    out = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--config="):
            out.append(arg.split("=", 1)[1])
        elif arg.startswith("--") and key and (key == arg[2:].split("=", 1)[0] or key.startswith(arg[2:] + ".")):
            out.append(arg)
    return out


def _holds(path: str, key: list[str]) -> bool:
    """Whether the YAML file at ``path`` sets ``key`` (a dotted path, parts in order)."""
    try:
        node: Any = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    for part in key:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _takes_init_args(path: str) -> bool:
    """Whether a config gives the class at ``path`` as class_path + init_args: a plain settings dataclass
    (`PolicyConfig` ...) is given by its fields alone."""
    cls = _class(path)
    plain = dataclasses.is_dataclass(cls) and all(dataclasses.is_dataclass(b) or b is object for b in cls.__mro__)
    return not plain


def _suggest(name: str, message: str) -> str:
    """' (did you mean ...?)' for an unknown option: the known spelling, else close names of the class's args."""
    hints = list(OPTION_HINTS.get(name, []))
    found = _CLASS.findall(message)
    if found and not hints:
        try:
            params = list(inspect.signature(_class(found[-1])).parameters)
        except (ValueError, TypeError):
            params = []
        hints = difflib.get_close_matches(name, params, n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(hints)}?)" if hints else ""


def _choice_reason(lines: list[str], key: str) -> str | None:
    """'must be one of a, b[ or null], got 'x'' for a word outside a ``Literal`` choice (or the former word's
    message), from jsonargparse's 'Expected a typing.Literal[...]' lines; None for any other error."""
    for i, line in enumerate(lines):
        found = _LITERAL.search(line)
        if not found:
            continue
        words = ast.literal_eval(f"({found.group(1)},)")
        value = found.group(2)
        union = next((ln for ln in reversed(lines[:i]) if ln.startswith("Subtypes:")), "")
        optional = "typing.Literal" in union and "NoneType" in union
        if value is None:
            value = next((ln.split(":", 1)[1].strip() for ln in lines[i:] if ln.startswith("Given value:")), "?")
        renamed = former_word(key, value)
        if renamed:
            return renamed.split(": ", 1)[1]
        return f"must be one of {', '.join(map(str, words))}{' or null' if optional else ''}, got {value!r}"
    return None


def parse_error_line(message: str, argv: list[str]) -> str:
    """jsonargparse's nested parse error as one line naming where the value came from (a --config file or the
    command line), the full key and the reason."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    parts: list[str] = []
    reasons: list[str] = []
    noise = ("Does not validate", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value")
    for line in lines:
        found = _CLASS.search(line)
        if found:
            if _takes_init_args(found.group(1)):
                parts.append("init_args")  # the keys below it are the class's init_args
            continue
        for key, option in _KEY.findall(line):
            parts.extend((key or option).split("."))
        rest = _KEY.sub("", line).lstrip(":- ").strip()
        if rest and not line.startswith(noise) and not rest.startswith(noise):
            reasons.append(rest)
    key = ".".join(parts)
    reason = _choice_reason(lines, key) or (reasons[0] if reasons else lines[-1] if lines else message)
    unknown = re.search(r"Option ['\"]([^'\"]+)['\"] is not accepted", message)
    if unknown:
        reason = f"{unknown.group(1)!r} is not an option{_suggest(unknown.group(1), message)}"
    found_in = [src for src in _sources(argv, key) if src.startswith("--") or _holds(src, parts)]
    if found_in and not found_in[-1].startswith("--"):
        where = f"config file {found_in[-1]}: key {key}"
    else:
        where = f"--{key}" if key else "the command line"
    return f"diva-lightning: {where}: {reason}"
