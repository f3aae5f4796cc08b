"""Acquisition geometry: head pose, field of view, gantry tilt, slice planes and
positions, and the crop box that contains the head."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from training.phantoms.anatomy import _Anatomy, _floor

# ---------------------------------------------------------------------------
# acquisition geometry
# ---------------------------------------------------------------------------


@dataclass
class _Geometry:
    rows: int
    cols: int
    ps: float
    spacing: float
    thickness: float
    s: np.ndarray  # offsets along the normal of each slice (bottom-up), mm
    R: np.ndarray  # head -> patient rotation
    centre: np.ndarray  # head centre, patient mm
    row: np.ndarray
    col: np.ndarray
    normal: np.ndarray
    off: tuple[float, float]  # head offset in the image plane (row, col dirs), mm
    box: tuple[int, int, int, int]  # i0, i1, j0, j1 crop containing the head


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head-to-patient rotation (degrees): yaw about z, pitch about x, roll about y."""
    cy, sy = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
    cp, sp = math.cos(math.radians(pitch)), math.sin(math.radians(pitch))
    cr, sr = math.cos(math.radians(roll)), math.sin(math.radians(roll))
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    ry = np.array([[cr, 0, sr], [0, 1, 0], [-sr, 0, cr]])
    return rz @ rx @ ry


def _fibonacci(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    th = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(th) * np.sin(phi), np.sin(th) * np.sin(phi), np.cos(phi)], axis=1)


def _geometry(A: _Anatomy, rng: np.random.Generator, matrix: int, n_slices: int | None,
              tilt: float | None) -> _Geometry:
    fov = float(rng.choice([220.0, 225.0, 230.0, 240.0, 250.0]))
    ps = fov / matrix
    if tilt is None:
        tilt = 0.0 if rng.random() < 0.45 else float(rng.uniform(5.0, 25.0))
    t = math.radians(tilt)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, math.cos(t), -math.sin(t)])
    normal = np.cross(row, col)
    R = _rotation(rng.uniform(-7, 7), rng.uniform(-6, 10), rng.uniform(-5, 5))
    # head outline (outer surface) and cavity floor points, head frame
    f = _fibonacci(800)
    outer = np.empty_like(f)
    to = A.t_skull + A.t_scalp + 3.0
    outer[:, 0] = f[:, 0] * (A.a + to)
    outer[:, 1] = f[:, 1] * (A.b + to)
    outer[:, 2] = f[:, 2] * np.where(f[:, 2] > 0, A.c_up + to, A.c_low + to)
    gx, gy = np.meshgrid(np.linspace(-A.a, A.a, 41), np.linspace(-A.b, A.b, 41))
    inside = (gx / A.a) ** 2 + (gy / A.b) ** 2 < 0.85
    fl, _ = _floor(gx[inside], gy[inside], None, foramen=False)
    floor_pts = np.stack([gx[inside], gy[inside], fl], axis=1)
    pn = (floor_pts @ R.T) @ normal
    on = (outer @ R.T) @ normal
    s_lo = float(pn.min()) - float(rng.uniform(2.0, 8.0))
    s_hi = float(on.max()) + float(rng.uniform(0.0, 4.0))
    if n_slices is None:
        thickness = float(rng.choice([3.0, 4.0, 5.0, 5.0, 5.0, 6.0, 7.0]))
        spacing = thickness
        n = int(round((s_hi - s_lo) / spacing)) + 1
        if n > 60:
            n = 60
            spacing = thickness = (s_hi - s_lo) / (n - 1)
        if n < 20:
            mid = 0.5 * (s_lo + s_hi)
            n = 20
            s_lo = mid - spacing * (n - 1) / 2
    else:
        n = int(n_slices)
        if n < 2:
            raise ValueError(f"n_slices must be at least 2, got {n_slices!r}")
        spacing = thickness = (s_hi - s_lo) / (n - 1)
    s = s_lo + spacing * np.arange(n)
    # in-plane placement: head offset within the field of view
    pr = (outer @ R.T) @ row
    pc = (outer @ R.T) @ col
    slack_r = max(0.0, (fov - (pr.max() - pr.min())) / 2 - 6.0)
    slack_c = max(0.0, (fov - (pc.max() - pc.min())) / 2 - 6.0)
    off_r = float(np.clip(rng.uniform(-12, 12), -slack_r, slack_r)) - 0.5 * (pr.max() + pr.min())
    off_c = float(np.clip(rng.uniform(-12, 12), -slack_c, slack_c)) - 0.5 * (pc.max() + pc.min())
    # crop box: head outline + head holder margin
    margin = 4.0
    jj = (np.array([pr.min() - margin, pr.max() + margin]) + off_r) / ps + (matrix - 1) / 2.0
    # (+18 mm in front for the facial soft tissue, +24 mm behind for the head holder)
    ii = (np.array([pc.min() - margin - 18.0, pc.max() + margin + 24.0]) + off_c) / ps + (matrix - 1) / 2.0
    box = (
        int(max(0, math.floor(ii[0]))),
        int(min(matrix, math.ceil(ii[1]) + 1)),
        int(max(0, math.floor(jj[0]))),
        int(min(matrix, math.ceil(jj[1]) + 1)),
    )
    centre = np.array([rng.uniform(-3, 3), rng.uniform(-140, -100), rng.uniform(-60, 140)])
    return _Geometry(
        rows=matrix, cols=matrix, ps=ps, spacing=float(spacing), thickness=float(thickness), s=s,
        R=R, centre=centre, row=row, col=col, normal=normal, off=(off_r, off_c), box=box,
    )
