r"""Reading numbered tags (``<variant1>...</variant1>``, ``<step2>...</step2>``) out of a teacher's reply.

Tolerant where a model's spelling varies harmlessly: tag names are case-insensitive and may have spaces
inside the brackets (``< step1 >``, ``</ Step1>``), the content is stripped. Strict where the structure
is wrong, and every such problem is reported rather than guessed around:

- **well-formed**: ``<tagN>`` then ``</tagN>`` with the same N and no other opening tag of the same name
  in between; the first well-formed item of a number wins, a later one with the same number is a
  ``duplicate``;
- **malformed**: an opening tag that is never closed by its own number (unclosed, closed by another
  number, or interrupted by another opening tag), and a closing tag with no opener;
- **empty**: a well-formed tag with only whitespace inside.

The caller decides what is expected (``expected=K`` numbers 1..K for paraphrases, a contiguous 1..n for
steps) with :meth:`Tagged.slots`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


def _tag_re(name: str, closing: bool) -> re.Pattern[str]:
    slash = r"/\s*" if closing else ""
    return re.compile(rf"<\s*{slash}{re.escape(name)}\s*(\d+)\s*>", re.IGNORECASE)


@dataclass
class Tagged:
    """The numbered items of one reply.

    Attributes:
        items: number -> stripped content, for well-formed, non-empty, first-seen tags.
        empty: numbers of well-formed tags with blank content.
        duplicate: numbers seen again after a first well-formed item.
        malformed: numbers of opening tags that never closed properly; ``None`` for a stray closing tag.
    """

    items: dict[int, str] = field(default_factory=dict)
    empty: list[int] = field(default_factory=list)
    duplicate: list[int] = field(default_factory=list)
    malformed: list[int | None] = field(default_factory=list)

    def slot(self, n: int) -> tuple[str | None, str | None]:
        """(content, None) for a usable item ``n``, else (None, why): ``empty``, ``malformed`` or ``missing``."""
        if n in self.items:
            return self.items[n], None
        if n in self.empty:
            return None, "empty"
        if n in self.malformed:
            return None, "malformed"
        return None, "missing"

    def extra(self, expected: int) -> list[int]:
        """Numbers beyond ``expected`` that were given anyway (well-formed, empty or malformed)."""
        seen = set(self.items) | set(self.empty) | {n for n in self.malformed if n is not None}
        return sorted(n for n in seen if n > expected)

    def contiguous(self) -> list[str] | None:
        """The items 1..n in order when they form one clean run (no gaps, nothing malformed, empty or
        duplicated), else None."""
        if self.malformed or self.empty or self.duplicate or not self.items:
            return None
        numbers = sorted(self.items)
        if numbers != list(range(1, len(numbers) + 1)):
            return None
        return [self.items[n] for n in numbers]


def parse_tagged(text: str, name: str) -> Tagged:
    """All ``<nameN>...</nameN>`` items of ``text`` (see the module docstring for the rules)."""
    opens = [(m.start(), m.end(), int(m.group(1))) for m in _tag_re(name, closing=False).finditer(text)]
    closes = [(m.start(), m.end(), int(m.group(1))) for m in _tag_re(name, closing=True).finditer(text)]
    out = Tagged()
    used_closes: set[int] = set()
    for i, (_, body_start, n) in enumerate(opens):
        next_open = opens[i + 1][0] if i + 1 < len(opens) else len(text)
        # the first closing tag after this opener, before the next opener
        close = next(((j, c) for j, c in enumerate(closes) if body_start <= c[0] < next_open
                      and j not in used_closes), None)
        if close is None or close[1][2] != n:
            out.malformed.append(n)
            if close is not None:
                used_closes.add(close[0])  # it closed the wrong number: both ends are bad
            continue
        used_closes.add(close[0])
        content = text[body_start:close[1][0]].strip()
        if n in out.items or n in out.empty:
            out.duplicate.append(n)
        elif content:
            out.items[n] = content
        else:
            out.empty.append(n)
    out.malformed.extend(None for j in range(len(closes)) if j not in used_closes)
    return out
