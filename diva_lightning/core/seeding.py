"""Stable seeds derived from arbitrary parts (Python's `hash()` is salted per process, so it cannot be used)."""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 63-bit seed that depends only on `repr(parts)`: the same in every process, run and machine."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
