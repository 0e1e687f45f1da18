"""The responses file the ``score`` command reads and evaluation writes.

JSON lines ``{"id": "<row id>", "response": "<text>"}``; several lines with one id are several samples of that
question (scored and averaged: mean@k). Other keys on a line (a sample index, a score) are allowed and ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from diva_lightning.data.schema import jsonl_rows


def write_responses(path: str | Path, responses: Mapping[str, Sequence[str]] | Iterable[tuple[str, str]]
                    ) -> Path:
    """Write ``{id: [response, ...]}`` or ``(id, response)`` pairs, one line per response; returns ``path``."""
    pairs = ((i, r) for i, rs in responses.items() for r in rs) if isinstance(responses, Mapping) else responses
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rid, response in pairs:
            f.write(json.dumps({"id": str(rid), "response": response}, ensure_ascii=False) + "\n")
    return path


def read_responses(path: str | Path) -> dict[str, list[str]]:
    """``{id: [response, ...]}`` in file order; ValueError naming every bad line (``file:line N: ...``)."""
    path = Path(path)
    out: dict[str, list[str]] = {}
    problems: list[str] = []
    for n, obj, problem in jsonl_rows(path):  # the record loader's reader: BOM, bad bytes, huge lines
        if obj is None:
            problems.append(f"{path}:line {n}: {problem}")
            continue
        rid, response = obj.get("id"), obj.get("response")
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if not isinstance(rid, str) or not isinstance(response, str):
            problems.append(f'{path}:line {n}: expected {{"id": str, "response": str}}, got {json.dumps(obj)[:80]}')
            continue
        out.setdefault(rid, []).append(response)
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in responses file:\n" + "\n".join(problems))
    return out
