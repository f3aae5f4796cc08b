"""Small float32 helpers for the implicit head model: partial-volume ramps,
in-place painting of HU and tissue codes, ellipsoid distances."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_F32 = np.float32


# ---------------------------------------------------------------------------
# small numeric helpers (all float32, vectorised)
# ---------------------------------------------------------------------------


def _ramp(t: np.ndarray) -> np.ndarray:
    """Linear step from 0 (t <= -0.5) to 1 (t >= 0.5)."""
    r = np.add(t, _F32(0.5), dtype=_F32)
    np.clip(r, 0.0, 1.0, out=r)
    return r


def _soft(d: np.ndarray, k: float) -> np.ndarray:
    """Partial-volume fraction of a region whose signed distance is ``d`` mm
    (positive inside), for voxels of size ``1/k`` mm."""
    r = np.multiply(d, _F32(k), dtype=_F32)
    r += _F32(0.5)
    np.clip(r, 0.0, 1.0, out=r)
    return r


def _lerp(hu: np.ndarray, val: Any, a: np.ndarray) -> None:
    """In place ``hu = hu + (val - hu) * a``."""
    hu += (val - hu) * a


def _paint(hu, tis, val, a, code) -> None:
    _lerp(hu, val, a)
    if tis is not None:
        tis[a >= 0.5] = code


def _ellipsoid_d(x, y, z, c, r, theta=0.0):
    """Approximate signed distance (mm, positive inside) to an ellipsoid with
    centre ``c``, radii ``r`` and rotation ``theta`` (rad) about z."""
    dx = x - _F32(c[0])
    dy = y - _F32(c[1])
    dz = z - _F32(c[2])
    if theta:
        ct, st = _F32(math.cos(theta)), _F32(math.sin(theta))
        dx, dy = dx * ct + dy * st, -dx * st + dy * ct
    rho = np.sqrt((dx / _F32(r[0])) ** 2 + (dy / _F32(r[1])) ** 2 + (dz / _F32(r[2])) ** 2)
    return (1.0 - rho) * _F32(min(r))


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)
