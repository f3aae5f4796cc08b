"""The renderer: samples the head model and the lesions on the slice planes
(HU with partial volume, tissue codes, lesion masks and per-slice lesion areas),
adds noise and smooths."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from training.phantoms.anatomy import (
    _VENT_PARTS,
    _Anatomy,
    _brainstem,
    _cavity,
    _cells,
    _floor,
    _lateral_ventricle,
    _shift_x,
)
from training.phantoms.constants import TISSUE
from training.phantoms.geometry import _Geometry
from training.phantoms.lesions import _Lesion, _lesion_shift
from training.phantoms.numeric import _F32, _ellipsoid_d, _lerp, _paint, _ramp, _soft

# ---------------------------------------------------------------------------
# renderer
# ---------------------------------------------------------------------------


def _render(A: _Anatomy, lesions: list[_Lesion], G: _Geometry, noise_sd: float,
            rng_noise: np.random.Generator, want_tissue: bool):
    """Returns clean-plus-noise HU (float32), tissue, per lesion and slice the
    area in pixels and the detectability SNR, and the masks.

    The SNR is the ideal observer's, sqrt(sum of squared HU contrast) / sd of
    the white noise, for the blood of one lesion on one slice."""
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
    signal2 = np.zeros((len(lesions), n), dtype=np.float64)
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
        for li, (idx, alpha, contrast) in enumerate(lesion_alpha):
            if idx is None:
                continue
            hit = idx[alpha >= 0.5]
            counts[li, k0:k1] += np.bincount(hit // (ni * nj), minlength=k1 - k0)
            signal2[li, k0:k1] += np.bincount(idx // (ni * nj), weights=contrast.astype(np.float64) ** 2,
                                              minlength=k1 - k0)
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
    return out, tissue, counts, np.sqrt(signal2) / sd_raw, masks


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
    (indices into the flat arrays, blood fraction, HU contrast of the blood)."""
    d_cav, qx, qy, qz = _cavity(A, x, y, z)
    res: list[tuple[Any, Any, Any]] = [(None, None, None)] * len(lesions)
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
        res = [
            (None, None, None) if idx is None else (hsel[csel[idx]], al, dhu * a_cav[idx])
            for idx, al, dhu in les_c
        ]
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
    res: list[tuple[Any, Any, Any]] = [(None, None, None)] * len(lesions)

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
        contrast = a * (_F32(les.hu) - h)  # what the blood changes, against what surrounds it
        _paint(h, t_, _F32(les.hu), a, T["blood"])
        hu[idx] = h
        if tis is not None:
            tis[idx] = t_
        nz = np.nonzero(a > 0.02)[0]
        res[li] = (idx[nz], a[nz], contrast[nz])
    return hu, tis, res
