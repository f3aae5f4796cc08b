"""One labelled series: :func:`make_series` (anatomy, acquisition, lesions,
rendering, slice labels, encoding, datasets) and its result type :class:`PhantomSeries`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom

from training.phantoms.anatomy import _sample_anatomy
from training.phantoms.constants import ENCODINGS, LABELS
from training.phantoms.dicom import _build_datasets, _encode
from training.phantoms.geometry import _geometry
from training.phantoms.lesions import _SIZES, _parse_request, _sample_lesion
from training.phantoms.render import _render

# A slice is labelled with a lesion's subtype when a reader could see it there:
# it covers at least _MIN_AREA_MM2 and its blood stands out of the noise by the
# Rose criterion (ideal-observer SNR >= 5), as radiologists label what they see.
_MIN_AREA_MM2 = 3.0
_MIN_SNR = 5.0


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
# public API
# ---------------------------------------------------------------------------


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
        vol, tissue, counts, snr, lmasks = _render(A, lesions, G, noise_sd, np.random.default_rng([seed, 4]),
                                                   return_volume)
        visible = (counts >= min_vox) & (snr >= _MIN_SNR)
        missing = [i for i in range(len(lesions)) if not visible[i].any()]
        if not missing:
            break
        # a lesion fell between slices, outside the brain or under the noise: draw it again, larger
        for i in missing:
            lesions[i] = _sample_lesion(lesions[i].kind, "large" if attempt else "medium", rng_les, A, G.spacing)
    labels_bottom_up = np.zeros((len(G.s), len(LABELS)), dtype=np.uint8)
    for i, les in enumerate(lesions):
        labels_bottom_up[:, LABELS.index(les.kind)] |= visible[i].astype(np.uint8)
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
        "min_lesion_snr": _MIN_SNR,
        "age": A.age,
        "atrophy": A.atrophy,
        "lesions": [
            {"kind": les.kind, "size": les.size, "hu": les.hu,
             "snr": [round(float(v), 2) for v in snr[i][order]],  # per slice, in the datasets' order
             **{kk: (v.tolist() if isinstance(v, np.ndarray) else v) for kk, v in les.p.items()}}
            for i, les in enumerate(lesions)
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
