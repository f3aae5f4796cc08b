"""Benchmark ichnode.imaging.preprocess_slice on the real GE head CT series.

Run from the repository root::

    python benchmarks/preprocess.py [--data DIR] [--seconds S]

Measures, on one thread and on datasets already parsed in memory:

- baseline ``read+decode``: ``pydicom.dcmread`` of the file bytes plus
  ``pixel_array`` (what any reader pays before preprocessing);
- ``preprocess_slice``: HU, 3 windows, 512 -> 256 resize;
- ``read+preprocess``: ``dcmread`` of the bytes plus ``preprocess_slice``
  (what the worker pays per slice).

and prints slices/s and the ratio of each to the baseline.  Each measurement
runs for about ``--seconds`` (default 2), so the whole run stays well under
30 s.  Exits non-zero if the data is missing.

Numbers depend on glibc's malloc: every slice allocates and frees ~1 MB
arrays, which by default are returned to the OS and page-faulted back in.
The worker's helper processes keep freed memory instead
(:func:`ichnode.imaging.keep_freed_memory`), which roughly doubles every
rate here; the benchmark does the same unless ``--system-malloc`` is given.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# One thread: the node runs one worker per core; keep BLAS out of the picture.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pydicom  # noqa: E402

from ichnode.imaging import DEFAULT_WINDOWS, keep_freed_memory, preprocess_slice  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ge-head-ct"
SIZE = (256, 256)


def rate(work: Callable[[bytes, pydicom.Dataset], object], items: list, seconds: float) -> float:
    """Slices per second of ``work`` over ``items``, best of short rounds."""
    for blob, ds in items[:3]:  # warm-up (imports, plugin lookup)
        work(blob, ds)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for blob, ds in items:
            work(blob, ds)
        best = max(best, len(items) / (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of *.dcm")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument(
        "--system-malloc", action="store_true", help="leave glibc's defaults (freed memory returned to the system)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 8:
        parser.error(f"--seconds must be in (0, 8], got {args.seconds}")
    kept = not args.system_malloc and keep_freed_memory()

    files = sorted(args.data.glob("*.dcm"))
    if not files:
        print(f"no *.dcm files in {args.data}", file=sys.stderr)
        return 1
    blobs = [f.read_bytes() for f in files]
    items = [(blob, pydicom.dcmread(io.BytesIO(blob))) for blob in blobs]
    first = items[0][1]

    def baseline(blob: bytes, ds: pydicom.Dataset) -> object:
        return pydicom.dcmread(io.BytesIO(blob)).pixel_array

    def preprocess(blob: bytes, ds: pydicom.Dataset) -> object:
        return preprocess_slice(ds, DEFAULT_WINDOWS, SIZE)

    def read_preprocess(blob: bytes, ds: pydicom.Dataset) -> object:
        return preprocess_slice(pydicom.dcmread(io.BytesIO(blob)), DEFAULT_WINDOWS, SIZE)

    print(
        f"{len(files)} slices {first.Rows}x{first.Columns} from {args.data} -> "
        f"{SIZE[0]}x{SIZE[1]}, {len(DEFAULT_WINDOWS)} windows, best of ~{args.seconds:g} s each; "
        + ("freed memory kept, as in the worker's helpers" if kept else "system malloc defaults")
    )
    base = rate(baseline, items, args.seconds)
    print(f"{'baseline read+decode (dcmread + pixel_array)':48s} {base:8.0f} slices/s   1.00x")
    for name, work in (
        ("preprocess_slice (parsed dataset)", preprocess),
        ("read+preprocess (dcmread + preprocess_slice)", read_preprocess),
    ):
        value = rate(work, items, args.seconds)
        print(f"{name:48s} {value:8.0f} slices/s   {value / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
