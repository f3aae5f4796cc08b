"""``ichnode demo``: the whole product in one command, run as a user runs it."""

from __future__ import annotations

import importlib.util
import os

import pydicom
import pytest

from ichnode.config import LABELS
from ichnode.demo import DEMO_PHANTOMS
from tests.conftest import DATA, run_cli


def _phantom_series_uid(seed: int, hemorrhage: list[str]) -> str:
    from training.phantoms import make_series

    # UIDs derive from the seed only: a tiny rendering gives the demo's series UID.
    tiny = make_series(seed, matrix=64, n_slices=10, hemorrhage=hemorrhage, return_volume=False)
    return str(tiny.datasets[0].SeriesInstanceUID)


def _row(lines: list[str], series_uid: str) -> str:
    """The table line of a series (the table shows at most the last 25 characters of a UID)."""
    tail = series_uid[-25:]
    found = [line for line in lines if tail in line]
    assert len(found) == 1, (series_uid, lines)
    return found[0]


@pytest.mark.slow
def test_demo_scores_and_reports_every_study() -> None:
    out = run_cli(["demo"], timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("SERIES_UID")]
    assert len(header) == 1, out.stdout
    assert lines[header[0]].split() == [
        "SERIES_UID",
        "SERIES_DESCRIPTION",
        "STATUS",
        "ANY",
        "POSITIVE",
        "DELIVERY",
        "SKIP_REASON",
    ]
    table = lines[header[0] + 1 :]

    expected = [_phantom_series_uid(seed, hemorrhage) for seed, hemorrhage in DEMO_PHANTOMS]
    ge = DATA / "ge-head-ct"
    if ge.is_dir():
        first = sorted(ge.glob("*.dcm"))[0]
        expected.append(str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID))
    for series_uid in expected:
        row = _row(table, series_uid).split()
        assert "scored" in row, row
        assert "sent 2" in " ".join(row), row
    # The phantom with hemorrhages is flagged, the one without is not.
    for series_uid, (_, hemorrhage) in zip(expected, DEMO_PHANTOMS):
        flagged = {label for cell in _row(table, series_uid).split() for label in cell.split(",") if label in LABELS}
        assert "any" in flagged if hemorrhage else flagged == set(), flagged
    assert f"the demo PACS received {2 * len(expected)} report objects" in out.stdout


def test_a_demo_whose_node_cannot_start_says_why_in_one_line_and_leaves_nothing(tmp_path) -> None:
    # A Keras backend this environment lacks: the node cannot load its model.
    if importlib.util.find_spec("jax") is not None:
        pytest.skip("jax is installed here")
    env = {**os.environ, "KERAS_BACKEND": "jax", "TMPDIR": str(tmp_path)}
    out = run_cli(["demo"], env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.splitlines() == [out.stderr.splitlines()[0]] and "Keras backend 'jax'" in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []
