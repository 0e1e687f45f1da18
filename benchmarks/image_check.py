"""Start-up cost of checking every image when a record file is loaded (issue 16 item 1).

    python benchmarks/image_check.py [--world N] [--photos N] [--workers N]

Two files, written to a temporary folder and loaded with `load_records_with_report` into an `ImageStore`
(the data module's path), each timed three ways, medians of 3 runs:

- `structure`: the row checks only (`record_from_row` on every row, no image is opened): the old loader's cost;
- `check`: + every image fully decoded and checked (the loader now), decoded pixels dropped;
- `check+store`: + the decoded pixels kept in the store (what `DivaDataModule` does; the store then never
  decodes again).

Files: the embedded world (N records, one 168..224 px PNG each) and N large JPEGs (4032 x 3024, a 12 MP phone
photo, smooth gradient + noise, quality 90). Prints a markdown table; numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from diva_lightning.data.images import ImageStore, default_workers
from diva_lightning.data.schema import QuestionRecord, load_records_with_report, record_from_row, write_records
from diva_lightning.data.world import generate_world


def _photo(seed: int, w: int = 4032, h: int = 3024) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _median(fn: Callable[[], object], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _structure_only(path: Path) -> None:
    for line in path.read_text(encoding="utf-8").splitlines():
        record_from_row(json.loads(line), path.parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2000, help="world records (one PNG each)")
    ap.add_argument("--photos", type=int, default=8, help="12 MP JPEG records")
    ap.add_argument("--workers", type=int, default=None, help="decode threads (default: up to 8, one per core)")
    args = ap.parse_args()
    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        files = {"world": write_records(generate_world(args.world, seed=0), Path(tmp) / "world.jsonl")}
        photos = [QuestionRecord(f"p{i}", "What is in <image>?", "1", [_photo(i)]) for i in range(args.photos)]
        files["photos"] = write_records(photos, Path(tmp) / "photos.jsonl")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{workers} decode threads\n")
        print("| file | records | encoded MB | structure s | check s | check+store s | per image ms | store MB |")
        print("|---|---|---|---|---|---|---|---|")
        for name, path in files.items():
            encoded = sum(f.stat().st_size for f in path.parent.glob(f"{path.stem}_images/*")) / 2**20
            t_struct = _median(lambda p=path: _structure_only(p))
            t_check = _median(lambda p=path: load_records_with_report(p, decode_workers=workers))
            store = ImageStore()
            t_store = _median(lambda p=path, s=store: load_records_with_report(p, images=s, decode_workers=workers))
            _, report = load_records_with_report(path, images=store, decode_workers=workers)
            print(f"| {name} | {report.loaded} | {encoded:.1f} | {t_struct:.3f} | {t_check:.3f} | {t_store:.3f} | "
                  f"{1000 * t_store / report.images:.2f} | {store.nbytes / 2**20:.0f} |")


if __name__ == "__main__":
    main()
