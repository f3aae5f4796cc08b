"""Tests of the synthetic head-CT phantom generator (training.phantoms)."""

from __future__ import annotations

import csv
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from training import phantoms
from training.phantoms import LABELS, RSNA_LABEL_ORDER, SUBTYPES, TISSUE, make_series, write_dataset

MATRIX = 256

# RSNA-style identifiers ("ID_...") are not valid UIDs on purpose; pydicom warns on access
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


def _read(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RSNA-style "ID_..." UIDs are invalid on purpose
        return pydicom.dcmread(path)


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(iop[:3], iop[3:])


@pytest.fixture(scope="module")
def ich() -> phantoms.PhantomSeries:
    """A series with a large intraparenchymal hemorrhage, tilted gantry."""
    return make_series(11, matrix=MATRIX, hemorrhage=["intraparenchymal:large"], tilt_degrees=18.0)


@pytest.fixture(scope="module")
def epidural() -> phantoms.PhantomSeries:
    return make_series(12, matrix=MATRIX, hemorrhage=["epidural"])


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("series")
    write_dataset(out, 2, seed=5, layout="series", matrix=MATRIX, positive_fraction=0.5, progress=False)
    return out


@pytest.fixture(scope="module")
def rsna_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rsna")
    write_dataset(out, 3, seed=6, layout="rsna", matrix=MATRIX, positive_fraction=1.0, progress=False)
    return out


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(series_dir, tmp_path):
    again = tmp_path / "again"
    write_dataset(again, 2, seed=5, layout="series", matrix=MATRIX, positive_fraction=0.5, progress=False)
    first = sorted(p.relative_to(series_dir) for p in series_dir.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second and len(first) > 20
    for rel in first:
        assert (series_dir / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_different_seed_gives_different_series():
    a = make_series(1, matrix=MATRIX, hemorrhage=[], n_slices=20, return_volume=False)
    b = make_series(2, matrix=MATRIX, hemorrhage=[], n_slices=20, return_volume=False)
    a_again = make_series(1, matrix=MATRIX, hemorrhage=[], n_slices=20, return_volume=False)
    assert [_to_bytes(d) for d in a.datasets] == [_to_bytes(d) for d in a_again.datasets]
    assert a.series_instance_uid != b.series_instance_uid
    assert a.datasets[10].PixelData != b.datasets[10].PixelData


# --- headers -----------------------------------------------------------------------------------


def test_series_layout_headers(series_dir):
    dirs = sorted(p for p in series_dir.iterdir() if p.is_dir())
    assert len(dirs) == 2
    for d in dirs:
        files = sorted(d.glob("*.dcm"))
        assert 20 <= len(files) <= 60
        assert files[0].name == "0001.dcm"
        dss = [_read(f) for f in files]
        assert re.fullmatch(r"\d{4}_\d{8}", d.name) and d.name.endswith(dss[0].SeriesInstanceUID[-8:])
        for i, ds in enumerate(dss, start=1):
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage == ds.SOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.Modality == "CT" and ds.BodyPartExamined == "HEAD"
            assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
            assert ds.Manufacturer == "ICHNODE PHANTOM"
            assert ds.StudyDescription == "CT HEAD WO CONTRAST"
            assert ds.SeriesDescription.startswith("AXIAL ") and ds.SeriesDescription.endswith("mm")
            assert ds.InstanceNumber == i
            assert ds.Rows == ds.Columns == MATRIX
            assert 0.8 <= float(ds.PixelSpacing[0]) == float(ds.PixelSpacing[1]) <= 1.0
            assert 3.0 <= float(ds.SliceThickness) <= 7.0
            assert ds.PatientName and ds.PatientID and ds.StudyDate and ds.StudyTime and ds.AccessionNumber
            assert float(ds.KVP) > 0
            assert ds.BitsAllocated == 16 and float(ds.RescaleSlope) == 1.0
            assert (ds.BitsStored, ds.HighBit, ds.PixelRepresentation, float(ds.RescaleIntercept)) in (
                (12, 11, 0, -1024.0),
                (16, 15, 1, 0.0),
            )
            assert ds.WindowCenter is not None and ds.WindowWidth is not None
            assert ds.pixel_array.shape == (MATRIX, MATRIX)
        assert len({ds.SeriesInstanceUID for ds in dss}) == 1
        assert len({ds.SOPInstanceUID for ds in dss}) == len(dss)
        for uid in (dss[0].StudyInstanceUID, dss[0].SeriesInstanceUID, dss[0].SOPInstanceUID):
            assert re.fullmatch(r"[0-9]+(\.[0-9]+)+", uid) and len(uid) <= 64


def _assert_stack_geometry(dss, spacing=None):
    n = _normal(dss[0])
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in dss])
    for ds in dss:
        assert np.allclose(_normal(ds), n, atol=1e-5)
    steps = np.diff(pos, axis=0)
    along = steps @ n
    # every position lies on the line through the first along the (tilted) normal
    assert np.allclose(steps - along[:, None] * n[None, :], 0.0, atol=1e-3)
    assert np.all(along > 0) or np.all(along < 0)
    assert np.allclose(np.abs(along), np.abs(along[0]), atol=1e-3)
    if spacing is not None:
        assert abs(abs(along[0]) - spacing) < 1e-3


def test_positions_follow_tilted_normal(ich):
    dss = ich.datasets
    iop = np.array([float(v) for v in dss[0].ImageOrientationPatient])
    t = np.radians(18.0)
    assert np.allclose(iop, [1, 0, 0, 0, np.cos(t), -np.sin(t)], atol=1e-5)
    assert abs(float(dss[0].GantryDetectorTilt) - 18.0) < 0.06
    _assert_stack_geometry(dss, spacing=ich.meta["slice_spacing"])
    assert abs(float(dss[0].SliceThickness) - ich.meta["slice_spacing"]) < 1e-2
    # head covered from skull base to vertex: the first and last slices hold little or no brain
    brain = np.isin(ich.tissue, [TISSUE["grey_matter"], TISSUE["white_matter"]]).sum(axis=(1, 2))
    assert brain.max() > 10 * max(brain[0], brain[-1], 1)


def test_untilted_series_and_slice_count():
    ph = make_series(21, matrix=MATRIX, hemorrhage=[], tilt_degrees=0.0, n_slices=24, return_volume=False)
    assert len(ph.datasets) == 24 and ph.labels.shape == (24, 6)
    iop = [float(v) for v in ph.datasets[0].ImageOrientationPatient]
    assert np.allclose(iop, [1, 0, 0, 0, 1, 0], atol=1e-6)
    _assert_stack_geometry(ph.datasets)


# --- pixel values ----------------------------------------------------------------------------


def test_pixel_data_decodes_to_hu(ich):
    for ds, hu in zip(ich.datasets, ich.hu):
        assert np.array_equal(_hu(ds), hu)


@pytest.mark.parametrize("encoding", ["u12", "s16", "s16_1024"])
def test_encodings_decode_to_hu(encoding):
    ph = make_series(31, matrix=64, hemorrhage=[], n_slices=20, encoding=encoding)
    ds = ph.datasets[10]
    assert np.array_equal(_hu(ds), ph.hu[10])
    if encoding == "u12":
        assert (ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleIntercept)) == (12, 0, -1024.0)
    elif encoding == "s16":
        assert (ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleIntercept)) == (16, 1, 0.0)


def test_rsna_bad_intercept_is_recovered_by_the_published_fix():
    ph = make_series(32, matrix=64, hemorrhage=[], n_slices=20, rsna_style=True, encoding="rsna_bad_intercept")
    ds = ph.datasets[10]
    assert ds.BitsStored == 12 and ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) in (0.0, 1.0)
    px = ds.pixel_array.astype(np.int32)
    assert px.max() < 4096
    assert not np.array_equal(_hu(ds), ph.hu[10])  # naive conversion is wrong
    px = px + 1000
    px[px >= 4096] -= 4096
    assert np.array_equal(px - 1000, ph.hu[10])
    assert np.array_equal(phantoms.rsna_fix_intercept(ds), ph.hu[10])
    assert ph.hu[10].min() <= -990  # air is there and comes out as air


def test_tissue_hu_ranges(ich):
    hu, tis = ich.hu.astype(np.float64), ich.tissue
    gm, wm = hu[tis == TISSUE["grey_matter"]], hu[tis == TISSUE["white_matter"]]
    brain = np.concatenate([gm, wm])
    assert 20 <= brain.mean() <= 45
    assert 30 <= np.median(gm) <= 45 and 20 <= np.median(wm) <= 35 and np.median(gm) > np.median(wm) + 3
    assert np.median(hu[tis == TISSUE["bone"]]) > 500
    csf = tis == TISSUE["csf"]
    core = csf[:, 1:-1, 1:-1].copy()  # CSF away from partial volume: ventricles, cisterns
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            core &= csf[:, 1 + di: csf.shape[1] - 1 + di, 1 + dj: csf.shape[2] - 1 + dj]
    assert core.sum() > 50 and np.median(hu[:, 1:-1, 1:-1][core]) < 15
    assert hu[tis == TISSUE["air"]].mean() < -900
    assert ich.hu[:, :3, :3].mean() < -900  # corners of the field of view are air (or padding)


def test_blood_in_lesion_mask(ich):
    mask = ich.masks["intraparenchymal"]
    lab = ich.labels[:, LABELS.index("intraparenchymal")].astype(bool)
    assert lab.any()
    # a slice is labelled where the lesion covers at least min_lesion_voxels and is visible in the noise
    (lesion,) = ich.meta["lesions"]
    snr = np.array(lesion["snr"])
    area = mask.sum(axis=(1, 2))
    assert np.array_equal(lab, (area >= ich.meta["min_lesion_voxels"]) & (snr >= ich.meta["min_lesion_snr"]))
    k = int(np.argmax(area))
    assert lab[k]
    # the SNR is what the image shows: blood against the oedema rim around it, over the white noise
    rim = ich.hu[k][ich.tissue[k] == TISSUE["oedema"]].astype(np.float64)
    contrast = np.median(ich.hu[k][mask[k]]) - np.median(rim)
    measured = contrast * np.sqrt(area[k]) / (ich.meta["noise_sd"] / 0.375)
    assert 0.7 < snr[k] / measured < 1.4
    # a slice that barely touches the lesion is not labelled
    assert (snr[area == 0] < 1).all()
    blood = ich.hu[k][mask[k]].astype(np.float64)
    assert 50 <= np.median(blood) <= 90
    # oedema rim darker than brain around the clot
    oed = ich.hu[ich.tissue == TISSUE["oedema"]].astype(np.float64)
    assert oed.size and np.median(oed) < 25


# --- labels -----------------------------------------------------------------------------------


def test_labels_shape_and_any(ich, epidural):
    for ph in (ich, epidural):
        assert ph.labels.dtype == np.uint8 and ph.labels.shape == (len(ph.datasets), len(LABELS))
        assert np.array_equal(ph.labels[:, 0], ph.labels[:, 1:].max(axis=1))
        assert set(np.unique(ph.labels)) <= {0, 1}


def test_forced_epidural_is_a_contiguous_run(epidural):
    lab = epidural.labels
    epi = lab[:, LABELS.index("epidural")]
    assert epi.sum() >= 1
    on = np.flatnonzero(epi)
    assert np.array_equal(on, np.arange(on[0], on[-1] + 1))  # contiguous in slice (InstanceNumber) order
    others = [LABELS.index(s) for s in SUBTYPES if s != "epidural"]
    assert lab[:, others].sum() == 0
    assert np.array_equal(lab[:, 0], epi)
    # slice order of labels matches the datasets: positions of the run are contiguous in space too
    n = _normal(epidural.datasets[0])
    s = np.array([np.dot([float(v) for v in ds.ImagePositionPatient], n) for ds in epidural.datasets])
    assert np.all(np.diff(s) > 0) or np.all(np.diff(s) < 0)
    # blood sits against the inner table: bone within a few mm of the lesion
    k = on[len(on) // 2]
    m = epidural.masks["epidural"][k]
    assert m.any()
    ii, jj = np.nonzero(m)
    win = epidural.tissue[k][max(ii.min() - 8, 0): ii.max() + 9, max(jj.min() - 8, 0): jj.max() + 9]
    assert (win == TISSUE["bone"]).any()


def test_normal_head_has_no_labels():
    ph = make_series(41, matrix=64, hemorrhage=[], return_volume=False)
    assert ph.labels.sum() == 0
    ph = make_series(41, matrix=64, hemorrhage=None, return_volume=False)
    assert ph.labels.sum() == 0


@pytest.mark.parametrize("kind", ["subdural", "subarachnoid", "intraventricular"])
def test_each_subtype_is_labelled(kind):
    ph = make_series(50 + SUBTYPES.index(kind), matrix=MATRIX, hemorrhage=[kind + ":large"])
    col = ph.labels[:, LABELS.index(kind)]
    assert col.sum() >= 1
    assert ph.labels[:, [LABELS.index(s) for s in SUBTYPES if s != kind]].sum() == 0
    k = int(np.argmax(ph.masks[kind].sum(axis=(1, 2))))
    assert 50 <= np.median(ph.hu[k][ph.masks[kind][k]]) <= 90


def test_random_subtypes_are_balanced():
    rng = np.random.default_rng(0)
    draws = [{s for s, _ in phantoms._random_subtypes(rng)} for _ in range(3000)]
    assert all(draws)
    for s in SUBTYPES:
        frac = np.mean([s in d for d in draws])
        assert 0.25 <= frac <= 0.42, (s, frac)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="subtype"):
        make_series(1, matrix=64, hemorrhage=["bleed"])
    with pytest.raises(ValueError, match="matrix"):
        make_series(1, matrix=10)
    with pytest.raises(ValueError, match="layout"):
        write_dataset(Path("unused"), 1, seed=1, layout="nifti")


# --- layouts ------------------------------------------------------------------------------------


def test_series_layout_labels_csv(series_dir):
    with (series_dir / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0].keys()) == [
        "sop_instance_uid", "series_instance_uid", "study_instance_uid", "patient_id", *LABELS,
    ]
    files = {(_read(p).SOPInstanceUID): p for p in series_dir.rglob("*.dcm")}
    assert len(rows) == len(files) == len({r["sop_instance_uid"] for r in rows})
    for r in rows:
        ds = _read(files[r["sop_instance_uid"]])
        assert (r["series_instance_uid"], r["study_instance_uid"], r["patient_id"]) == (
            ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.PatientID,
        )
        assert int(r["any"]) == max(int(r[s]) for s in SUBTYPES)
    # positive_fraction=0.5 of 2 series: exactly one series has hemorrhage
    pos = {r["series_instance_uid"] for r in rows if r["any"] == "1"}
    assert len(pos) == 1


def test_rsna_layout(rsna_dir):
    assert sorted(p.name for p in rsna_dir.iterdir()) == ["stage_2_train", "stage_2_train.csv"]
    text = (rsna_dir / "stage_2_train.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == "ID,Label"
    rows = [tuple(line.split(",")) for line in lines[1:]]
    assert len(rows) != len(set(rows))  # a few exact duplicates, as in the real file
    files = sorted((rsna_dir / "stage_2_train").glob("*.dcm"))
    assert len(set(rows)) == 6 * len(files)
    by_image: dict[str, dict[str, int]] = {}
    order: dict[str, list[str]] = {}
    for rid, label in rows:
        m = re.fullmatch(r"(ID_[0-9a-f]{9})_(\w+)", rid)
        assert m and label in ("0", "1"), rid
        by_image.setdefault(m.group(1), {})[m.group(2)] = int(label)
        order.setdefault(m.group(1), []).append(m.group(2))
    for img, names in order.items():
        assert names[:6] == list(RSNA_LABEL_ORDER)
        assert by_image[img]["any"] == max(by_image[img][s] for s in SUBTYPES)
    assert {f.stem for f in files} == set(by_image)
    assert any(v["any"] for v in by_image.values())
    studies = set()
    for f in files:
        ds = _read(f)
        assert f.stem == ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert re.fullmatch(r"ID_[0-9a-f]{9}", ds.SOPInstanceUID)
        assert re.fullmatch(r"ID_[0-9a-f]{10}", ds.StudyInstanceUID)
        assert re.fullmatch(r"ID_[0-9a-f]{10}", ds.SeriesInstanceUID)
        assert re.fullmatch(r"ID_[0-9a-f]{8}", ds.PatientID)
        assert "SOPClassUID" not in ds and ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.StudyID == ""
        for absent in ("PatientName", "StudyDate", "StudyTime", "PatientBirthDate", "InstanceNumber"):
            assert absent not in ds
        assert ds.Modality == "CT" and ds.pixel_array.shape == (MATRIX, MATRIX)
        assert "WindowCenter" in ds and "WindowWidth" in ds
        studies.add(ds.StudyInstanceUID)
    assert len(studies) == 3


def test_rsna_style_series_has_multi_valued_windows_often():
    multi = 0
    for seed in range(60, 66):
        ph = make_series(seed, matrix=64, hemorrhage=[], n_slices=20, rsna_style=True, return_volume=False)
        ds = ph.datasets[0]
        multi += isinstance(ds.WindowCenter, pydicom.multival.MultiValue)
        _assert_stack_geometry(ph.datasets)
    assert multi >= 2


def test_patients_can_have_two_studies():
    anat = 777
    a = make_series(71, matrix=64, hemorrhage=[], n_slices=20, rsna_style=True, anatomy_seed=anat, return_volume=False)
    b = make_series(72, matrix=64, hemorrhage=[], n_slices=20, rsna_style=True, anatomy_seed=anat,
                    patient_id=a.patient_id, return_volume=False)
    assert a.patient_id == b.patient_id and a.study_instance_uid != b.study_instance_uid
    rng = np.random.default_rng(1)
    groups = phantoms._assign_patients(2000, rng)
    counts = np.bincount(groups)
    assert set(np.unique(counts)) <= {1, 2}
    assert 0.05 <= np.mean(counts == 2) <= 0.15


def test_cli(tmp_path):
    out = tmp_path / "cli"
    assert phantoms.main(["--out", str(out), "--series", "1", "--seed", "3", "--matrix", "256", "--no-progress"]) == 0
    assert (out / "labels.csv").exists() and len(list(out.rglob("*.dcm"))) >= 20
