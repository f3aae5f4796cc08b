"""The head model: per-patient anatomy parameters (sizes, thicknesses, tissue HU,
atrophy, sulcal field) and the implicit shapes of the cranial cavity, skull-base
floor, ventricles and brainstem, in head coordinates."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from training.phantoms.numeric import _F32, _ellipsoid_d, _ramp, _unit

# ---------------------------------------------------------------------------
# anatomy model
# ---------------------------------------------------------------------------
# Head frame: millimetres, x = patient left, y = posterior, z = superior
# (LPS when the head is not rotated); origin near the third ventricle.


@dataclass
class _Anatomy:
    a: float  # cranial cavity semi-axes (mm)
    b: float
    c_up: float
    c_low: float
    deform: np.ndarray
    t_skull: float
    t_scalp: float
    t_base: float
    age: float
    sex: str
    atrophy: float
    vent: float
    t_sas: float
    w_sulc: float
    t_ctx: float
    d_sulc: float
    s_k: np.ndarray
    s_p: np.ndarray
    s_g: float
    dep_k: np.ndarray
    dep_p: float
    hu: dict[str, float]
    frontal_sinus: float
    pineal: tuple[float, float] | None
    choroid: tuple[float, float] | None
    headrest: tuple[float, float] | None
    birth_offset_days: int


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    age = float(rng.uniform(18, 92))
    atrophy = float(np.clip((age - 35.0) / 55.0, 0, 1) * rng.uniform(0.4, 1.2))
    gm = float(rng.uniform(35.5, 40.0))
    wm = float(rng.uniform(25.0, 30.0))
    hu = {
        "gm": gm,
        "wm": wm,
        "deep": gm - float(rng.uniform(0.5, 2.5)),
        "stem": float(rng.uniform(30, 34)),
        "cereb": float(rng.uniform(35, 39)),
        "csf": float(rng.uniform(2, 8)),
        "scalp": float(rng.uniform(35, 50)),
        "fat": float(rng.uniform(-105, -75)),
        "muscle": float(rng.uniform(42, 55)),
        "cort": float(rng.uniform(1150, 1500)),
        "diploe": float(rng.uniform(450, 750)),
        "base": float(rng.uniform(1000, 1450)),
        "petrous": float(rng.uniform(1500, 1900)),
        "falx": float(rng.uniform(42, 55)),
        "vitreous": float(rng.uniform(5, 15)),
        "lens": float(rng.uniform(90, 130)),
    }
    n_s = 8
    dirs = rng.normal(size=(n_s, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    mags = rng.uniform(19.0, 27.0, size=n_s)
    s_k = dirs * mags[:, None]
    mean_r = 75.0
    s_g = float(np.sqrt(np.sum(mags**2) / 3.0) / mean_r)  # |grad F| per mm
    dep_dir = rng.normal(size=3)
    dep_k = _unit(dep_dir) * rng.uniform(4, 7)
    return _Anatomy(
        a=float(rng.uniform(62, 70)),
        b=float(rng.uniform(80, 90)),
        c_up=float(rng.uniform(70, 80)),
        c_low=float(rng.uniform(66, 72)),
        deform=rng.normal(0.0, 0.022, size=8),
        t_skull=float(rng.uniform(5.5, 7.5)),
        t_scalp=float(rng.uniform(3.5, 6.5)),
        t_base=float(rng.uniform(5.0, 9.0)),
        age=age,
        sex=str(rng.choice(["F", "M"])),
        atrophy=atrophy,
        vent=float(0.8 + 0.55 * atrophy + rng.uniform(-0.08, 0.12)),
        t_sas=float(0.6 + 2.4 * atrophy + rng.uniform(0, 0.4)),
        w_sulc=float(1.1 + 2.0 * atrophy + rng.uniform(0, 0.4)),
        t_ctx=float(rng.uniform(2.6, 3.4)),
        d_sulc=float(rng.uniform(12, 17)),
        s_k=s_k.astype(_F32),
        s_p=rng.uniform(0, 2 * np.pi, size=n_s).astype(_F32),
        s_g=s_g,
        dep_k=dep_k.astype(_F32),
        dep_p=float(rng.uniform(0, 2 * np.pi)),
        hu=hu,
        frontal_sinus=float(rng.uniform(0.6, 1.2)) if rng.random() < 0.8 else 0.0,
        pineal=(float(rng.uniform(2, 3)), float(rng.uniform(120, 300))) if rng.random() < 0.5 else None,
        choroid=(float(rng.uniform(2, 3.5)), float(rng.uniform(80, 220))) if rng.random() < 0.5 else None,
        headrest=(float(rng.uniform(8, 16)), float(rng.uniform(150, 350))) if rng.random() < 0.75 else None,
        birth_offset_days=int(rng.integers(0, 365)),
    )


def _bowl(x, y, cx, cy, rx, ry):
    r2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return np.sqrt(np.maximum(1.0 - r2, 0.0))


def _floor(x, y, z=None, foramen=True):
    """Height (z, mm) of the cranial-cavity floor, and the petrous line.

    Anterior fossa at z = -22; rounded middle fossae (temporal lobes) and a
    deeper posterior fossa meet along the petrous ridges; the sella sits
    between the middle fossae; the foramen magnum opens the posterior floor.
    """
    ax = np.abs(x)
    ypet = -8.0 + 0.75 * np.maximum(ax - 10.0, 0.0)
    dep = np.maximum(20.0 * _bowl(ax, y, 40.0, -3.0, 27.0, 26.0), 38.0 * _bowl(x, y, 0.0, 32.0, 60.0, 43.0))
    dep = np.maximum(dep, 7.0 * _bowl(x, y, 0.0, -13.0, 8.0, 8.0))
    # orbital roofs dome upwards; the olfactory groove dips in the midline
    fl = -22.0 - dep + 4.0 * _bowl(ax, y, 28.0, -60.0, 17.0, 24.0) - 3.0 * _bowl(x, y, 0.0, -55.0, 7.0, 25.0)
    if foramen:
        fl = fl - 40.0 * _ramp((1.0 - (x / 14.0) ** 2 - ((y - 12.0) / 17.0) ** 2) * 4.0)
    return fl, ypet


def _cavity(A: _Anatomy, x, y, z):
    """Distance inside the ellipsoidal calvarium (mm) and the unit direction."""
    cz = np.where(z > 0, _F32(A.c_up), _F32(A.c_low))
    X = x / _F32(A.a)
    Y = y / _F32(A.b)
    Z = z / cz
    rho = np.sqrt(X * X + Y * Y + Z * Z) + _F32(1e-6)
    qx, qy, qz = X / rho, Y / rho, Z / rho
    d = A.deform
    delta = (
        d[0] * qx
        + d[1] * qy
        + d[2] * qz
        + d[3] * qx * qy
        + d[4] * qy * qz
        + d[5] * qx * qz
        + d[6] * (qx * qx - qy * qy)
        + d[7] * (qz * qz - 0.33)
        + _F32(0.05) * qx * qx * qy  # narrower forehead, wider occiput
    )
    g = np.maximum(np.sqrt((X / _F32(A.a)) ** 2 + (Y / _F32(A.b)) ** 2 + (Z / cz) ** 2) / rho, _F32(1e-3))
    d_cav = (1.0 + delta - rho) / g
    return d_cav, qx, qy, qz


def _shift_x(x, y, z, shifts):
    """x coordinate for midline structures displaced by mass effect."""
    if not shifts:
        return x
    xs = x.copy()
    for s, yl, zl in shifts:
        xs -= _F32(s) * np.exp(-((y - _F32(yl)) ** 2 + (z - _F32(zl)) ** 2) / _F32(2 * 45.0**2))
    return xs


_VENT_PARTS = {
    # name: (centre, radii, rotation (deg, left side) about z); x and z radii scale with ventricle size
    "frontal": ((8.5, -17.0, 14.0), (5.5, 15.0, 8.0), -20.0),
    "body": ((11.0, 6.0, 20.0), (4.8, 20.0, 6.0), -6.0),
    "atrium": ((20.0, 29.0, 12.0), (6.5, 10.0, 8.5), 10.0),
    "occipital": ((21.0, 43.0, 8.0), (3.8, 12.0, 4.5), 14.0),
    "temporal": ((30.0, 0.0, -14.0), (3.0, 14.0, 3.5), -12.0),
}
# a fixed set of wave vectors for irregular air-cell and trabecular textures
_CELL_K = (
    np.array([[0.83, 0.41, 0.39], [-0.27, 0.91, 0.31], [0.35, -0.22, 0.91], [-0.62, -0.55, 0.56], [0.1, 0.7, -0.7]])
    * 1.15
).astype(np.float32)


def _cells(x, y, z):
    """Irregular cellular texture in [-1, 1] (scale about 5 mm)."""
    c = np.zeros_like(x)
    for i, kv in enumerate(_CELL_K):
        c += np.sin(x * kv[0] + y * kv[1] + z * kv[2] + _F32(i * 1.3))
    return c * _F32(1.0 / 2.2)


def _lateral_ventricle(x, y, z, side, vs):
    out = None
    for cen, rad, th in _VENT_PARTS.values():
        c = (side * cen[0] * (0.8 + 0.2 * vs), cen[1], cen[2])
        r = (rad[0] * vs, rad[1] * (0.9 + 0.1 * vs), rad[2] * (0.7 + 0.3 * vs))
        d = _ellipsoid_d(x, y, z, c, r, math.radians(side * th))
        out = d if out is None else np.maximum(out, d)
    return out


def _brainstem(z, y_clivus):
    """Centre y and radii of the brainstem cross-section at height z."""
    pons = np.exp(-(((z + 38.0) / 10.0) ** 2))
    rx = 9.5 + 6.0 * pons + 3.0 * _ramp((z + 30.0) / 6.0)
    ry = 8.0 + 5.0 * pons + 2.5 * _ramp((z + 30.0) / 6.0)
    yc = y_clivus + 3.0 + ry
    return yc, rx, ry
