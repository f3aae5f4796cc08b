"""Whole data sets on disk: :func:`write_dataset` (patients with one or two
studies, positives, file layouts ``series`` and ``rsna``, ``labels.csv`` /
``stage_2_train.csv``)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pydicom

from training.phantoms.constants import LABELS, RSNA_LABEL_ORDER
from training.phantoms.dicom import _hex
from training.phantoms.lesions import _random_subtypes
from training.phantoms.series import make_series


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
