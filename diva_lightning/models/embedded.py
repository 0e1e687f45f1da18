"""The shipped embedded base policy: one set of weights for every machine.

The warm-up (`python -m diva_lightning warmup`) is deterministic on one machine, but float kernels differ between
CPUs, so machines used to build different base policies from the same code and their numbers were not comparable.
The repository therefore ships one build in ``diva_lightning/assets/base_policy`` (a few MB) with:

- ``SHA256SUMS``: the sha256 of every file of the checkpoint (``sha256sum -c`` reads it);
- ``recipe.yaml``: the resolved warm-up config that built it; ``build_info.json``: versions and CPU facts.

``policy: embedded`` in a config names this folder; every load checks it against ``SHA256SUMS`` first, so a
damaged or partly replaced copy is an error naming the file, never a silently different policy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

EMBEDDED = "embedded"
"""The config value (``model.init_args.policy``) naming the shipped base policy."""

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "base_policy"
CHECKSUMS = "SHA256SUMS"
# What a checksum covers: the checkpoint itself (weights, config, tokenizer, processor), not the notes beside it.
_NOT_CHECKED = {CHECKSUMS, "recipe.yaml", "build_info.json", "success.json"}


def file_sha256(path: str | Path) -> str:
    """sha256 of one file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The files a checksum list covers, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name not in _NOT_CHECKED)


def write_checksums(folder: str | Path) -> dict[str, str]:
    """Write ``<folder>/SHA256SUMS`` (``sha256sum`` format) for the checkpoint's files; returns name -> sha256."""
    out = Path(folder)
    sums = {p.name: file_sha256(p) for p in checkpoint_files(out)}
    (out / CHECKSUMS).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return sums


def read_checksums(folder: str | Path) -> dict[str, str]:
    path = Path(folder) / CHECKSUMS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the shipped base policy records its files' sha256 there")
    sums: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise ValueError(f"{path}, line {n}: expected '<sha256>  <file name>', got {line!r}")
        sums[name.strip()] = digest
    return sums


def verify_checksums(folder: str | Path) -> dict[str, str]:
    """Check every file listed in ``SHA256SUMS`` (and that no checkpoint file is unlisted); all problems raise
    together in one ``ValueError`` naming the files. Returns the recorded sums."""
    folder = Path(folder)
    sums = read_checksums(folder)
    problems = []
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif (actual := file_sha256(path)) != digest:
            problems.append(f"{name}: sha256 {actual[:12]}... but {CHECKSUMS} records {digest[:12]}...")
    problems += [f"{p.name}: not listed in {CHECKSUMS}" for p in checkpoint_files(folder) if p.name not in sums]
    if problems:
        raise ValueError(f"base policy at {folder} does not match its {CHECKSUMS}: " + "; ".join(problems)
                         + " (rebuild it: python -m diva_lightning warmup --config experiments/warmup.yaml "
                           "--ship true)")
    return sums


def resolve_embedded(policy: str | Path) -> str | Path:
    """``"embedded"`` -> the shipped folder, checked against its ``SHA256SUMS``; anything else unchanged."""
    if str(policy) != EMBEDDED:
        return policy
    if not (SHIPPED_DIR / "config.json").is_file():
        raise FileNotFoundError(f"policy 'embedded': no shipped base policy at {SHIPPED_DIR} (rebuild it: python -m "
                                "diva_lightning warmup --config experiments/warmup.yaml --ship true)")
    verify_checksums(SHIPPED_DIR)
    return str(SHIPPED_DIR)
