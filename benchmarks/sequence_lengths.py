#!/usr/bin/env python3
"""Sequence stage over series of many lengths: bucketed vs every length as is.

Run from the repository root (any Keras backend)::

    .venv/bin/python benchmarks/sequence_lengths.py [--min 20] [--max 60] [--repeat 1]
    KERAS_BACKEND=jax python benchmarks/sequence_lengths.py

Real series come in many lengths. JAX compiles the sequence stage (a
bidirectional GRU in the bundled model) once per input shape, so under JAX
the node pads each series' embeddings to a multiple of ``SEQUENCE_BUCKET``
slices, masked out (``HemorrhageModel.score_sequence``). This times
``score_sequence`` over one series of every length from ``--min`` to ``--max``
(random embeddings, fresh model each way, two untimed calls first, of lengths
whose shapes the timed calls do not use):

- baseline ``every length as is``: no padding, each new length compiled;
- ``bucketed``: what the node does under JAX.

Prints the seconds of each, the ratio baseline / bucketed (above 1: the
buckets are faster), and the largest difference between the two ways' scores
(exit 1 above 1e-4: the padding must be masked out). Under TensorFlow the node does not pad (its traced
function accepts any length); the numbers show what padding would cost there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402


def timed(padded: bool, lengths: range, seed: int) -> tuple[float, list[np.ndarray]]:
    """Seconds to score one series of each length on a freshly loaded bundled
    model, and the scores (the same embeddings for the same seed)."""
    from ichnode.model import SEQUENCE_BUCKET, load_model

    model = load_model(None)
    model._pad_sequences = padded
    rng = np.random.default_rng(seed)
    # Warm-up on two lengths whose shapes, padded or not, none of the timed
    # series use: each way pays its first traces, and neither gets a shape
    # of the run compiled for free.
    beyond = (lengths[-1] // SEQUENCE_BUCKET + 2) * SEQUENCE_BUCKET + 1
    for length in (beyond, beyond + 1):
        model.score_sequence(rng.random((length, model.embedding_dim), dtype=np.float32))
    embeddings = [rng.random((length, model.embedding_dim), dtype=np.float32) for length in lengths]
    started = time.perf_counter()
    scores = [model.score_sequence(series) for series in embeddings]
    return time.perf_counter() - started, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min", type=int, default=20, help="shortest series (default 20)")
    parser.add_argument("--max", type=int, default=60, help="longest series (default 60)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, each on fresh models (best shown)")
    args = parser.parse_args(argv)
    if not 1 <= args.min <= args.max <= 2000 or not 1 <= args.repeat <= 5:
        parser.error("need 1 <= --min <= --max <= 2000 and 1 <= --repeat <= 5")
    import keras

    from ichnode.model import SEQUENCE_BUCKET

    lengths = range(args.min, args.max + 1)
    exact, bucketed, difference = [], [], 0.0
    for seed in range(args.repeat):
        (seconds, expected), (padded_seconds, got) = timed(False, lengths, seed), timed(True, lengths, seed)
        exact.append(seconds)
        bucketed.append(padded_seconds)
        difference = max([difference] + [float(np.abs(a - b).max()) for a, b in zip(expected, got)])
    print(
        f"sequence stage, keras {keras.__version__}, {keras.backend.backend()} backend, "
        f"{len(lengths)} series of {args.min}..{args.max} slices, buckets of {SEQUENCE_BUCKET}"
    )
    print(f"{'every length as is (baseline)':32s} {min(exact):7.2f} s")
    print(f"{'bucketed (the node under JAX)':32s} {min(bucketed):7.2f} s")
    print(f"{'ratio baseline / bucketed':32s} {min(exact) / min(bucketed):7.2f}x")
    print(f"{'largest score difference':32s} {difference:9.1e}   (must be < 1e-4: the padding is masked out)")
    return 0 if difference < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
