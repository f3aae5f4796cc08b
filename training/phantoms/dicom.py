"""DICOM encoding: stored pixel values per encoding (including RSNA's "bad
intercept" quirk), UIDs and identifiers, and the CT datasets and their headers
(full CT headers or the RSNA 2019 challenge style)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import warnings
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from training.phantoms.anatomy import _Anatomy
from training.phantoms.geometry import _Geometry

MANUFACTURER = "ICHNODE PHANTOM"
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as generate_uid uses


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
