"""How the worker packs slices of several series into model batches, and the files they come from."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from ichnode.imaging import stack_context
from ichnode.model import ModelCard
from ichnode.preparation import new_volume_file
from ichnode.worker import RUNS_PER_BATCH, batch_buffers, gather_batch, plan_batches
from tests.test_model import card_dict


def test_batches_cover_every_slice_once_in_order() -> None:
    plan = plan_batches([5, 12, 3], size=8)
    assert plan == [[(0, 0, 5), (1, 0, 3)], [(1, 3, 8)], [(1, 11, 1), (2, 0, 3)]]
    assert plan_batches([], size=8) == []
    # many short series: a batch holds at most RUNS_PER_BATCH runs
    plan = plan_batches([1] * (RUNS_PER_BATCH + 1), size=64)
    assert [len(batch) for batch in plan] == [RUNS_PER_BATCH, 1]


@pytest.mark.parametrize("context", [1, 2])
def test_gathered_batches_are_the_stacked_slices(context: int) -> None:
    card = ModelCard.model_validate(
        card_dict(input_size=[8, 9], context_slices=context, channels=3 * (2 * context + 1))
    )
    rng = np.random.default_rng(0)
    volumes = [rng.random((n, 8, 9, 3), dtype=np.float32) for n in (5, 12, 1, 3)]
    expected = np.concatenate([stack_context(volume, context) for volume in volumes])
    size = 8
    got = []
    for runs in plan_batches([len(volume) for volume in volumes], size):
        buffers = batch_buffers(card, size)
        rows, neighbours = gather_batch(volumes, runs, context, *buffers)
        # always the whole rows buffer (one shape to compile), the batch's samples only
        assert rows is buffers[0] and len(neighbours) == sum(take for _, _, take in runs)
        # what the model does in its graph: neighbour-major, window-minor channels
        got.append(rows[neighbours].transpose(0, 2, 3, 1, 4).reshape(len(neighbours), 8, 9, -1))
    np.testing.assert_array_equal(np.concatenate(got), expected)


def test_the_rows_buffer_holds_the_fullest_batch() -> None:
    card = ModelCard.model_validate(card_dict(input_size=[8, 8]))
    # RUNS_PER_BATCH one-slice series then full batches: every run brings its neighbours
    lengths = [1] * RUNS_PER_BATCH + [40]
    volumes = [np.ones((n, 8, 8, 3), np.float32) for n in lengths]
    for runs in plan_batches(lengths, size=16):
        gather_batch(volumes, runs, 1, *batch_buffers(card, 16))  # no overflow


def test_a_volume_file_the_disk_cannot_hold_is_an_error_and_leaves_nothing(tmp_path) -> None:
    # A file size limit stands in for a full disk (no privileges needed).
    script = f"""
import resource, signal
from ichnode.preparation import new_volume_file
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    new_volume_file({str(tmp_path / "v.npy")!r}, 300, ((40, 80), (80, 200), (600, 2800)), (256, 256))
except OSError as exc:
    print("refused:", exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.startswith("refused:"), done.stdout + done.stderr
    assert list(tmp_path.iterdir()) == []
    # Within the limit: a volume of the asked shape, zeroed.
    new_volume_file(tmp_path / "v.npy", 2, ((40, 80),), (8, 8))
    volume = np.load(tmp_path / "v.npy", mmap_mode="r")
    assert volume.shape == (2, 8, 8, 1) and not volume.any()


def test_a_file_system_that_cannot_reserve_blocks_still_gets_its_volume(tmp_path, monkeypatch) -> None:
    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    new_volume_file(tmp_path / "v.npy", 3, ((40, 80),), (8, 8))
    assert np.load(tmp_path / "v.npy", mmap_mode="r").shape == (3, 8, 8, 1)
