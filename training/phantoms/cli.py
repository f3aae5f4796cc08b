"""Command line of the phantom generator (run as ``python -m training.phantoms``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from training.phantoms.dataset import write_dataset


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.phantoms",
        description="Write synthetic head-CT series with per-slice hemorrhage labels (not for clinical use).",
    )
    ap.add_argument("--out", required=True, type=Path, help="output folder")
    ap.add_argument("--series", required=True, type=int, help="number of series")
    ap.add_argument("--seed", required=True, type=int, help="random seed (same seed, same bytes)")
    ap.add_argument("--layout", choices=["series", "rsna"], default="series")
    ap.add_argument("--matrix", type=int, choices=[256, 512], default=512)
    ap.add_argument("--positive-fraction", type=float, default=0.5)
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)
    if args.series < 1:
        ap.error(f"--series must be at least 1, got {args.series}")
    if not 0.0 <= args.positive_fraction <= 1.0:
        ap.error(f"--positive-fraction must be within [0, 1], got {args.positive_fraction}")
    out = write_dataset(args.out, args.series, args.seed, layout=args.layout, matrix=args.matrix,
                        positive_fraction=args.positive_fraction, progress=not args.no_progress)
    print(out)
    return 0
