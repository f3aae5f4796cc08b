"""Synthetic head-CT phantoms with labelled intracranial hemorrhage.

No labelled head CT ships with ichnode, so its tests, its default model and
its demos use the series this module writes: real DICOM CT series
(CT Image Storage, Explicit VR Little Endian) of a plausible head, built as an
implicit 3-D model in head coordinates and sampled on the slice planes of a
(possibly gantry-tilted) axial acquisition, with per-slice labels in the
order of :data:`LABELS`.

Anatomy (Hounsfield units): air, scalp with a thin fat layer and temporalis
muscle, a calvarium with cortical tables and diploe whose thickness varies
with position, a skull base with anterior / middle / posterior fossae,
petrous ridges, mastoid air cells, sella, sphenoid / ethmoid / frontal
sinuses and orbits (fat, globe, lens), grey-matter cortex following a
labyrinth of sulci, white matter, deep grey nuclei, lateral ventricles
(butterfly frontal horns, bodies, atria, occipital and temporal horns),
third and fourth ventricles, sylvian and interhemispheric fissures with a
falx, basal cisterns (suprasellar star, perimesencephalic ring, cisterna
magna), brainstem and a foliated cerebellum; optional pineal / choroid
calcification and a head holder; head size, shape, pose and atrophy vary
per patient. Gaussian noise is added and the image mildly smoothed.

Hemorrhage (acute blood 50-90 HU): epidural biconvex lens, subdural
crescent (convexity or parafalcine), subarachnoid blood in sulci, fissures
and / or basal cisterns, intraventricular layering or cast, and
intraparenchymal focus with an oedema rim. Large lesions shift the midline
structures. A subtype is labelled on a slice when the lesion covers at
least about 3 mm^2 of that slice.

Command line::

    python -m training.phantoms --out DIR --series N --seed S \
        [--layout series|rsna] [--matrix 512|256] [--positive-fraction 0.5]
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "LABELS",
    "SUBTYPES",
    "RSNA_LABEL_ORDER",
    "TISSUE",
    "PhantomSeries",
    "make_series",
    "write_dataset",
    "rsna_fix_intercept",
    "ENCODINGS",
    "main",
]

LABELS: tuple[str, ...] = (
    "any",
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)
"""Label order of :attr:`PhantomSeries.labels` and of ``labels.csv``."""

SUBTYPES: tuple[str, ...] = LABELS[1:]

RSNA_LABEL_ORDER: tuple[str, ...] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)
"""Order of the six rows per image in RSNA's ``stage_2_train.csv``."""

TISSUE: dict[str, int] = {
    "air": 0,
    "soft_tissue": 1,
    "fat": 2,
    "bone": 3,
    "grey_matter": 4,
    "white_matter": 5,
    "csf": 6,
    "blood": 7,
    "oedema": 8,
    "calcification": 9,
}
"""Codes of :attr:`PhantomSeries.tissue` (dominant tissue of each voxel)."""

MANUFACTURER = "ICHNODE PHANTOM"
ENCODINGS: tuple[str, ...] = ("u12", "s16", "s16_1024", "rsna_bad_intercept")
"""Pixel encodings :func:`make_series` draws from (or is told to use)."""
_SIZES = ("subtle", "medium", "large")
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as generate_uid uses
_MIN_AREA_MM2 = 3.0  # lesion area on a slice needed for a positive slice label
_F32 = np.float32


# ---------------------------------------------------------------------------
# public result type
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PhantomSeries:
    """One synthetic CT series.

    Attributes
    ----------
    datasets : list of pydicom.dataset.FileDataset
        The slices, in InstanceNumber order (which is bottom-up or top-down,
        chosen per series); ready for ``save_as``.
    labels : numpy.ndarray
        ``(n_slices, 6)`` uint8 in :data:`LABELS` order, row ``k`` belongs to
        ``datasets[k]``; ``any`` is the maximum of the subtypes.
    hu : numpy.ndarray or None
        ``(n_slices, rows, cols)`` int16: the HU a correct reader recovers
        from the files (for the RSNA "bad intercept" quirk: after the fix).
    masks : dict of str to numpy.ndarray, or None
        Per subtype present, a boolean ``(n_slices, rows, cols)`` lesion mask
        (voxels whose blood fraction is at least one half).
    tissue : numpy.ndarray or None
        ``(n_slices, rows, cols)`` uint8 dominant tissue, codes in
        :data:`TISSUE` (before noise).
    meta : dict
        Acquisition and lesion parameters (for tests, debugging, reports).
    """

    datasets: list[pydicom.Dataset]
    labels: np.ndarray
    hu: np.ndarray | None = None
    masks: Mapping[str, np.ndarray] | None = None
    tissue: np.ndarray | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def patient_id(self) -> str:
        return str(self.datasets[0].PatientID)


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


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head-to-patient rotation (degrees): yaw about z, pitch about x, roll about y."""
    cy, sy = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
    cp, sp = math.cos(math.radians(pitch)), math.sin(math.radians(pitch))
    cr, sr = math.cos(math.radians(roll)), math.sin(math.radians(roll))
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    ry = np.array([[cr, 0, sr], [0, 1, 0], [-sr, 0, cr]])
    return rz @ rx @ ry


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


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


# ---------------------------------------------------------------------------
# lesions
# ---------------------------------------------------------------------------


@dataclass
class _Lesion:
    kind: str
    size: str
    hu: float
    p: dict[str, Any]


def _direction(el: float, az: float) -> np.ndarray:
    """Unit vector (normalised head space): az 0 = left, 90 = anterior, 180 = right."""
    el, az = math.radians(el), math.radians(az)
    return np.array([math.cos(el) * math.cos(az), -math.cos(el) * math.sin(az), math.sin(el)])


def _surface_point(A: _Anatomy, q: np.ndarray, depth: float = 0.0) -> np.ndarray:
    cz = A.c_up if q[2] > 0 else A.c_low
    p = np.array([A.a * q[0], A.b * q[1], cz * q[2]])
    r = np.linalg.norm(p)
    return p * max(0.05, 1.0 - depth / r)


def _tangent_basis(q0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e1 = np.cross([0.0, 0.0, 1.0], q0)
    if np.linalg.norm(e1) < 1e-6:
        e1 = np.array([1.0, 0.0, 0.0])
    e1 = _unit(e1)
    e2 = np.cross(q0, e1)
    return e1, e2


def _blood_hu(rng, size):
    return float(rng.uniform(50, 58)) if size == "subtle" else float(rng.uniform(60, 85))


def _sample_lesion(kind: str, size: str, rng: np.random.Generator, A: _Anatomy, dz: float) -> _Lesion:
    """Sample one lesion; ``dz`` is the slice spacing (lesions are made at
    least about one spacing tall so that a slice always catches them)."""
    hu = _blood_hu(rng, size)
    side = 1.0 if rng.random() < 0.5 else -1.0
    p: dict[str, Any] = {"side": side}
    if kind == "epidural":
        site = rng.choice(["temporal", "frontal", "parietal", "occipital"], p=[0.5, 0.2, 0.2, 0.1])
        if site == "temporal":
            el, az = rng.uniform(-5, 22), rng.uniform(-25, 25)
        elif site == "frontal":
            el, az = rng.uniform(5, 35), rng.uniform(35, 80)
        elif site == "parietal":
            el, az = rng.uniform(30, 55), rng.uniform(-40, 40)
        else:
            el, az = rng.uniform(5, 30), rng.uniform(-80, -35)
        az = az if side > 0 else 180.0 - az
        q0 = _direction(el, az)
        if size == "subtle":
            r1, t = rng.uniform(10, 15), rng.uniform(3, 5)
        elif size == "medium":
            r1, t = rng.uniform(16, 26), rng.uniform(6, 12)
        else:
            r1, t = rng.uniform(25, 42), rng.uniform(12, 28)
        r2 = r1 * rng.uniform(0.75, 1.15)
        r2 = max(r2, 0.9 * dz + 4.0)
        e1, e2 = _tangent_basis(q0)
        p.update(q0=q0, e1=e1, e2=e2, r1=r1, r2=r2, t=t, site=str(site), power=1.0)
        p["shift"] = 0.35 * t if t > 8 else 0.0
    elif kind == "subdural":
        parafalcine = rng.random() < 0.15
        if parafalcine:
            y0 = rng.uniform(-40, 40)
            z0 = rng.uniform(25, 50)
            t = rng.uniform(2.0, 3.0) if size == "subtle" else rng.uniform(3.0, 7.0)
            ly = rng.uniform(15, 25) if size == "subtle" else rng.uniform(25, 50)
            lz = max(rng.uniform(10, 25), 0.9 * dz + 3.0)
            p.update(parafalcine=True, y0=y0, z0=z0, t=t, ly=ly, lz=lz, shift=0.0)
        else:
            el, az = rng.uniform(5, 50), rng.uniform(-60, 70)
            az = az if side > 0 else 180.0 - az
            q0 = _direction(el, az)
            if size == "subtle":
                r1, t = rng.uniform(22, 40), rng.uniform(2.0, 3.5)
            elif size == "medium":
                r1, t = rng.uniform(45, 70), rng.uniform(4, 8)
            else:
                r1, t = rng.uniform(60, 100), rng.uniform(8, 20)
            r2 = max(r1 * rng.uniform(0.6, 0.9), 0.9 * dz + 6.0)
            e1, e2 = _tangent_basis(q0)
            p.update(parafalcine=False, q0=q0, e1=e1, e2=e2, r1=r1, r2=r2, t=t, power=0.85)
            p["shift"] = min(0.5 * t, 12.0) if t > 5 else 0.0
    elif kind == "subarachnoid":
        pattern = "convexity" if size == "subtle" else str(rng.choice(["cisternal", "convexity", "both"], p=[0.4, 0.4, 0.2]))
        p["pattern"] = pattern
        if pattern in ("cisternal", "both"):
            p["cist_c"] = np.array([rng.uniform(-6, 6), rng.uniform(-14, -2), rng.uniform(-22, -10)])
            p["cist_r"] = rng.uniform(28, 40) if size == "medium" else rng.uniform(40, 60)
        if pattern in ("convexity", "both"):
            q0 = _direction(rng.uniform(15, 65), rng.uniform(0, 360))
            p["conv_c"] = _surface_point(A, q0, depth=A.t_sas + 4.0)
            if size == "subtle":
                p["conv_r"] = max(rng.uniform(8, 12), 0.6 * dz + 4.0)
            elif size == "medium":
                p["conv_r"] = rng.uniform(14, 22)
            else:
                p["conv_r"] = rng.uniform(22, 38)
        p["fill"] = rng.uniform(0.85, 1.0)
        p["shift"] = 0.0
    elif kind == "intraventricular":
        pattern = "layering" if size == "subtle" else str(rng.choice(["layering", "cast"], p=[0.6, 0.4]))
        p["pattern"] = pattern
        if pattern == "layering":
            p["sides"] = (side,) if (size == "subtle" or rng.random() < 0.4) else (-1.0, 1.0)
            p["depth"] = rng.uniform(1.8, 3.0) if size == "subtle" else (
                rng.uniform(3, 6) if size == "medium" else rng.uniform(6, 12))
        else:
            p["parts"] = tuple(
                sorted(set(rng.choice(["left", "right", "third", "fourth"], size=int(rng.integers(1, 4)), replace=False)))
            )
            p["fill"] = rng.uniform(0.7, 1.0)
        p["shift"] = 0.0
    elif kind == "intraparenchymal":
        site = str(rng.choice(["deep", "lobar", "cerebellar"], p=[0.4, 0.45, 0.15]))
        if size == "subtle":
            r = rng.uniform(2.5, 4.5)
        elif size == "medium":
            r = rng.uniform(5, 10)
        else:
            r = rng.uniform(10, 22)
        if site == "cerebellar":
            r = min(r, 14.0)
        if site == "deep":
            base = [(22.0, -2.0, 2.0), (11.0, 10.0, 4.0), (14.0, -14.0, 12.0)][int(rng.integers(0, 3))]
            c = np.array([side * base[0], base[1], base[2]]) + rng.uniform(-3, 3, size=3)
        elif site == "lobar":
            q0 = _direction(rng.uniform(5, 60), rng.uniform(0, 360))
            c = _surface_point(A, q0, depth=A.t_sas + r + rng.uniform(4, 14))
        else:
            c = np.array([side * rng.uniform(16, 28), rng.uniform(30, 42), rng.uniform(-46, -36)])
        radii = r * rng.uniform(0.75, 1.25, size=3)
        radii[2] = max(radii[2], 0.55 * dz + 0.8)
        p.update(
            site=site,
            c=c,
            radii=radii,
            irr=rng.normal(0, 0.15, size=3),
            lob=(rng.uniform(0.04, 0.12), int(rng.integers(2, 5)), rng.uniform(0, 2 * np.pi)),
            irr_v=_unit(rng.normal(size=3)),
            rim=(rng.uniform(1.0, 2.0) if size == "subtle" else rng.uniform(2.0, 6.0)),
            rim_hu=rng.uniform(14, 21),
        )
        p["shift"] = 0.3 * r if r > 10 else 0.0
    else:
        raise ValueError(f"unknown hemorrhage subtype {kind!r}; expected one of {SUBTYPES}")
    return _Lesion(kind=kind, size=size, hu=hu, p=p)


def _lesion_shift(les: _Lesion, A: _Anatomy) -> tuple[float, float, float] | None:
    s = les.p.get("shift", 0.0)
    if s <= 0:
        return None
    if "q0" in les.p:
        c = _surface_point(A, les.p["q0"])
    elif "c" in les.p:
        c = les.p["c"]
    else:
        return None
    side = 1.0 if c[0] >= 0 else -1.0
    return (side * s, float(c[1]), float(c[2]))


# ---------------------------------------------------------------------------
# renderer
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


def _render(A: _Anatomy, lesions: list[_Lesion], G: _Geometry, noise_sd: float,
            rng_noise: np.random.Generator, want_tissue: bool):
    """Returns clean-plus-noise HU (float32), tissue, lesion slice counts and masks."""
    n = len(G.s)
    k = _F32(1.0 / G.ps)
    i0, i1, j0, j1 = G.box
    ni, nj = i1 - i0, j1 - j0
    Rt = G.R.T
    rn, rr, rc = Rt @ G.normal, Rt @ G.row, Rt @ G.col
    I = ((np.arange(i0, i1) - (G.rows - 1) / 2.0) * G.ps - G.off[1]).astype(_F32)
    J = ((np.arange(j0, j1) - (G.cols - 1) / 2.0) * G.ps - G.off[0]).astype(_F32)
    gravity = Rt @ np.array([0.0, 1.0, 0.0])  # supine: posterior is dependent

    out = np.empty((n, G.rows, G.cols), dtype=_F32)
    tissue = np.zeros((n, G.rows, G.cols), dtype=np.uint8) if want_tissue else None
    counts = np.zeros((len(lesions), n), dtype=np.int64)
    masks = [np.zeros((n, G.rows, G.cols), dtype=bool) for _ in lesions] if want_tissue else None
    shifts = [s for s in (_lesion_shift(les, A) for les in lesions) if s is not None]

    chunk = max(1, int(400_000 // max(1, ni * nj)))
    sd_raw = noise_sd / 0.375  # the 3x3 binomial smoothing divides noise sd by 0.375
    for k0 in range(0, n, chunk):
        k1 = min(n, k0 + chunk)
        S = G.s[k0:k1].astype(_F32)
        x = (S[:, None, None] * _F32(rn[0]) + I[None, :, None] * _F32(rc[0]) + J[None, None, :] * _F32(rr[0])).ravel()
        y = (S[:, None, None] * _F32(rn[1]) + I[None, :, None] * _F32(rc[1]) + J[None, None, :] * _F32(rr[1])).ravel()
        z = (S[:, None, None] * _F32(rn[2]) + I[None, :, None] * _F32(rc[2]) + J[None, None, :] * _F32(rr[2])).ravel()
        hu = np.full(x.shape, -1000.0, dtype=_F32)
        tis = np.zeros(x.shape, dtype=np.uint8) if want_tissue else None
        lesion_alpha = _render_head(A, lesions, shifts, x, y, z, k, gravity, hu, tis)
        for li, (idx, alpha) in enumerate(lesion_alpha):
            if idx is None:
                continue
            hit = idx[alpha >= 0.5]
            counts[li, k0:k1] += np.bincount(hit // (ni * nj), minlength=k1 - k0)
            if masks is not None:
                flat = np.zeros(x.shape, dtype=bool)
                flat[hit] = True
                masks[li][k0:k1, i0:i1, j0:j1] = flat.reshape(k1 - k0, ni, nj)
        if A.headrest is not None:
            _headrest(A, G, x, y, z, k, hu, tis)
        vol = np.full((k1 - k0, G.rows, G.cols), -1000.0, dtype=_F32)
        vol[:, i0:i1, j0:j1] = hu.reshape(k1 - k0, ni, nj)
        if tissue is not None:
            tissue[k0:k1, i0:i1, j0:j1] = tis.reshape(k1 - k0, ni, nj)
        vol += rng_noise.standard_normal(vol.shape, dtype=_F32) * _F32(sd_raw)
        out[k0:k1] = _smooth(vol)
    return out, tissue, counts, masks


def _smooth(v: np.ndarray) -> np.ndarray:
    """3x3 binomial smoothing in-plane (edge replicated)."""
    p = np.pad(v, ((0, 0), (1, 1), (0, 0)), mode="edge")
    v = (p[:, :-2] + 2.0 * p[:, 1:-1] + p[:, 2:]) * _F32(0.25)
    p = np.pad(v, ((0, 0), (0, 0), (1, 1)), mode="edge")
    return (p[:, :, :-2] + 2.0 * p[:, :, 1:-1] + p[:, :, 2:]) * _F32(0.25)


def _headrest(A, G, x, y, z, k, hu, tis):
    """Curved head holder behind the head (fixed to the patient frame)."""
    gap, val = A.headrest
    R = G.R.astype(_F32)
    px = R[0, 0] * x + R[0, 1] * y + R[0, 2] * z
    py = R[1, 0] * x + R[1, 1] * y + R[1, 2] * z
    ra = A.a + 14.0 + gap
    rb = A.b + 14.0 + gap
    rho = np.sqrt((px / _F32(ra)) ** 2 + (py / _F32(rb)) ** 2)
    d = (rho - 1.0) * _F32(0.5 * (ra + rb))
    band = np.minimum(d, 4.0 - d)
    a = _soft(band, k) * _ramp((py - 0.35 * rb) / 6.0)
    m = a > 0
    if np.any(m):
        _paint_sub(hu, tis, m, val, a[m], TISSUE["soft_tissue"])


def _paint_sub(hu, tis, m, val, a, code):
    h = hu[m]
    _lerp(h, val, a)
    hu[m] = h
    if tis is not None:
        t = tis[m]
        t[a >= 0.5] = code
        tis[m] = t


def _render_head(A: _Anatomy, lesions, shifts, x, y, z, k, gravity, hu_out, tis_out):
    """Paint the head into ``hu_out`` (flat, air already); returns per lesion
    (indices into the flat arrays, blood fraction)."""
    d_cav, qx, qy, qz = _cavity(A, x, y, z)
    res: list[tuple[Any, Any]] = [(None, None)] * len(lesions)
    # the head: within skull + scalp (at most ~ 50 mm) of the cavity outline
    hsel = np.nonzero(d_cav > -(A.t_skull * 1.3 + 9.0 * A.frontal_sinus + A.t_scalp * 1.3 + 24.0))[0]
    if hsel.size == 0:
        return res
    x, y, z = x[hsel], y[hsel], z[hsel]
    d_cav, qx, qy, qz = d_cav[hsel], qx[hsel], qy[hsel], qz[hsel]
    # local skull and scalp thickness
    qx4 = qx * qx
    qx4 *= qx4
    t_sk = _F32(A.t_skull) * (0.95 + 0.2 * qz + 0.1 * qy * qy - 0.38 * qx4)
    fs = None
    if A.frontal_sinus > 0:
        bump = np.maximum(1.0 - (qx / 0.3) ** 2 - ((qz + 0.02) / 0.24) ** 2, 0.0)
        fs = _F32(A.frontal_sinus) * bump * bump * _ramp((-qy - 0.78) / 0.1)
        t_sk = t_sk + 9.0 * fs
    temporalis = qx4 * _ramp((18.0 - z) / 12.0) * _ramp((z + 45.0) / 12.0)
    face = _ramp((-qy - 0.6) / 0.2) * _ramp((-z - 18.0) / 10.0)
    t_sc = _F32(A.t_scalp) * (1.0 + 0.3 * np.maximum(qy, 0)) + 6.0 * temporalis + 16.0 * face
    d_out = d_cav + t_sk + t_sc
    keep = np.nonzero(d_out > -1.5)[0]
    if keep.size == 0:
        return res
    hsel = hsel[keep]
    x, y, z = x[keep], y[keep], z[keep]
    d_cav, qx, qy, qz = d_cav[keep], qx[keep], qy[keep], qz[keep]
    t_sk, t_sc, d_out, temporalis = t_sk[keep], t_sc[keep], d_out[keep], temporalis[keep]
    if fs is not None:
        fs = fs[keep]
    fl, ypet = _floor(x, y, z)
    cav = np.minimum(d_cav, z - fl)  # signed distance into the cranial cavity (mm)
    hu = np.full(hsel.shape, -1000.0, dtype=_F32)
    tis = np.zeros(hsel.shape, dtype=np.uint8) if tis_out is not None else None

    # --- everything outside the cavity: scalp, skull, skull base, face
    osel = np.nonzero(cav < 1.0)[0]
    if osel.size:
        ho, to = _render_outer(
            A, k, x[osel], y[osel], z[osel], d_cav[osel], cav[osel], ypet[osel], t_sk[osel],
            t_sc[osel], d_out[osel], temporalis[osel], None if fs is None else fs[osel],
            tis is not None,
        )
        hu[osel] = ho
        if tis is not None:
            tis[osel] = to

    # --- cranial cavity contents
    csel = np.nonzero(cav > -1.0)[0]
    if csel.size:
        hu_c, tis_c, les_c = _render_brain(
            A, lesions, shifts, x[csel], y[csel], z[csel], qx[csel], qy[csel], qz[csel], cav[csel],
            d_cav[csel], ypet[csel], k, gravity, tis is not None,
        )
        a_cav = _soft(cav[csel], k)
        h = hu[csel]
        _lerp(h, hu_c, a_cav)
        hu[csel] = h
        if tis is not None:
            t = tis[csel]
            m = a_cav >= 0.5
            t[m] = tis_c[m]
            tis[csel] = t
        res = [(None, None) if idx is None else (hsel[csel[idx]], al) for idx, al in les_c]
    hu_out[hsel] = hu
    if tis_out is not None:
        tis_out[hsel] = tis
    return res


def _render_outer(A: _Anatomy, k, x, y, z, d_cav, cav, ypet, t_sk, t_sc, d_out, temporalis, fs, want_tissue):
    """HU of the voxels outside the cranial cavity (air where outside the head)."""
    T = TISSUE
    H = A.hu
    hu = np.full(x.shape, -1000.0, dtype=_F32)
    tis = np.zeros(x.shape, dtype=np.uint8) if want_tissue else None
    # scalp: skin, thin fat layer, temporalis muscle
    scalp_depth = d_out / np.maximum(t_sc, 1.0)  # 0 at skin, 1 at outer table
    fat = _ramp((0.12 - np.abs(scalp_depth - 0.45)) * 10.0) * _ramp((t_sc - 3.5)) * (1.0 - temporalis)
    scalp_hu = _F32(H["scalp"]) + (_F32(H["fat"]) - H["scalp"]) * fat * 0.6 + (H["muscle"] - H["scalp"]) * temporalis
    _paint(hu, tis, scalp_hu, _soft(d_out, k), T["soft_tissue"])
    # calvarium: cortical tables and diploe
    r = -d_cav / t_sk
    dip = _ramp((np.minimum(r, 1.0 - r) - 0.3) * 8.0) * _ramp((t_sk - 4.0))
    tex = np.sin(x * 1.7 + y * 0.4) * np.sin(y * 1.3 + z * 0.5) * np.sin(z * 1.9 + x * 0.3)
    a_calv = _soft(np.minimum(d_cav + t_sk, -d_cav), k)
    _paint(hu, tis, _F32(H["cort"]) + (_F32(H["diploe"]) - H["cort"] + 180.0 * tex) * dip, a_calv, T["bone"])
    if fs is not None:  # frontal sinus: air between the tables
        a_fs = _ramp((fs - 0.35) * 6.0) * _ramp((0.32 - np.abs(r - 0.5)) * 10.0) * a_calv
        _paint(hu, tis, _F32(-950.0), a_fs, T["air"])

    # skull base, sinuses and orbits: all below z = -20 (head frame)
    low = np.nonzero(z < -20.0)[0]
    if low.size:
        lt = tis[low] if tis is not None else None
        lh = _render_base(A, k, x[low], y[low], z[low], d_cav[low], cav[low], ypet[low], d_out[low], tex[low],
                          a_calv[low], hu[low], lt)
        hu[low] = lh
        if tis is not None:
            tis[low] = lt
    return hu, tis


def _render_base(A: _Anatomy, k, x, y, z, d_cav, cav, ypet, d_out, tex, a_calv, hu, tis):
    T = TISSUE
    H = A.hu
    ax = np.abs(x)
    a_int = _soft(d_cav, k) * _soft(-cav, k)  # inside the skull outline, below the cavity floor
    # below the anterior / middle fossa: sphenoid wings behind the orbits, muscle elsewhere
    sph_zone = _ramp((-y - 27.0) / 4.0) * _ramp((y + 52.0) / 4.0) * _soft(-cav - 2.0, k)
    _paint(hu, tis, _F32(H["muscle"]) + (_F32(H["base"]) * 0.6 + 120.0 * tex - H["muscle"]) * sph_zone, a_int,
           T["soft_tissue"])
    if tis is not None:
        tis[(a_int >= 0.5) & (sph_zone >= 0.5)] = T["bone"]
    # bony floor of the fossae (thin orbital roofs)
    t_base = 2.0 + (_F32(A.t_base) - 2.0) * _ramp((y + 30.0) / 10.0)
    a_base = a_int * _soft(cav + t_base, k) * (1.0 - a_calv)
    _paint(hu, tis, _F32(H["base"]) + 250.0 * tex, a_base, T["bone"])
    # petrous bone and mastoid air cells
    dpet = np.maximum(np.abs(y - ypet) * 0.8 - (4.0 + 0.12 * np.maximum(ax - 10, 0)), 13.0 - ax)
    a_pet = _soft(-dpet, k) * _soft(d_cav + 2.0, k) * _soft(-cav - 0.5, k)
    _paint(hu, tis, _F32(H["petrous"]) + 150.0 * tex, a_pet, T["bone"])
    cells = _cells(x, y, z)
    for s in (-1.0, 1.0):
        d_m = _ellipsoid_d(x, y, z, (s * 47.0, 14.0, -46.0), (11.0, 13.0, 12.0))
        a_m = _soft(d_m, k) * _ramp((cells - 0.05) * 5.0) * _soft(-cav, k)
        _paint(hu, tis, _F32(-900.0), a_m, T["air"])
    # paranasal sinuses (air with bony septa)
    below = _soft(-cav - 1.0, k)
    eth = _ramp((12.0 - ax) / 3.0) * _ramp((-y - 48.0) / 3.0) * _ramp((-23.5 - z) / 2.0) * _soft(d_out - 4.0, k)
    _paint(hu, tis, _F32(-900.0), eth * below * _ramp((cells + 0.25) * 5.0), T["air"])
    sph = _ellipsoid_d(x, y, z, (0.0, -32.0, -45.0), (15.0, 13.0, 11.0))
    _paint(hu, tis, _F32(-920.0), _soft(sph, k) * below * _ramp((np.abs(x - 1.5) - 0.8) * 2.0), T["air"])
    for s in (-1.0, 1.0):
        d_mx = _ellipsoid_d(x, y, z, (s * 28.0, -68.0, -78.0), (15.0, 16.0, 20.0))
        _paint(hu, tis, _F32(-920.0), _soft(d_mx, k) * below, T["air"])
        # orbit: bony wall, fat, optic nerve, globe, lens
        d_o = _ellipsoid_d(x, y, z, (s * 30.0, -64.0, -42.0), (16.0, 21.0, 20.5))
        a_wall = _soft(np.minimum(d_o + 1.8, -d_o), k) * _ramp((y + 76.0) / 4.0) * _soft(-cav, k)
        _paint(hu, tis, _F32(H["base"]) * 0.8, a_wall, T["bone"])
        a_o = _soft(d_o, k) * _soft(-cav - 0.5, k)
        _paint(hu, tis, _F32(H["fat"]), a_o, T["fat"])
        d_nerve = _F32(2.2) - np.sqrt((x - s * 27.0) ** 2 + (z + 40.0) ** 2)
        _paint(hu, tis, _F32(H["muscle"]) - 10.0, _soft(d_nerve, k) * a_o * _ramp((y + 62.0) / 2.0), T["soft_tissue"])
        d_g = _ellipsoid_d(x, y, z, (s * 31.0, -73.0, -40.0), (11.5, 11.5, 11.5))
        _paint(hu, tis, _F32(H["muscle"]), _soft(d_g, k), T["soft_tissue"])
        _paint(hu, tis, _F32(H["vitreous"]), _soft(d_g - 1.0, k), T["soft_tissue"])
        d_l = _ellipsoid_d(x, y, z, (s * 31.0, -82.5, -40.0), (4.5, 1.8, 4.5))
        _paint(hu, tis, _F32(H["lens"]), _soft(d_l, k), T["soft_tissue"])
    return hu


def _render_brain(A: _Anatomy, lesions, shifts, x, y, z, qx, qy, qz, cav, d_cav, ypet, k, gravity, want_tissue):
    """HU of the cavity contents (as if the whole voxel were inside)."""
    T = TISSUE
    H = A.hu
    tis = np.full(x.shape, T["white_matter"], dtype=np.uint8) if want_tissue else None
    xs = _shift_x(x, y, z, shifts)
    ax = np.abs(x)
    # below the brain surface: the CSF layer is t_sas under the vault, thin on the skull base
    depth = np.minimum(d_cav - _F32(A.t_sas), cav - _F32(0.6))
    depth_r = d_cav - _F32(A.t_sas)  # radial depth below the convexity (sulci run radially)
    # tentorium: posterior fossa below it
    z_tent = -16.0 - 0.3 * np.maximum(y, 0.0) - 0.12 * ax
    infra = _ramp((y - ypet) / 2.0) * _ramp((z_tent - z) / 2.0)
    supra = 1.0 - infra
    d_tent = np.abs(z - z_tent) + 10.0 * (1.0 - _ramp((y - ypet) / 2.0))

    # sulci: radial sheets from the zero set of a random field on the sphere
    shell = np.nonzero(depth_r < A.d_sulc + 6.0)[0]
    d_sulc3 = np.full(x.shape, 1e3, dtype=_F32)
    a_sulc = np.zeros(x.shape, dtype=_F32)
    a_sulc_sah = np.zeros(x.shape, dtype=_F32)
    if shell.size:
        sx, sy, sz = qx[shell], qy[shell], qz[shell]
        F = np.zeros(shell.shape, dtype=_F32)
        for kk in range(A.s_k.shape[0]):
            F += np.sin(sx * A.s_k[kk, 0] + sy * A.s_k[kk, 1] + sz * A.s_k[kk, 2] + A.s_p[kk])
        d_s = np.abs(F) / _F32(A.s_g)
        D = _F32(A.d_sulc) * (0.75 + 0.25 * np.sin(sx * A.dep_k[0] + sy * A.dep_k[1] + sz * A.dep_k[2] + A.dep_p))
        dep = depth_r[shell]
        taper = np.clip(1.0 - dep / D, 0.25, 1.0)
        hw = _F32(A.w_sulc / 2.0) * taper
        inside = _soft(D - dep, k)
        a_sulc[shell] = _soft(hw - d_s, k) * inside * _soft(depth[shell] + 0.5, k)
        a_sulc_sah[shell] = _soft(np.maximum(hw, 0.8) - d_s, k) * inside
        beyond = np.maximum(dep - D, 0.0)
        d_sulc3[shell] = np.sqrt(d_s * d_s + beyond * beyond) - hw
    a_sulc *= supra
    a_sulc_sah *= supra

    # sylvian fissures and interhemispheric fissure
    z_cc = 26.0 - 0.004 * y * y
    cc_region = _ramp((38.0 - np.abs(y - 1.0)) / 4.0) * _ramp((z_cc - z) / 3.0) * _ramp((z + 6.0) / 3.0)
    w_ih = _F32(1.2 + 1.6 * A.atrophy)
    d_ih = np.abs(xs) - w_ih / 2 + 30.0 * cc_region + 30.0 * infra
    a_ih = _soft(-d_ih, k)
    y_syl = -12.0 + 0.3 * (ax - 18.0) + 0.25 * (z + 8.0) + 2.0 * np.sin(ax * 0.35 + z * 0.2)
    w_syl = _F32(1.1 + 2.0 * A.atrophy) * (1.0 + 0.8 * _ramp((26.0 - ax) / 8.0))
    syl_zone = _ramp((ax - 16.0) / 3.0) * _ramp((6.0 - z) / 5.0) * _ramp((z + 26.0) / 4.0)
    d_syl = np.abs(y - y_syl) - w_syl / 2 + 40.0 * (1.0 - syl_zone)
    a_syl = _soft(-d_syl, k)

    # cortex ribbon: grey matter near any CSF surface
    dc = np.minimum(np.minimum(depth, d_sulc3), np.minimum(np.maximum(d_ih, 0), np.maximum(d_syl, 0)))
    dc = np.minimum(dc, d_tent)
    a_gm = _soft(_F32(A.t_ctx) - dc, k)
    hu = _F32(H["wm"]) + (_F32(H["gm"]) - H["wm"]) * a_gm
    if tis is not None:
        tis[a_gm >= 0.5] = T["grey_matter"]

    # cerebellum: foliated grey matter with a white-matter core
    cb = np.nonzero(infra > 0)[0]
    if cb.size:
        cx, cy, cz = x[cb], y[cb], z[cb]
        rc = np.sqrt(cx * cx * 0.6 + (cy - 28.0) ** 2 + (cz + 34.0) ** 2) + 1.5 * np.sin(cx * 0.25 + cz * 0.3)
        fol = np.abs(np.sin(rc * _F32(2 * np.pi / 6.0))) * _F32(6.0 / (2 * np.pi))
        dcb = depth[cb]
        a_fol = _soft(_F32(0.3 + 0.4 * A.atrophy) - fol, k) * _soft(7.0 - dcb, k) * 0.5
        core = _soft(dcb - 14.0, k)
        cb_hu = _F32(H["cereb"]) + (_F32(H["wm"]) + 2.0 - H["cereb"]) * core
        cb_hu = cb_hu + (_F32(H["csf"]) - cb_hu) * a_fol
        a_i = infra[cb]
        h = hu[cb]
        _lerp(h, cb_hu, a_i)
        hu[cb] = h
        if tis is not None:
            t = tis[cb]
            t[a_i >= 0.5] = np.where(a_fol >= 0.5, T["csf"], np.where(core >= 0.5, T["white_matter"], T["grey_matter"]))[a_i >= 0.5]
            tis[cb] = t

    # deep structures live in a central box: evaluate them there only
    cen = np.nonzero((ax < 48.0) & (y > -42.0) & (y < 62.0) & (z > -66.0) & (z < 34.0))[0]
    cx, cy, cz, cxs = x[cen], y[cen], z[cen], xs[cen]
    cax = np.abs(cx)
    ch = hu[cen]
    ct = tis[cen] if tis is not None else None
    # deep grey nuclei: lentiform nuclei and thalami
    csup = supra[cen]
    for s in (-1.0, 1.0):
        for c, r in (((22.0, -2.0, 2.0), (6.0, 14.0, 9.0)), ((10.5, 10.0, 4.0), (8.0, 12.0, 8.0))):
            d = _ellipsoid_d(cxs, cy, cz, (s * c[0], c[1], c[2]), r)
            _paint(ch, ct, _F32(H["deep"]), _soft(d, k) * csup, T["grey_matter"])
    hu[cen] = ch
    if tis is not None:
        tis[cen] = ct

    # subarachnoid CSF: convexity space, sulci, fissures
    a_sas = _soft(-depth, k)
    a_sub = np.maximum(np.maximum(a_sas, a_sulc), np.maximum(a_ih, a_syl) * supra)
    _paint(hu, tis, _F32(H["csf"]), a_sub, T["csf"])
    # falx in the interhemispheric fissure
    a_falx = _soft(0.45 - np.abs(xs), k) * _soft(-(d_ih - 30.0 * cc_region - 30 * infra) + w_ih / 2 - 0.2, k) * a_ih
    _paint(hu, tis, _F32(H["falx"]), a_falx * 0.8, T["soft_tissue"])

    ch = hu[cen]
    ct = tis[cen] if tis is not None else None
    # ventricles (lateral, third, fourth); caudate heads indent the frontal horns
    vs = A.vent
    septum = _soft(np.abs(cxs) - 0.9, k)
    c_vl = _soft(_lateral_ventricle(cxs, cy, cz, 1.0, vs), k) * septum
    c_vr = _soft(_lateral_ventricle(cxs, cy, cz, -1.0, vs), k) * septum
    c_v3 = _soft(_ellipsoid_d(cxs, cy, cz, (0.0, 3.0, -1.0), (1.6 + 1.4 * vs, 13.0, 8.0)), k)
    c_vent = np.maximum(np.maximum(c_vl, c_vr), c_v3)
    _paint(ch, ct, _F32(H["csf"]), c_vent, T["csf"])
    for s in (-1.0, 1.0):
        d = _ellipsoid_d(cxs, cy, cz, (s * (10.0 + 6.0 * vs), -13.0, 11.0), (5.0, 9.0, 8.0))
        a_c = _soft(d, k)
        _paint(ch, ct, _F32(H["deep"]), a_c, T["grey_matter"])
        if s > 0:
            c_vl = c_vl * (1 - a_c)
        else:
            c_vr = c_vr * (1 - a_c)

    # brainstem, fourth ventricle, cisterns
    y_cl = -8.0 + 0.35 * np.maximum(-28.0 - cz, 0.0)
    yc, rx, ry = _brainstem(cz, y_cl)
    rho_bs = np.sqrt((cx / rx) ** 2 + ((cy - yc) / ry) ** 2)
    d_bs = (1.0 - rho_bs) * np.minimum(rx, ry)
    a_bs = _soft(d_bs, k) * _ramp((-6.0 - cz) / 3.0)
    ring_w = _F32(1.3 + 1.5 * A.atrophy) * (1.0 + 0.8 * _ramp((cy - yc) / 6.0))
    c_ring = _soft(np.minimum(d_bs + ring_w, -d_bs), k) * _ramp((-4.0 - cz) / 3.0) * _ramp((cz + 30.0) / 4.0)
    # prepontine cistern: thin CSF between clivus and pons
    c_ring = np.maximum(c_ring, _soft(np.minimum(cy - y_cl - 0.5, y_cl + 3.0 - cy), k) * _ramp((12.0 - cax) / 3.0)
                        * _ramp((-26.0 - cz) / 3.0))
    _paint(ch, ct, _F32(H["csf"]), c_ring, T["csf"])
    _paint(ch, ct, _F32(H["stem"]), a_bs, T["white_matter"])
    c_v4 = _soft(_ellipsoid_d(cx, cy - (yc + ry + 1.0), cz, (0.0, 0.0, -38.0), (5.5 + 1.5 * vs, 3.5, 7.0)), k)
    _paint(ch, ct, _F32(H["csf"]), c_v4, T["csf"])
    # suprasellar cistern: five-pointed star
    dy_ss = cy + 13.0
    ang = np.arctan2(dy_ss, cx)
    r_ss = np.sqrt(cx * cx + dy_ss * dy_ss)
    star = _F32(9.5 + 2.0 * A.atrophy) * (1.0 + 0.22 * np.cos(5.0 * ang + np.pi / 2))
    a_ss = _soft(star - r_ss, k) * _ramp((cz + 27.0) / 2.0) * _ramp((-15.0 - cz) / 2.0)
    a_quad = _soft(_ellipsoid_d(cx, cy, cz, (0.0, 17.0, -7.0), (6.0, 5.0, 5.0)), k)
    a_mag = _soft(_ellipsoid_d(cx, cy, cz, (0.0, 50.0, -52.0), (9.0, 6.0, 7.0)), k) * _soft(cav[cen] - 1.0, k)
    c_cist = np.maximum(np.maximum(a_ss, a_quad), np.maximum(a_mag, c_ring))
    _paint(ch, ct, _F32(H["csf"]), np.maximum(np.maximum(a_ss, a_quad), a_mag), T["csf"])
    # calcifications
    if A.pineal is not None:
        r, v = A.pineal
        _paint(ch, ct, _F32(v), _soft(_ellipsoid_d(cxs, cy, cz, (0.0, 19.0, 1.0), (r, r, r)), k), T["calcification"])
    if A.choroid is not None:
        r, v = A.choroid
        for s in (-1.0, 1.0):
            c = (s * 20.0 * (0.8 + 0.2 * vs), 29.0, 11.0)
            _paint(ch, ct, _F32(v), _soft(_ellipsoid_d(cxs, cy, cz, c, (r, r * 1.3, r)), k), T["calcification"])
    hu[cen] = ch
    if tis is not None:
        tis[cen] = ct

    def full(v):
        out = np.zeros(x.shape, dtype=_F32)
        out[cen] = v
        return out

    a_vl, a_vr, a_v3, a_v4, a_vent, a_cist = (full(v) for v in (c_vl, c_vr, c_v3, c_v4, c_vent, c_cist))
    a_sub = np.maximum(a_sub, a_cist)

    # --- hemorrhage, each evaluated on the voxels it can reach
    parts = {"left": a_vl, "right": a_vr, "third": a_v3, "fourth": a_v4}
    order = {"subarachnoid": 0, "intraventricular": 1, "intraparenchymal": 2, "subdural": 3, "epidural": 4}
    res: list[tuple[Any, Any]] = [(None, None)] * len(lesions)

    def box(c, r):
        return (np.abs(x - _F32(c[0])) < r[0]) & (np.abs(y - _F32(c[1])) < r[1]) & (np.abs(z - _F32(c[2])) < r[2])

    for li in sorted(range(len(lesions)), key=lambda i: order[lesions[i].kind]):
        les = lesions[li]
        p = les.p
        rim = None
        if les.kind in ("epidural", "subdural") and not p.get("parafalcine", False):
            q0, e1, e2 = p["q0"], p["e1"], p["e2"]
            dot = qx * _F32(q0[0]) + qy * _F32(q0[1]) + qz * _F32(q0[2])
            cos_max = math.cos(min(math.pi, max(p["r1"], p["r2"]) / 75.0 + 0.1))
            idx = np.nonzero((dot > cos_max) & (cav < p["t"] + 1.5))[0]
            sx, sy, sz, sd = qx[idx], qy[idx], qz[idx], dot[idx]
            # angular coordinates about the lesion centre (arc length ~ 75 mm x angle)
            s1 = np.arctan2(sx * _F32(e1[0]) + sy * _F32(e1[1]) + sz * _F32(e1[2]), sd) * _F32(75.0 / p["r1"])
            s2 = np.arctan2(sx * _F32(e2[0]) + sy * _F32(e2[1]) + sz * _F32(e2[2]), sd) * _F32(75.0 / p["r2"])
            rr2 = np.maximum(1.0 - (s1 * s1 + s2 * s2), 0.0)
            t = _F32(p["t"]) * rr2 ** _F32(p["power"])
            ci = cav[idx]
            a = _soft(np.minimum(t - ci, ci), k) * (t > 0)
            if les.kind == "subdural":
                # stays in its hemisphere (does not cross the falx) and above the tentorium
                a = a * supra[idx] * _soft(_F32(np.sign(q0[0])) * xs[idx] - 0.6, k)
        elif les.kind == "subdural":  # parafalcine
            side = p["side"]
            idx = np.nonzero((np.abs(xs) < p["t"] + 1.5) & (np.abs(y - _F32(p["y0"])) < p["ly"] + 4.0)
                             & (np.abs(z - _F32(p["z0"])) < p["lz"] + 3.0))[0]
            sxs = xs[idx]
            d_pf = np.minimum(side * sxs - 0.4, _F32(p["t"]) - side * sxs)
            reg = _ramp((p["ly"] - np.abs(y[idx] - p["y0"])) / 6.0) * _ramp((p["lz"] - np.abs(z[idx] - p["z0"])) / 4.0)
            a = _soft(d_pf, k) * reg * _soft(cav[idx] - 0.5, k) * (1.0 - cc_region[idx]) * supra[idx]
        elif les.kind == "subarachnoid":
            balls = []
            if "cist_c" in p:
                balls.append((p["cist_c"], p["cist_r"], 8.0))
            if "conv_c" in p:
                balls.append((p["conv_c"], p["conv_r"], 4.0))
            m = np.zeros(x.shape, dtype=bool)
            for c, r, w in balls:
                m |= box(c, (r + w,) * 3)
            idx = np.nonzero(m)[0]
            sx, sy, sz = x[idx], y[idx], z[idx]
            reg = np.zeros(idx.shape, dtype=_F32)
            for c, r, w in balls:
                dist = np.sqrt((sx - _F32(c[0])) ** 2 + (sy - _F32(c[1])) ** 2 + (sz - _F32(c[2])) ** 2)
                reg = np.maximum(reg, _ramp((r - dist) / w))
            csf_sah = np.maximum(np.maximum(a_sulc_sah[idx], a_sas[idx] * 0.5),
                                 np.maximum(np.maximum(a_ih[idx], a_syl[idx]) * supra[idx], a_cist[idx]))
            a = csf_sah * reg * _F32(p["fill"]) * _soft(cav[idx] - 0.3, k)
        elif les.kind == "intraventricular":
            idx = cen
            if p["pattern"] == "layering":
                a = np.zeros(idx.shape, dtype=_F32)
                g = gravity
                proj = cx * _F32(g[0]) + cy * _F32(g[1]) + cz * _F32(g[2])
                for s in p["sides"]:
                    c0, rad, _ = _VENT_PARTS["occipital"]
                    tip = np.array([s * c0[0] * (0.8 + 0.2 * vs), c0[1], c0[2]])
                    # blood settles in the most dependent part of the occipital horn
                    level = float(tip @ g) + rad[1] * 0.95 - p["depth"]
                    part = c_vl if s > 0 else c_vr
                    a = np.maximum(a, part * _soft(proj - _F32(level), k))
            else:
                a = np.zeros(idx.shape, dtype=_F32)
                for name in p["parts"]:
                    a = np.maximum(a, parts[name][idx])
                a = a * _F32(p["fill"])
        else:  # intraparenchymal
            c, rad = p["c"], p["radii"]
            reach = float(max(rad)) * 1.5 + p["rim"] + 2.0
            idx = np.nonzero(box(c, (reach, reach, reach)))[0]
            sx, sy, sz = x[idx], y[idx], z[idx]
            dx, dy, dz = (sx - _F32(c[0])) / _F32(rad[0]), (sy - _F32(c[1])) / _F32(rad[1]), (sz - _F32(c[2])) / _F32(rad[2])
            rho = np.sqrt(dx * dx + dy * dy + dz * dz) + _F32(1e-6)
            v = p["irr_v"]
            u = (dx * _F32(v[0]) + dy * _F32(v[1]) + dz * _F32(v[2])) / rho
            irr = 1.0 + _F32(p["irr"][0]) * u + _F32(p["irr"][1]) * (u * u - 0.33) + _F32(p["irr"][2]) * dx / rho * dz / rho
            amp, nl, ph0 = p["lob"]
            irr = irr + _F32(amp) * np.sin(_F32(nl) * np.arctan2(dy, dx) + _F32(ph0)) * np.sqrt(np.maximum(1.0 - (dz / rho) ** 2, 0.0))
            rmin = _F32(min(rad))
            ci = cav[idx]
            paren = (1.0 - np.maximum(a_sub[idx], a_vent[idx])) * _soft(ci - 0.5, k)
            rim = _soft((irr - rho) * rmin + _F32(p["rim"]), k) * paren
            a = _soft((irr - rho) * rmin, k) * _soft(ci - 1.0, k)
        a = a.astype(_F32, copy=False)
        h = hu[idx]
        t_ = tis[idx] if tis is not None else None
        if rim is not None:
            _paint(h, t_, _F32(p["rim_hu"]), rim, T["oedema"])
        _paint(h, t_, _F32(les.hu), a, T["blood"])
        hu[idx] = h
        if tis is not None:
            tis[idx] = t_
        nz = np.nonzero(a > 0.02)[0]
        res[li] = (idx[nz], a[nz])
    return hu, tis, res


# ---------------------------------------------------------------------------
# acquisition geometry
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# DICOM encoding
# ---------------------------------------------------------------------------


def _fmt(v: float, nd: int = 6) -> str:
    s = f"{v:.{nd}f}"
    if float(s) == 0.0:
        s = f"{0.0:.{nd}f}"
    return s


def _hex(*parts: Any, n: int) -> str:
    h = hashlib.sha256(":".join(str(p) for p in ("ichnode-phantom",) + parts).encode()).hexdigest()
    return h[:n]


def _uid(*parts: Any) -> str:
    return generate_uid(prefix=_UID_PREFIX, entropy_srcs=["ichnode-phantom"] + [str(p) for p in parts])


def rsna_fix_intercept(ds: pydicom.Dataset) -> np.ndarray:
    """HU of a slice, applying the published fix for RSNA's "bad intercept" files.

    Files with BitsStored 12, PixelRepresentation 0 and a RescaleIntercept
    above -100 hold wrapped data: ``px += 1000; px[px >= 4096] -= 4096``,
    then HU = px - 1000. Other files: HU = px * slope + intercept.
    """
    px = ds.pixel_array.astype(np.int32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    icpt = float(getattr(ds, "RescaleIntercept", 0) or 0)
    if int(ds.BitsStored) == 12 and int(ds.PixelRepresentation) == 0 and icpt > -100:
        px = px + 1000
        px[px >= 4096] -= 4096
        return (px - 1000).astype(np.float32)
    return (px * slope + icpt).astype(np.float32)


def _encode(vol: np.ndarray, enc: str, pad_circle: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rounded HU volume -> (stored pixel values, HU a correct reader gets)."""
    h = np.rint(vol).astype(np.int32)
    n, rows, cols = h.shape
    circle = None
    if pad_circle and enc in ("s16", "s16_1024"):
        yy, xx = np.mgrid[0:rows, 0:cols]
        circle = ((yy - (rows - 1) / 2) ** 2 + (xx - (cols - 1) / 2) ** 2) > (min(rows, cols) / 2) ** 2
    if enc == "u12":
        h = np.clip(h, -1024, 3071)
        return (h + 1024).astype(np.uint16), h.astype(np.int16)
    if enc == "rsna_bad_intercept":
        h = np.clip(h, -1000, 3095)
        return np.mod(h, 4096).astype(np.uint16), h.astype(np.int16)
    if enc == "s16":
        h = np.clip(h, -1024, 3071)
        if circle is not None:
            h[:, circle] = -2000
        return h.astype(np.int16), h.astype(np.int16)
    if enc == "s16_1024":
        h = np.clip(h, -1024, 3071)
        stored = h - (-1024)
        if circle is not None:
            stored[:, circle] = -2000
            h[:, circle] = -2000 - 1024
        return stored.astype(np.int16), h.astype(np.int16)
    raise AssertionError(enc)


_FIRST = ["ALEX", "SAM", "JO", "KIM", "LEE", "ROBIN", "DREW", "KAI", "NOOR", "ELI", "RUTH", "OMAR", "IDA", "LEO"]
_LAST = ["PHANTOM", "TESTHEAD", "SYNTH", "MODEL", "DUMMY", "VOXEL", "SAMPLE"]


def _file_meta(sop: str) -> FileMetaDataset:
    fm = FileMetaDataset()
    fm.FileMetaInformationVersion = b"\x00\x01"
    fm.MediaStorageSOPClassUID = CTImageStorage
    fm.MediaStorageSOPInstanceUID = sop
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    fm.ImplementationVersionName = "ICHNODE_PHANTOM"
    return fm


def _build_datasets(seed: int, G: _Geometry, A: _Anatomy, stored: np.ndarray, enc: str, rng: np.random.Generator,
                    rsna: bool, patient_id: str | None, study_uid: str | None, anat_seed: int,
                    order: np.ndarray) -> list[pydicom.Dataset]:
    n = stored.shape[0]
    unsigned = enc in ("u12", "rsna_bad_intercept")
    intercept = {"u12": "-1024", "rsna_bad_intercept": str(int(rng.choice([0, 1]))), "s16": "0", "s16_1024": "-1024"}[enc]
    bits_stored = 12 if unsigned else 16
    if rsna:
        pid = patient_id or "ID_" + _hex("patient", anat_seed, n=8)
        study = study_uid or "ID_" + _hex("study", seed, n=10)
        series = "ID_" + _hex("series", seed, n=10)
        sops = ["ID_" + _hex("sop", seed, i, n=9) for i in range(n)]
        wc_choice = rng.random()
        if wc_choice < 0.45:
            v = int(rng.choice([30, 35, 36, 40]))
            w = int(rng.choice([80, 80, 100]))
            wc, ww = [f"{v:05d}", f"{v:05d}"], [f"{w:05d}", f"{w:05d}"]
        elif wc_choice < 0.75:
            wc, ww = ["40", "600"], ["80", "2800"]
        else:
            wc, ww = str(int(rng.choice([30, 35, 40]))), str(int(rng.choice([80, 100])))
    else:
        pid = patient_id or "PH" + str(int(_hex("patient", anat_seed, n=12), 16) % 10**8).zfill(8)
        study = study_uid or _uid("study", seed)
        series = _uid("series", seed)
        sops = [_uid("sop", seed, i) for i in range(n)]
        wc_choice = rng.random()
        if wc_choice < 0.5:
            wc, ww = "40", "80"
        elif wc_choice < 0.8:
            wc, ww = ["40", "700"], ["80", "3200"]
        else:
            wc, ww = ["35", "40"], ["80", "120"]
    iop = [_fmt(v) for v in np.concatenate([G.row, G.col])]
    ps = _fmt(G.ps)
    base_pos = []
    for kk in range(n):
        # slice centre offset: head centre + s*normal, then the image corner
        c = G.centre + G.s[kk] * G.normal
        c = c - G.off[0] * G.row - G.off[1] * G.col
        corner = c - (G.cols - 1) / 2.0 * G.ps * G.row - (G.rows - 1) / 2.0 * G.ps * G.col
        base_pos.append(corner)
    # acquisition particulars
    day0 = _dt.date(2016, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 3000)))
    t0 = _dt.datetime.combine(day0, _dt.time(0, 0)) + _dt.timedelta(seconds=int(rng.integers(0, 86400)))
    birth = _dt.date(int(day0.year - A.age), 1, 1) + _dt.timedelta(days=A.birth_offset_days)
    age_y = max(0, (day0 - birth).days // 365)
    kvp = str(int(rng.choice([100, 120, 120, 140])))
    kernel = str(rng.choice(["H30s", "STANDARD", "FC21", "UB", "J40s"]))
    series_no = int(rng.integers(2, 7))
    accession = str(int(_hex("acc", seed, n=12), 16) % 10**10).zfill(10)
    rng_name = np.random.default_rng([anat_seed, 6])  # one name per patient
    pname = (f"{_LAST[int(rng_name.integers(0, len(_LAST)))]}^"
             f"{_FIRST[int(rng_name.integers(0, len(_FIRST)))]}{int(rng_name.integers(1, 99))}")
    frame_uid = _uid("for", seed)
    mas = int(rng.integers(200, 380))
    thick_txt = f"{G.thickness:.3g}"
    out: list[pydicom.Dataset] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for inst, kk in enumerate(order, start=1):
            sop = sops[inst - 1]
            ds = FileDataset("", {}, file_meta=_file_meta(sop), preamble=b"\0" * 128)
            pos = [_fmt(v) for v in base_pos[kk]]
            if rsna:
                ds.SOPInstanceUID = sop
                ds.Modality = "CT"
                ds.PatientID = pid
                ds.StudyInstanceUID = study
                ds.SeriesInstanceUID = series
                ds.StudyID = ""
                ds.ImagePositionPatient = pos
                ds.ImageOrientationPatient = iop
            else:
                ctime = (t0 + _dt.timedelta(seconds=30 + 0.5 * inst)).strftime("%H%M%S.%f")[:13]
                ds.SpecificCharacterSet = "ISO_IR 100"
                ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
                ds.SOPClassUID = CTImageStorage
                ds.SOPInstanceUID = sop
                ds.StudyDate = day0.strftime("%Y%m%d")
                ds.SeriesDate = ds.StudyDate
                ds.AcquisitionDate = ds.StudyDate
                ds.ContentDate = ds.StudyDate
                ds.StudyTime = t0.strftime("%H%M%S")
                ds.SeriesTime = (t0 + _dt.timedelta(seconds=20)).strftime("%H%M%S")
                ds.AcquisitionTime = (t0 + _dt.timedelta(seconds=25)).strftime("%H%M%S")
                ds.ContentTime = ctime
                ds.AccessionNumber = accession
                ds.Modality = "CT"
                ds.Manufacturer = MANUFACTURER
                ds.InstitutionName = "ICHNODE TEST SITE"
                ds.ReferringPhysicianName = ""
                ds.StationName = "PHANTOMCT1"
                ds.StudyDescription = "CT HEAD WO CONTRAST"
                ds.SeriesDescription = f"AXIAL {thick_txt}mm"
                ds.ManufacturerModelName = "Phantom CT"
                ds.PatientName = pname
                ds.PatientID = pid
                ds.PatientBirthDate = birth.strftime("%Y%m%d")
                ds.PatientSex = A.sex
                ds.PatientAge = f"{min(age_y, 999):03d}Y"
                ds.BodyPartExamined = "HEAD"
                ds.SliceThickness = _fmt(G.thickness, 3)
                ds.KVP = kvp
                ds.DataCollectionDiameter = "500.0"
                ds.ReconstructionDiameter = _fmt(G.ps * G.cols, 1)
                ds.GantryDetectorTilt = _fmt(math.degrees(math.atan2(-G.col[2], G.col[1])), 1)
                ds.TableHeight = "150.0"
                ds.RotationDirection = "CW"
                ds.ExposureTime = "1000"
                ds.XRayTubeCurrent = str(mas)
                ds.Exposure = str(mas)
                ds.ConvolutionKernel = kernel
                ds.PatientPosition = "HFS"
                ds.StudyInstanceUID = study
                ds.SeriesInstanceUID = series
                ds.StudyID = str(int(_hex("sid", seed, n=6), 16) % 100000)
                ds.SeriesNumber = series_no
                ds.AcquisitionNumber = 1
                ds.InstanceNumber = inst
                ds.ImagePositionPatient = pos
                ds.ImageOrientationPatient = iop
                ds.FrameOfReferenceUID = frame_uid
                ds.PositionReferenceIndicator = ""
                ds.SliceLocation = _fmt(float(base_pos[kk] @ G.normal), 3)
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = G.rows
            ds.Columns = G.cols
            ds.PixelSpacing = [ps, ps]
            ds.BitsAllocated = 16
            ds.BitsStored = bits_stored
            ds.HighBit = bits_stored - 1
            ds.PixelRepresentation = 0 if unsigned else 1
            ds.WindowCenter = wc
            ds.WindowWidth = ww
            if not rsna and isinstance(wc, list):
                ds.WindowCenterWidthExplanation = ["BRAIN", "BONE"] if wc[1] == "700" else ["BRAIN", "STROKE"]
            ds.RescaleIntercept = intercept
            ds.RescaleSlope = "1"
            if not rsna:
                ds.RescaleType = "HU"
            px = stored[kk]
            ds.PixelData = px.astype("<u2" if unsigned else "<i2").tobytes()
            ds["PixelData"].VR = "OW"
            out.append(ds)
    return out


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def _parse_request(hemorrhage, rng: np.random.Generator, positive_fraction: float = 0.5) -> list[tuple[str, str]]:
    if isinstance(hemorrhage, str) and hemorrhage == "random":
        if rng.random() >= positive_fraction:
            return []
        return _random_subtypes(rng)
    if hemorrhage is None:
        return []
    if isinstance(hemorrhage, str):
        raise TypeError(f"hemorrhage must be 'random', None or a sequence of subtype names, got {hemorrhage!r}")
    out = []
    for item in hemorrhage:
        kind, _, size = str(item).partition(":")
        if kind not in SUBTYPES:
            raise ValueError(f"unknown hemorrhage subtype {item!r}; expected one of {SUBTYPES} (optionally ':subtle', ':medium' or ':large')")
        if size and size not in _SIZES:
            raise ValueError(f"unknown lesion size in {item!r}; expected one of {_SIZES}")
        out.append((kind, size))
    return out


def _random_subtypes(rng: np.random.Generator) -> list[tuple[str, str]]:
    while True:
        chosen = [s for s in SUBTYPES if rng.random() < 0.28]
        if chosen:
            break
    if rng.random() < 0.15:
        chosen.append(chosen[int(rng.integers(0, len(chosen)))])
    return [(s, "") for s in chosen]


def make_series(
    seed: int,
    *,
    matrix: int = 512,
    hemorrhage: Sequence[str] | None | str = "random",
    n_slices: int | None = None,
    tilt_degrees: float | None = None,
    rsna_style: bool = False,
    patient_id: str | None = None,
    study_uid: str | None = None,
    anatomy_seed: int | None = None,
    return_volume: bool = True,
    encoding: str | None = None,
) -> PhantomSeries:
    """Make one labelled head-CT series.

    Parameters
    ----------
    seed : int
        Everything (anatomy, pose, acquisition, lesions, noise, UIDs, dates)
        derives from it; the same arguments give identical datasets.
    matrix : int
        Rows and columns (512 or 256; any size from 64 works).
    hemorrhage : "random", None or sequence of str
        ``"random"``: positive with probability 0.5, subtypes drawn so that
        each appears in about a third of positive series. ``None`` or ``[]``:
        a normal head. Otherwise subtype names from :data:`SUBTYPES`, one
        lesion each (repeat a name for two lesions), optionally sized with a
        suffix ``":subtle"``, ``":medium"`` or ``":large"``.
    n_slices : int, optional
        Number of slices covering skull base to vertex (default: from a slice
        thickness of 3 to 7 mm, 20 to 60 slices).
    tilt_degrees : float, optional
        Gantry tilt about the x axis (default random: none or 5 to 25 deg).
    rsna_style : bool
        Headers as in the RSNA 2019 challenge data (``ID_`` identifiers, no
        SOPClassUID in the dataset, no names or dates, ...), including the
        "bad intercept" quirk in about 5 % of series.
    patient_id, study_uid : str, optional
        Put the series into an existing patient / study.
    anatomy_seed : int, optional
        Seed of the head itself (size, shape, age); series of one patient
        share it. Defaults to ``seed``.
    return_volume : bool
        Also return ``hu``, ``masks`` and ``tissue`` (memory: about 3 bytes
        per voxel plus one byte per voxel and subtype).
    encoding : str, optional
        Force the pixel encoding (default: drawn per series), one of
        :data:`ENCODINGS`: ``"u12"`` (BitsStored 12, unsigned, intercept
        -1024), ``"s16"`` (signed, intercept 0), ``"s16_1024"`` (signed,
        intercept -1024) or ``"rsna_bad_intercept"`` (RSNA's wrapped 12-bit
        data with intercept 0 or 1, see :func:`rsna_fix_intercept`).
    """
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(matrix, (int, np.integer)) or not 64 <= matrix <= 2048:
        raise ValueError(f"matrix must be an int between 64 and 2048, got {matrix!r}")
    if encoding is not None and encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS} or None, got {encoding!r}")
    if tilt_degrees is not None and not -30.0 <= float(tilt_degrees) <= 30.0:
        raise ValueError(f"tilt_degrees must be within [-30, 30], got {tilt_degrees!r}")
    seed = int(seed)
    anat_seed = seed if anatomy_seed is None else int(anatomy_seed)
    rng_anat = np.random.default_rng([anat_seed, 1])
    rng_acq = np.random.default_rng([seed, 2])
    rng_les = np.random.default_rng([seed, 3])
    rng_noise = np.random.default_rng([seed, 4])
    rng_hdr = np.random.default_rng([seed, 5])

    A = _sample_anatomy(rng_anat)
    G = _geometry(A, rng_acq, int(matrix), n_slices, tilt_degrees)
    request = _parse_request(hemorrhage, rng_les)
    sizes = []
    for kind, size in request:
        sizes.append(size or str(rng_les.choice(_SIZES, p=[0.25, 0.3, 0.45])))
    lesions = [_sample_lesion(kind, size, rng_les, A, G.spacing) for (kind, _), size in zip(request, sizes)]
    # quantum noise: thinner slices are noisier (sd after the mild smoothing)
    noise_sd = float(np.clip(rng_acq.uniform(5.0, 9.5) * math.sqrt(5.0 / G.thickness), 5.0, 15.0))

    min_vox = max(3, int(math.ceil(_MIN_AREA_MM2 / G.ps**2)))
    for attempt in range(4):
        vol, tissue, counts, lmasks = _render(A, lesions, G, noise_sd, np.random.default_rng([seed, 4]),
                                              return_volume)
        missing = [i for i in range(len(lesions)) if counts[i].max() < min_vox]
        if not missing:
            break
        # a lesion fell between slices or outside the brain: draw it again, larger
        for i in missing:
            lesions[i] = _sample_lesion(lesions[i].kind, "large" if attempt else "medium", rng_les, A, G.spacing)
    labels_bottom_up = np.zeros((len(G.s), len(LABELS)), dtype=np.uint8)
    for i, les in enumerate(lesions):
        labels_bottom_up[:, LABELS.index(les.kind)] |= (counts[i] >= min_vox).astype(np.uint8)
    labels_bottom_up[:, 0] = labels_bottom_up[:, 1:].max(axis=1)

    r = rng_hdr.random()
    if rsna_style:
        enc = "rsna_bad_intercept" if r < 0.05 else ("u12" if r < 0.5 else "s16_1024")
    else:
        enc = "u12" if r < 0.5 else "s16"
    enc = encoding or enc
    pad = bool(rng_hdr.random() < 0.5)
    stored, hu = _encode(vol, enc, pad)
    order = np.arange(len(G.s)) if rng_hdr.random() < 0.7 else np.arange(len(G.s))[::-1]
    datasets = _build_datasets(seed, G, A, stored, enc, rng_hdr, rsna_style, patient_id, study_uid, anat_seed, order)
    masks = None
    if lmasks is not None:
        masks = {}
        for les, m in zip(lesions, lmasks):
            masks[les.kind] = (masks[les.kind] | m) if les.kind in masks else m
        masks = {kk: v[order] for kk, v in masks.items()}
    meta = {
        "seed": seed,
        "anatomy_seed": anat_seed,
        "encoding": enc,
        "pixel_spacing": G.ps,
        "slice_spacing": G.spacing,
        "tilt_degrees": float(math.degrees(math.atan2(-G.col[2], G.col[1]))),
        "noise_sd": noise_sd,
        "min_lesion_voxels": min_vox,
        "age": A.age,
        "atrophy": A.atrophy,
        "lesions": [
            {"kind": les.kind, "size": les.size, "hu": les.hu,
             **{kk: (v.tolist() if isinstance(v, np.ndarray) else v) for kk, v in les.p.items()}}
            for les in lesions
        ],
        "order": "bottom-up" if order[0] == 0 else "top-down",
    }
    return PhantomSeries(
        datasets=datasets,
        labels=labels_bottom_up[order].copy(),
        hu=hu[order] if return_volume else None,
        masks=masks,
        tissue=tissue[order] if tissue is not None else None,
        meta=meta,
    )


def _save(ds: pydicom.Dataset, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)


def _assign_patients(n_series: int, rng: np.random.Generator) -> list[int]:
    """Patient index of each series: about 10 % of patients have two studies."""
    patients: list[int] = []
    pidx = 0
    while len(patients) < n_series:
        n_st = 2 if (rng.random() < 0.1 and len(patients) + 1 < n_series) else 1
        patients.extend([pidx] * n_st)
        pidx += 1
    return patients


def write_dataset(
    out: Path | str,
    n_series: int,
    seed: int,
    layout: str = "series",
    matrix: int = 512,
    positive_fraction: float = 0.5,
    progress: bool = True,
) -> Path:
    """Write ``n_series`` phantom series and their labels under ``out``.

    ``layout="series"``: ``out/<study index>_<series uid tail>/0001.dcm ...``
    and ``out/labels.csv`` (one row per slice, columns ``sop_instance_uid,
    series_instance_uid, study_instance_uid, patient_id`` and :data:`LABELS`).

    ``layout="rsna"``: the RSNA 2019 layout, ``out/stage_2_train.csv``
    (``ID,Label``; rows ``ID_<sop>_<subtype>`` in :data:`RSNA_LABEL_ORDER`,
    images in random order, a few duplicated rows as in the real file) and
    ``out/stage_2_train/ID_<sop>.dcm``.

    About 10 % of patients get a second study. Exactly
    ``round(n_series * positive_fraction)`` series contain hemorrhage.
    Returns ``out``.
    """
    if layout not in ("series", "rsna"):
        raise ValueError(f"layout must be 'series' or 'rsna', got {layout!r}")
    if not isinstance(n_series, (int, np.integer)) or n_series < 1:
        raise ValueError(f"n_series must be a positive int, got {n_series!r}")
    if not 0.0 <= float(positive_fraction) <= 1.0:
        raise ValueError(f"positive_fraction must be within [0, 1], got {positive_fraction!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([int(seed), 100])
    n_pos = int(round(n_series * float(positive_fraction)))
    positive = np.zeros(n_series, dtype=bool)
    positive[rng.permutation(n_series)[:n_pos]] = True
    series_seeds = [int(v) for v in np.random.SeedSequence([int(seed), 101]).generate_state(n_series, dtype=np.uint32)]
    patients = _assign_patients(n_series, rng)
    rsna = layout == "rsna"
    img_dir = out / "stage_2_train" if rsna else out
    img_dir.mkdir(parents=True, exist_ok=True)
    rows_out: list[tuple[str, list[int]]] = []
    series_rows: list[list[str]] = []
    seen: set[str] = set()
    patient_ids: dict[int, str] = {}
    try:
        from tqdm import tqdm
        it = tqdm(range(n_series), desc=f"phantoms ({layout})", unit="series", disable=not progress)
    except ImportError:  # pragma: no cover
        it = range(n_series)
    for si in it:
        hem = _random_subtypes(rng) if positive[si] else []
        pat = patients[si]
        anat_seed = int(np.random.SeedSequence([int(seed), 102, pat]).generate_state(1)[0])
        ph = make_series(
            series_seeds[si], matrix=matrix, hemorrhage=[h for h, _ in hem], rsna_style=rsna,
            patient_id=patient_ids.get(pat), anatomy_seed=anat_seed, return_volume=False,
        )
        patient_ids.setdefault(pat, ph.patient_id)
        if rsna:
            for ds, lab in zip(ph.datasets, ph.labels):
                sop = str(ds.SOPInstanceUID)
                n_try = 0
                while sop in seen:  # 9 hex digits can collide in very large sets
                    n_try += 1
                    sop = "ID_" + _hex("sop-dup", seed, si, sop, n_try, n=9)
                if sop != ds.SOPInstanceUID:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        ds.SOPInstanceUID = sop
                        ds.file_meta.MediaStorageSOPInstanceUID = sop
                seen.add(sop)
                _save(ds, img_dir / f"{sop}.dcm")
                rows_out.append((sop, [int(lab[LABELS.index(n)]) for n in RSNA_LABEL_ORDER]))
        else:
            sdir = img_dir / f"{si:04d}_{ph.series_instance_uid.replace('.', '')[-8:]}"
            sdir.mkdir(parents=True, exist_ok=True)
            for inst, (ds, lab) in enumerate(zip(ph.datasets, ph.labels), start=1):
                _save(ds, sdir / f"{inst:04d}.dcm")
                series_rows.append(
                    [str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), str(ds.PatientID)]
                    + [str(int(v)) for v in lab]
                )
    if rsna:
        order = rng.permutation(len(rows_out))
        n_dup = max(1, len(rows_out) // 400)
        dup = set(int(v) for v in rng.choice(len(rows_out), size=min(n_dup, len(rows_out)), replace=False))
        path = out / "stage_2_train.csv"
        with path.open("w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["ID", "Label"])
            for oi in order:
                sop, labs = rows_out[int(oi)]
                block = [[f"{sop}_{name}", str(v)] for name, v in zip(RSNA_LABEL_ORDER, labs)]
                w.writerows(block)
                if int(oi) in dup:
                    w.writerows(block)
    else:
        path = out / "labels.csv"
        with path.open("w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["sop_instance_uid", "series_instance_uid", "study_instance_uid", "patient_id", *LABELS])
            w.writerows(series_rows)
    return out


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


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
