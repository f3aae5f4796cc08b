"""The five hemorrhage subtypes: which subtypes a series gets, and the sampling of
each lesion's size, site and shape parameters (and its mass effect)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.phantoms.anatomy import _Anatomy
from training.phantoms.constants import SUBTYPES
from training.phantoms.numeric import _unit

_SIZES = ("subtle", "medium", "large")


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
