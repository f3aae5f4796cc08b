"""training/: metrics, RSNA reader, split, pipeline, and a tiny end-to-end run.

The end-to-end run generates a handful of phantom series in the RSNA layout
(one unreadable file, one slice whose pixels cannot be decoded, duplicated
CSV rows), trains a tiny model for a few steps, evaluates, exports, and
reloads the export with ``ichnode.model.load_model``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest


# Keras' TensorFlow backend calls np.array(variable) on save; numpy 2 warns about it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

from click.testing import CliRunner

from ichnode import imaging
from ichnode.config import LABELS
from ichnode.model import card_path_for, load_model
from training import metrics as M
from training import rsna

TINY_CONFIG = """
seed: 3
data: {split: {train: 0.6, val: 0.4}, workers: 2}
input: {size: [32, 32], context_slices: 1}
architecture: {filters: [4, 8], embedding_dim: 8, sequence: gru, sequence_units: 4}
slice_stage: {epochs: 2, steps_per_epoch: 3, batch_size: 8}
sequence_stage: {epochs: 2, batch_size: 2, crop: 8}
export: {name: tiny, trained_on: "6 synthetic phantom series"}
"""


# -- metrics --------------------------------------------------------------------------


def _random_labels(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 6)) < 0.3).astype(float)
    y[:, 0] = y[:, 1:].max(axis=1)
    p = np.clip(0.6 * y + 0.4 * rng.random((n, 6)), 0, 1)
    p[0, 1] = 0.0  # exercise the clipping
    return y, p


def test_weighted_log_loss_against_direct_numpy():
    y, p = _random_labels(200)
    weights = [2, 1, 1, 1, 1, 1]
    total = 0.0
    for i in range(len(y)):
        row = 0.0
        for j in range(6):
            q = min(max(p[i, j], 1e-15), 1 - 1e-15)
            row += weights[j] * -(y[i, j] * math.log(q) + (1 - y[i, j]) * math.log(1 - q))
        total += row / sum(weights)
    assert M.weighted_log_loss(y, p) == pytest.approx(total / len(y), rel=1e-12)
    # perfect and uninformative predictions
    assert M.weighted_log_loss(y, y) == pytest.approx(0.0, abs=1e-12)
    assert M.weighted_log_loss(y, np.full_like(p, 0.5)) == pytest.approx(math.log(2))


def test_keras_training_loss_is_the_metric():
    from training.models import WeightedBinaryCrossentropy

    y, p = _random_labels(64, seed=1)
    p = np.clip(p, 0.01, 0.99)
    loss = float(WeightedBinaryCrossentropy()(y.astype("float32"), p.astype("float32")))
    assert loss == pytest.approx(M.weighted_log_loss(y, p), rel=1e-4)
    config = WeightedBinaryCrossentropy().get_config()
    assert WeightedBinaryCrossentropy.from_config(config).label_weights == (2, 1, 1, 1, 1, 1)


def test_auc_sensitivity_specificity_and_series_level():
    from sklearn.metrics import roc_auc_score

    y, p = _random_labels(300, seed=2)
    aucs = M.roc_auc(y, p)
    for j, label in enumerate(LABELS):
        assert aucs[label] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
    y_const = y.copy()
    y_const[:, 1] = 0
    assert math.isnan(M.roc_auc(y_const, p)["epidural"])

    thresholds = {label: 0.5 for label in LABELS}
    ss = M.sensitivity_specificity(y, p, thresholds)["any"]
    truth, called = y[:, 0] > 0.5, p[:, 0] >= 0.5
    assert ss["sensitivity"] == pytest.approx((truth & called).sum() / truth.sum())
    assert ss["specificity"] == pytest.approx((~truth & ~called).sum() / (~truth).sum())

    ids = ["a", "a", "b", "b", "b"]
    yt = np.zeros((5, 6))
    yt[1, [0, 5]] = 1
    yp = np.tile(np.linspace(0.1, 0.5, 5)[:, None], (1, 6))
    series, s_true, s_prob = M.series_level(ids, yt, yp)
    assert series == ["a", "b"]
    np.testing.assert_array_equal(s_true[:, 0], [1, 0])
    np.testing.assert_allclose(s_prob[:, 0], [0.2, 0.5])


def test_threshold_choice():
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.4).astype(float)
    s = np.clip(0.3 * y + 0.7 * rng.random(500), 0, 1)
    t = M.threshold_at_sensitivity(y, s, 0.95)
    positive = y > 0.5
    assert ((s >= t) & positive).sum() / positive.sum() >= 0.95
    # the highest operating point: flagging one positive fewer misses the target
    lowest_caught = s[positive & (s >= t)].min()
    assert ((s > lowest_caught) & positive).sum() / positive.sum() < 0.95
    assert 0 <= M.threshold_youden(y, s) <= 1
    ys = np.stack([y] * 6, axis=1)
    chosen = M.choose_thresholds(ys, np.stack([s] * 6, axis=1))
    assert list(chosen) == list(LABELS) and chosen["any"] == pytest.approx(t)


def test_youden_threshold_is_the_argmax_of_sensitivity_plus_specificity():
    rng = np.random.default_rng(7)
    for n, signal in ((40, 0.2), (300, 0.4), (1000, 0.1)):
        y = (rng.random(n) < 0.3).astype(float)
        s = np.round(np.clip(signal * y + rng.random(n), 0, 1), 2)  # rounded: tied scores too

        def youden(t):
            called = s >= t
            return called[y > 0.5].mean() + (~called)[y < 0.5].mean() - 1

        best = max(youden(t) for t in np.unique(s))  # every operating point a threshold can give
        t = M.threshold_youden(y, s)
        assert 0 <= t <= 1
        assert youden(t) == pytest.approx(best, abs=1e-12)
        assert best > 0.05  # the scores carry signal: 0.5 or any fixed value would not do


def test_thresholds_lie_halfway_between_two_validation_scores_not_on_one():
    # The node's scores of the validation series differ from those the thresholds
    # were chosen on in the last bits (float16 cache, batch size, backend): a
    # threshold equal to a series' score would put that series on either side.
    rng = np.random.default_rng(11)
    y = (rng.random(300) < 0.4).astype(float)
    s = np.clip(0.3 * y + 0.7 * rng.random(300), 0, 1)
    for t in (M.threshold_at_sensitivity(y, s, 0.95), M.threshold_youden(y, s)):
        flagged = s >= t
        assert flagged.any() and not flagged.all()
        assert t == pytest.approx((s[flagged].min() + s[~flagged].max()) / 2, rel=1e-12)
        for last_bits in (-1e-9, 1e-9):
            np.testing.assert_array_equal(s + last_bits >= t, flagged)
    # Nothing below the chosen score: halfway down to 0, still flagging every series.
    assert M.threshold_at_sensitivity(np.ones(4), np.array([0.9, 0.8, 0.7, 0.6]), 1.0) == pytest.approx(0.3)


def test_threshold_fallbacks_name_the_labels_without_a_rule_threshold():
    y = np.zeros((6, 6))
    y[:3, 0] = y[:3, 1] = 1  # any, epidural: some positive; intraparenchymal: none
    y[:, 2] = 1  # intraparenchymal positive in every row: no negative for Youden's J
    y[:2, 3] = 1
    assert M.threshold_fallbacks(y) == ["intraparenchymal", "subarachnoid", "subdural"]
    assert M.threshold_fallbacks(y, "sensitivity") == ["subarachnoid", "subdural"]
    chosen = M.choose_thresholds(y, np.random.default_rng(0).random((6, 6)))
    assert all(chosen[label] == 0.5 for label in M.threshold_fallbacks(y))


# -- labels and split -----------------------------------------------------------------


def test_read_labels_pivots_and_drops_duplicates(tmp_path):
    rows = ["ID,Label"]
    for sop, positive in (("ID_aaa", {"subdural"}), ("ID_bbb", set())):
        for label in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"):
            value = int(label in positive or (label == "any" and bool(positive)))
            rows.append(f"{sop}_{label},{value}")
    rows += rows[1:4]  # duplicated rows, as in the real file
    (tmp_path / "stage_2_train.csv").write_text("\n".join(rows) + "\n")
    table = rsna.read_labels(tmp_path / "stage_2_train.csv")
    assert list(table.columns) == list(LABELS)
    assert table.loc["ID_aaa"].tolist() == [1, 0, 0, 0, 0, 1]
    assert table.loc["ID_bbb"].tolist() == [0] * 6


def test_read_labels_refuses_labels_other_than_0_and_1(tmp_path):
    def labels_of(images: dict[str, dict[str, str]]):
        rows = ["ID,Label"] + [f"{sop}_{label},{values.get(label, 0)}" for sop, values in images.items()
                               for label in LABELS]
        (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
        return rsna.read_labels(tmp_path / "labels.csv")

    # -1 (an "uncertain" label) would wrap to 255: a negative log loss, 255 times the positives.
    with pytest.raises(rsna.DataError, match=r"labels\.csv: 3 rows have a Label other than 0 or 1: "
                                              r"ID_aaa_any -1, ID_aaa_intraparenchymal 2, ID_ccc_subdural \(empty\)"):
        labels_of({"ID_aaa": {"any": "-1", "intraparenchymal": "2"}, "ID_bbb": {"any": "1.0"},
                   "ID_ccc": {"subdural": ""}})
    assert labels_of({"ID_bbb": {"any": "1.0"}}).to_numpy().tolist() == [[1, 0, 0, 0, 0, 0]]


def test_split_by_patient_keeps_patients_whole():
    rng = np.random.default_rng(4)
    patients = [f"P{int(i)}" for i in rng.integers(0, 150, 3000)]
    index = pd.DataFrame({"patient_id": patients, "series_uid": [f"S{p}_{i % 2}" for i, p in enumerate(patients)]})
    split = rsna.split_by_patient(index, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=9)
    assert split.notna().all()
    per_patient = split.groupby(index["patient_id"]).nunique()
    assert per_patient.max() == 1, "a patient is in two splits"
    counts = split.groupby(index["patient_id"]).first().value_counts()
    assert set(counts.index) == {"train", "val", "test"}
    assert counts["train"] == pytest.approx(0.7 * index["patient_id"].nunique(), abs=2)
    again = rsna.split_by_patient(index, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=9)
    pd.testing.assert_series_equal(split, again)
    other = rsna.split_by_patient(index, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=10)
    assert not split.equals(other)


def test_a_split_carried_over_keeps_every_earlier_patient_where_it_was(tmp_path):
    # Hospital record numbers: digits with leading zeros, which must stay text.
    earlier = pd.DataFrame({"patient_id": [f"{n:08d}" for n in range(40)]})
    earlier["split"] = rsna.split_by_patient(earlier, {"train": 0.75, "val": 0.25}, seed=1)
    earlier.to_csv(tmp_path / "split.csv", index=False)
    grown = pd.DataFrame({"patient_id": [f"{n:08d}" for n in range(60)]})  # 20 new patients
    split = rsna.split_like(grown, tmp_path / "split.csv", {"train": 0.75, "val": 0.25}, seed=2)
    assert split.notna().all()
    assert split[:40].tolist() == earlier["split"].tolist()
    assert set(split[40:]) == {"train", "val"}
    with pytest.raises(ValueError, match="no patient"):
        rsna.split_like(pd.DataFrame({"patient_id": ["A", "B"]}), tmp_path / "split.csv", {"train": 1.0}, seed=2)


def test_the_index_leaves_out_the_images_the_node_leaves_out(tmp_path):
    import pydicom
    from pydicom.uid import SecondaryCaptureImageStorage

    from training import phantoms

    phantoms.write_dataset(tmp_path, 1, seed=12, layout="rsna", matrix=64, progress=False)
    files = sorted((tmp_path / "stage_2_train").glob("ID_*.dcm"))
    scout, unplaced, capture = files[3], files[6], files[8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(scout)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(scout)
        ds = pydicom.dcmread(unplaced)
        del ds.ImagePositionPatient
        ds.save_as(unplaced)
        # A secondary capture filed in the series with a slice's geometry,
        # its SOP class in the file meta only, as the RSNA files keep it.
        ds = pydicom.dcmread(capture)
        ds.pop("SOPClassUID", None)
        ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.Modality = "OT"
        ds.save_as(capture)
    index = rsna.build_index(tmp_path, tmp_path / "cache", workers=1, progress=False)
    assert sorted(index["image_id"]) == sorted(f.stem for f in files if f not in (scout, unplaced, capture))
    assert index["slice_index"].tolist() == list(range(len(files) - 3))
    skipped = pd.read_csv(tmp_path / "cache" / rsna.SKIPPED_FILE)
    assert dict(zip((Path(p).stem for p in skipped["path"]), skipped["error"])) == {
        scout.stem: "not a slice of the series' volume: ImageType ORIGINAL\\PRIMARY\\LOCALIZER is a localizer (scout)",
        unplaced.stem: "not a slice of the series' volume: no ImagePositionPatient: its place in the volume is unknown",
        capture.stem: "not a slice of the series' volume: Secondary Capture Image Storage, modality OT, unlike most "
        "images of the series (CT Image Storage, modality CT)",
    }


def test_indexing_with_worker_processes_logs_no_uid_warning_per_image(tmp_path, monkeypatch, caplog):
    import pydicom

    from training import phantoms

    phantoms.write_dataset(tmp_path, 1, seed=12, layout="rsna", matrix=64, progress=False)  # "ID_..." UIDs
    # As with worker processes: the headers are read with pydicom quieted (there, in
    # each worker), and the main process keeps pydicom's default validation.
    def in_a_worker(paths):
        with pydicom.config.disable_value_validation():
            return [rsna._read_header(p) for p in paths]

    monkeypatch.setattr(rsna, "_read_headers", in_a_worker)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.WARN)
    caplog.clear()  # writing the phantoms' "ID_..." UIDs warns too
    with caplog.at_level(logging.WARNING, logger="pydicom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rsna.build_index(tmp_path, tmp_path / "cache", workers=1, progress=False)
    assert len(index) > 10
    assert not [r for r in caplog.records if "Invalid value for VR UI" in r.getMessage()]
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.WARN  # left as it was


def test_data_that_cannot_be_indexed_is_refused_in_one_line_naming_the_cause(tmp_path):
    from training import evaluate, phantoms, train

    labelled_otherwise = tmp_path / "other"
    phantoms.write_dataset(labelled_otherwise, 1, seed=12, layout="rsna", matrix=64, progress=False)
    images, csv = labelled_otherwise / rsna.TRAIN_DIR, labelled_otherwise / rsna.TRAIN_CSV
    files = sorted(images.glob("*.dcm"))
    flat = tmp_path / "flat"  # the images in the data folder itself
    flat.mkdir()
    for f in files:
        (flat / f.name).symlink_to(f)
    shutil.copyfile(csv, flat / rsna.TRAIN_CSV)
    csv.write_text(csv.read_text().replace("\nID_", "\nID_x"))  # another data set's labels
    (tmp_path / "c.yaml").write_text(TINY_CONFIG.replace("workers: 2", "workers: 1"))
    causes = {
        labelled_otherwise: f"none of the {len(files)} images in {images} has a label in {csv} (it names "
                            f"{len(files)} other images)",
        flat: f"image folder {flat / rsna.TRAIN_DIR} does not exist: the images go in {rsna.TRAIN_DIR}/ inside the "
              f"data folder ({len(files)} .dcm files are in {flat} itself)",
    }
    for folder, cause in causes.items():
        for command, options in ((train.main, ["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]),
                                 (evaluate.main, ["--model", "default", "--out", str(tmp_path / "r.json")])):
            result = CliRunner().invoke(command, ["--data", str(folder), *options, "--quiet"])
            assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
            assert f"Error: {cause}" in result.output


def test_the_index_and_slice_cache_are_rebuilt_when_their_data_change(tmp_path):
    import pydicom

    from training import phantoms

    first, second, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    phantoms.write_dataset(first, 1, seed=12, layout="rsna", matrix=64, progress=False)
    phantoms.write_dataset(second, 1, seed=13, layout="rsna", matrix=64, progress=False)
    index = rsna.build_index(first, cache, workers=1, progress=False)

    # A corrected label, in a CSV of the same size and mtime: its content decides.
    csv = first / rsna.TRAIN_CSV
    image = index["image_id"].iat[0]
    was = int(index["subdural"].iat[0])
    stat = csv.stat()
    csv.write_text(csv.read_text().replace(f"{image}_subdural,{was}", f"{image}_subdural,{1 - was}"))
    os.utime(csv, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    index = rsna.build_index(first, cache, workers=1, progress=False)
    assert index.set_index("image_id").loc[image, "subdural"] == 1 - was

    # Another data folder with the same cache folder.
    other = rsna.build_index(second, cache, workers=1, progress=False)
    assert sorted(other["image_id"]) == sorted(f.stem for f in (second / "stage_2_train").glob("*.dcm"))
    assert not set(other["image_id"]) & set(index["image_id"])

    # A file regenerated under its name (same size, other pixels): decoded anew.
    windows, size = imaging.DEFAULT_WINDOWS, (32, 32)
    old = rsna.build_slice_cache(index, first, cache, windows, size, dtype="float32", workers=1, progress=False)
    path = first / index["path"].iat[3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).tobytes()
        ds.save_as(path)
        expected = imaging.preprocess_slice(pydicom.dcmread(path), windows, size)
    index = rsna.build_index(first, cache, workers=1, progress=False)
    new = rsna.build_slice_cache(index, first, cache, windows, size, dtype="float32", workers=1, progress=False)
    row = int(np.flatnonzero(index["path"] == index["path"].iat[3])[0])
    assert not np.array_equal(old.images()[row], expected)
    np.testing.assert_array_equal(new.images()[row], expected)


def test_training_without_the_cache_leaves_out_a_slice_that_cannot_be_decoded(tmp_path):
    from tests.conftest import require_data
    from training import train

    series = require_data("rsna-series")
    data = tmp_path / "data"
    images = data / "stage_2_train"
    images.mkdir(parents=True)
    files = sorted(series.glob("ID_*.dcm"))
    for f in files:  # a temporary copy: one of them is broken below
        shutil.copyfile(f, images / f.name)
    broken = images / files[10].name
    broken.write_bytes(broken.read_bytes()[:300_000])  # header intact, pixels cut short
    rows = ["ID,Label"] + [f"{f.stem}_{label},0" for f in files for label in LABELS]
    # A second patient (a phantom series), so that both splits have one.
    from training import phantoms

    phantoms.write_dataset(tmp_path / "ph", 1, seed=12, layout="rsna", matrix=64, progress=False)
    for f in (tmp_path / "ph" / "stage_2_train").glob("*.dcm"):
        shutil.copyfile(f, images / f.name)
    rows += (tmp_path / "ph" / rsna.TRAIN_CSV).read_text().splitlines()[1:]
    (data / rsna.TRAIN_CSV).write_text("\n".join(rows) + "\n")
    (tmp_path / "c.yaml").write_text(
        TINY_CONFIG.replace("data: {split: {train: 0.6, val: 0.4}, workers: 2}",
                            "data: {split: {train: 0.5, val: 0.5}, cache: false, workers: 1}")
    )
    run = train.Run(data, train.TrainConfig.load(tmp_path / "c.yaml"), tmp_path / "run", "test", progress=False)
    run.prepare_data()
    assert run.cache is None
    assert run.index.loc[~run.ok, "image_id"].tolist() == [broken.stem]
    failures = pd.concat(pd.read_csv(f) for f in (tmp_path / "run" / "cache").glob("*/failures.csv"))
    assert failures["path"].str.contains(broken.stem).tolist() == [True]
    # What training streams: every other slice of the series, straight from DICOM.
    split = run.index.loc[run.index["image_id"] == broken.stem, "split"].iat[0]
    batches = list(run.dataset(split, training=False, repeat=False, batch_size=32))
    assert [x.shape for x, _ in batches] == [(31, 32, 32, 9)]


def test_training_batches_follow_from_the_seed_alone(tmp_path):
    """The same seed gives the same batches, in the same order, flipped alike, however
    long each batch takes to load and whatever else drew random numbers before."""
    import itertools
    import time

    import tensorflow as tf

    n, size = 40, (8, 8)
    cache = rsna.SliceCache(tmp_path, ((40.0, 80.0),), size, "float32")
    np.save(cache.images_path, np.random.default_rng(0).random((n, *size, 1), dtype=np.float32))
    index = pd.DataFrame({"path": [f"{i}.dcm" for i in range(n)]})
    loader = rsna.SliceLoader(index, np.arange(n)[:, None], 0, cache.windows, size, cache=cache)
    labels = np.repeat(np.arange(n, dtype=np.float32)[:, None], len(LABELS), axis=1)  # a row's number

    class FirstBatchLoadsLast:
        """The same slices, the first batch read slowly (a cold disk, a busy core)."""

        def __init__(self) -> None:
            self.size, self.channels, self.calls = loader.size, loader.channels, itertools.count()

        def load(self, rows: np.ndarray) -> np.ndarray:
            if next(self.calls) == 0:
                time.sleep(0.5)
            return loader.load(rows)

    def batches(source, seed: int, augment: bool = True) -> list:
        tf.random.set_seed(seed * 100)  # the global seed: other draws of the process
        ds = rsna.slice_dataset(source, np.arange(n), labels, batch_size=4, shuffle=True, seed=seed, repeat=True,
                                augment=augment, parallel_calls=4)
        return [(np.asarray(x), np.asarray(y)) for x, y in ds.take(12)]  # past the first epoch

    first = batches(loader, 5)
    for (x, y), (x_again, y_again) in zip(first, batches(FirstBatchLoadsLast(), 5), strict=True):
        np.testing.assert_array_equal(y_again, y)
        np.testing.assert_array_equal(x_again, x)
    # Each slice as it is or mirrored left-right, both drawn; another seed draws otherwise.
    plain = np.concatenate([x for x, _ in batches(loader, 5, augment=False)])
    flipped = np.concatenate([x for x, _ in first])
    mirrored = [bool(np.array_equal(f, p[:, ::-1])) for f, p in zip(flipped, plain)]
    assert all(m or np.array_equal(f, p) for m, f, p in zip(mirrored, flipped, plain))
    assert 0 < sum(mirrored) < len(mirrored)
    assert not all(np.array_equal(y, y_other) for (_, y), (_, y_other) in zip(first, batches(loader, 6)))


# -- end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory) -> Path:
    """Six phantom series in the RSNA layout, plus two broken files."""
    import pydicom

    from training import phantoms

    data = tmp_path_factory.mktemp("rsna")
    phantoms.write_dataset(data, 6, seed=11, layout="rsna", matrix=128, progress=False)
    images = data / "stage_2_train"
    (images / "ID_0000garbage.dcm").write_bytes(b"not a DICOM file at all")
    # a slice whose header is fine but whose pixels are truncated; it takes a
    # slice's place (a copy beside it would put two images at one position,
    # and the node leaves such a series out whole)
    source = sorted(images.glob("ID_*.dcm"))[5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = "ID_badpixels"
        ds.file_meta.MediaStorageSOPInstanceUID = "ID_badpixels"
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
        ds.save_as(images / "ID_badpixels.dcm")
    source.unlink()
    csv = data / "stage_2_train.csv"
    csv.write_text(csv.read_text().replace(f"{source.stem}_", "ID_badpixels_"))
    return data


@pytest.fixture(scope="module")
def trained(phantom_data, tmp_path_factory) -> dict:
    from training import train

    work = tmp_path_factory.mktemp("run")
    config = work / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    out = work / "run"
    result = CliRunner().invoke(
        train.main, ["--data", str(phantom_data), "--config", str(config), "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    return {"data": phantom_data, "config": config, "out": out, "model": out / "export" / "tiny.keras"}


def test_index_groups_orders_and_reports(trained):
    out, data = trained["out"], trained["data"]
    index = pd.read_csv(out / "cache" / rsna.INDEX_FILE)
    labels = rsna.read_labels(data / rsna.TRAIN_CSV)
    assert index["image_id"].is_unique
    assert len(index) == len(labels)  # every labelled readable file, duplicates dropped
    assert index["series_uid"].nunique() == 6
    skipped = pd.read_csv(out / "cache" / rsna.SKIPPED_FILE)
    assert skipped["path"].str.contains("ID_0000garbage").any()
    # z order is the node's order
    import pydicom

    for series_uid, group in index.groupby("series_uid"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            datasets = [pydicom.dcmread(data / p, stop_before_pixels=True) for p in group["path"]]
        order = imaging.order_slices(datasets)
        assert group["slice_index"].to_numpy()[order].tolist() == list(range(len(group)))
        assert (group["n_slices"] == len(group)).all()
    # labels follow the CSV
    joined = index.set_index("image_id")[list(LABELS)]
    pd.testing.assert_frame_equal(joined.sort_index(), labels.loc[joined.index].sort_index(), check_dtype=False)
    # the split is by patient
    split = pd.read_csv(out / "split.csv")
    assert split.groupby("patient_id")["split"].nunique().max() == 1


def test_cache_and_loader_match_node_preprocessing(trained):
    import pydicom

    out, data = trained["out"], trained["data"]
    index = rsna.build_index(data, out / "cache", progress=False)
    windows, size, k = imaging.DEFAULT_WINDOWS, (32, 32), 1
    cache = rsna.build_slice_cache(index, data, out / "cache", windows, size, progress=False)
    ok = cache.ok()
    bad = index["image_id"] == "ID_badpixels"
    assert bad.sum() == 1 and not ok[bad.to_numpy()].any() and ok[~bad.to_numpy()].all()
    assert (cache.directory / "failures.csv").exists()
    neighbours = rsna.neighbour_rows(index, k, ok)
    cached = rsna.SliceLoader(index, neighbours, k, windows, size, cache=cache)
    direct = rsna.SliceLoader(index, neighbours, k, windows, size, data_dir=data)
    rows = next(r for s, r in rsna.iter_series(index, ok) if not bad.to_numpy()[index["series_uid"] == s].any())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datasets = [pydicom.dcmread(data / index["path"].iat[r]) for r in rows]
    expected, order = imaging.preprocess_series(datasets, windows, size, k)
    assert order == list(range(len(rows)))  # rows are already in the node's z order
    np.testing.assert_array_equal(direct.load(rows), expected)
    np.testing.assert_allclose(cached.load(rows), expected, atol=2e-3)  # float16 cache

    ds = rsna.slice_dataset(cached, rows, rsna.label_matrix(index), batch_size=4, shuffle=True, seed=1,
                            repeat=False, augment=True)
    shapes = [(x.shape, y.shape) for x, y in ds]
    assert sum(s[0][0] for s in shapes) == len(rows)
    assert shapes[0] == ((4, 32, 32, 9), (4, 6))


def test_run_outputs_curves_checkpoints_and_card(trained):
    out = trained["out"]
    for name in ("slice_model.keras", "sequence_head.keras", "embeddings.npz", "history_slice.csv",
                 "history_sequence.csv", "history.json", "checkpoints/slice_best.keras", "config.yaml"):
        assert (out / name).exists(), name
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["slice"]] == [0, 1]
    assert "val_loss" in history["sequence"][-1]
    card = json.loads(card_path_for(trained["model"]).read_text())
    assert card["command"] == (
        f"python -m training.train --data {trained['data']} --config {trained['config']} --out {out}"
    )
    assert card["seed"] == 3 and card["sequence_stage"] is True
    assert set(card["thresholds"]) == set(LABELS)
    assert "series_auc" in card["metrics"]["validation"]
    assert card["architecture"]["config"]["filters"] == [4, 8]


def _validation_series_scores(trained) -> tuple:
    """The validation series' labels and scores as the node gives them (series-level, the card's aggregation):
    each series read from its DICOM files by ``preprocess_series``, as ``training.evaluate`` and the node do."""
    from training import evaluate, train

    config = train.TrainConfig.load(trained["config"])
    run = train.Run(trained["data"], config, trained["out"], "test", progress=False)
    run.prepare_data()  # reads the run's index, split and cache
    model = load_model(trained["model"])
    truth, scores = [], []
    for rows, x, failures in evaluate.series_volumes(run.index, trained["data"], run.series_rows("val"), model.card):
        assert not failures
        truth.append(run.labels[rows].max(axis=0))
        scores.append(model.predict_series(x).max(axis=0))  # aggregation: max
    assert model.card.series_aggregation == "max"
    return model.card, np.array(truth), np.array(scores), config


def test_card_thresholds_follow_the_documented_rule_at_series_level(trained):
    card, truth, scores, config = _validation_series_scores(trained)
    assert len(truth) >= 2 and truth[:, 0].any()
    thresholds = card.thresholds
    # Chosen on the very scores the node gives (not on the float16 training cache's,
    # which differ in the last bits): any at 95 % sensitivity, subtypes by Youden's J.
    assert thresholds["any"] == M.threshold_at_sensitivity(truth[:, 0], scores[:, 0], 0.95)
    assert config.export.any_sensitivity == 0.95
    for j, label in enumerate(LABELS[1:], start=1):
        assert thresholds[label] == M.threshold_youden(truth[:, j], scores[:, j]), label
    validation = card.metrics["validation"]
    assert validation["n_series"] == len(truth)
    assert validation["series_sens_spec"]["any"]["sensitivity"] >= 0.95
    assert validation["positives_series"] == {label: int(v) for label, v in zip(LABELS, truth.sum(axis=0))}
    # What the card states is what the node gives on those series.
    for j, label in enumerate(LABELS):
        positive, flagged = truth[:, j] > 0.5, scores[:, j] >= thresholds[label]
        counts = {"tp": positive & flagged, "fn": positive & ~flagged, "tn": ~positive & ~flagged,
                  "fp": ~positive & flagged}
        stated = validation["series_sens_spec"][label]
        assert {k: stated[k] for k in counts} == {k: int(v.sum()) for k, v in counts.items()}, label


def test_a_label_without_positive_validation_series_is_named_in_the_card(trained):
    card, truth, _, _ = _validation_series_scores(trained)
    fallback = [label for j, label in enumerate(LABELS)
                if not truth[:, j].any() or (j > 0 and truth[:, j].all())]
    assert fallback, "the tiny run's validation split should lack some subtype"
    assert card.metrics["threshold_fallback"] == fallback
    assert all(card.thresholds[label] == 0.5 for label in fallback)
    rule = card.metrics["threshold_rule"]
    assert rule.startswith("series-level on the validation split: any at 95% sensitivity, subtypes by youden")
    assert f"except {', '.join(fallback)}: 0.5, a placeholder" in rule


def test_export_reloads_with_identical_predictions(trained, tmp_path):
    import keras

    from training import export

    out = trained["out"]
    model = load_model(trained["model"])
    assert model.card.input_shape == (32, 32, 9)
    x = np.random.default_rng(5).random((23, 32, 32, 9), dtype=np.float32)
    probs = model.predict_series(x)
    # the stage models as trained, composed by hand
    slice_model = keras.saving.load_model(out / "slice_model.keras", compile=False)
    sequence = keras.saving.load_model(out / "sequence_head.keras", compile=False)
    emb = slice_model.get_layer("slice_encoder").predict_on_batch(x)
    np.testing.assert_allclose(probs, sequence.predict_on_batch(emb[None])[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict_slices(x), slice_model.predict_on_batch(x), rtol=1e-5, atol=1e-6)
    # installed elsewhere by the export command: same numbers
    result = CliRunner().invoke(export.main, ["--run", str(out), "--out", str(tmp_path), "--name", "copy"])
    assert result.exit_code == 0, result.output
    again = load_model(tmp_path / "copy.keras")
    np.testing.assert_array_equal(again.predict_series(x), probs)
    assert again.card == model.card


def test_rerun_resumes_without_retraining(trained):
    from training import train

    out = trained["out"]
    stamp = (out / "slice_model.keras").stat().st_mtime_ns
    (out / "sequence_head.keras").unlink()
    result = CliRunner().invoke(
        train.main, ["--data", str(trained["data"]), "--config", str(trained["config"]), "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "slice_model.keras").stat().st_mtime_ns == stamp
    assert (out / "sequence_head.keras").exists()
    load_model(trained["model"])


def test_a_rerun_with_other_stage_settings_is_refused_naming_them(trained, tmp_path):
    from training import train

    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    card, written = card_path_for(out / "export" / "tiny.keras"), (out / "config.yaml").read_text()
    stated, cached = card.read_text(), sorted((out / "cache").iterdir())

    def rerun(config: str):
        (tmp_path / "c.yaml").write_text(config)
        arguments = ["--data", str(trained["data"]), "--config", str(tmp_path / "c.yaml"), "--out", str(out), "--quiet"]
        return CliRunner().invoke(train.main, arguments)

    # Kept models of another seed and epochs would be carded with this config's.
    result = rerun(TINY_CONFIG.replace("seed: 3", "seed: 4").replace("{epochs: 2, steps_per_epoch: 3", "{epochs: 5, "
                                                                   "steps_per_epoch: 3"))
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert "slice stage" in result.output and "seed 3 -> 4, slice_stage.epochs 2 -> 5" in result.output
    assert "use a new run folder" in result.output
    # Another input size: refused before a slice cache of that size is built.
    result = rerun(TINY_CONFIG.replace("size: [32, 32]", "size: [48, 48]"))
    assert result.exit_code == 1 and "input.size [32, 32] -> [48, 48]" in result.output, result.output
    assert (out / "config.yaml").read_text() == written and card.read_text() == stated
    assert sorted((out / "cache").iterdir()) == cached
    # A run folder from before the settings were recorded: its slice model's input is checked.
    (out / train.STAGE_SETTINGS).unlink()
    result = rerun(TINY_CONFIG.replace("size: [32, 32]", "size: [48, 48]"))
    assert result.exit_code == 1 and r"takes inputs of shape (32, 32, 9)" in result.output, result.output
    assert sorted((out / "cache").iterdir()) == cached
    # Settings that shape no model (processes, the card's name) may change.
    (tmp_path / "c.yaml").write_text(TINY_CONFIG.replace("workers: 2", "workers: 1").replace("name: tiny", "name: t2"))
    config = train.TrainConfig.load(tmp_path / "c.yaml")
    train.Run(trained["data"], config, trained["out"], "test", progress=False).refuse_changed_stage_settings()


def test_interrupted_stage_resumes_from_backup(phantom_data, tmp_path):
    import keras

    from training import train

    (tmp_path / "c.yaml").write_text(TINY_CONFIG.replace("epochs: 2, steps_per_epoch: 3", "epochs: 3, steps_per_epoch: 2"))
    config = train.TrainConfig.load(tmp_path / "c.yaml")
    out = tmp_path / "run"

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    class InterruptedRun(train.Run):
        def _callbacks(self, stage, best):
            return super()._callbacks(stage, best) + [Interrupt()]

    with pytest.raises(KeyboardInterrupt):
        InterruptedRun(phantom_data, config, out, "test", progress=False).run()
    assert not (out / "slice_model.keras").exists()
    train.Run(phantom_data, config, out, "test", progress=False).run()
    epochs = [e["epoch"] for e in json.loads((out / "history.json").read_text())["slice"]]
    assert epochs == [0, 1, 2]  # epoch 2 only was trained after the restart
    logged = pd.read_csv(out / "history_slice.csv")["epoch"].tolist()
    assert logged == [0, 1, 2]


def test_a_rerun_with_another_seed_keeps_the_split_of_the_run(phantom_data, tmp_path, caplog):
    from training import train

    config = TINY_CONFIG.replace("workers: 2", "workers: 1")
    (tmp_path / "a.yaml").write_text(config)
    (tmp_path / "b.yaml").write_text(config.replace("seed: 3", "seed: 4"))
    out = tmp_path / "run"
    first = train.Run(phantom_data, train.TrainConfig.load(tmp_path / "a.yaml"), out, "test", progress=False)
    first.prepare_data()
    written = (out / "split.csv").read_text()
    # seed 4 alone splits these patients otherwise
    assert not rsna.split_by_patient(first.index, {"train": 0.6, "val": 0.4}, 4).equals(first.index["split"])
    second = train.Run(phantom_data, train.TrainConfig.load(tmp_path / "b.yaml"), out, "test", progress=False)
    with caplog.at_level(logging.INFO, logger="training.train"):
        second.prepare_data()
    pd.testing.assert_series_equal(second.index["split"], first.index["split"])
    assert (out / "split.csv").read_text() == written
    assert f"kept {out / 'split.csv'}" in caplog.text


def test_a_run_without_validation_patients_is_refused_before_the_slice_cache(phantom_data, tmp_path):
    import click

    from training import phantoms, train

    no_val = TINY_CONFIG.replace("data: {split: {train: 0.6, val: 0.4}, workers: 2}",
                                 "data: {split: {train: 1.0, val: 0.0}, workers: 1}")
    (tmp_path / "noval.yaml").write_text(no_val)
    run = train.Run(phantom_data, train.TrainConfig.load(tmp_path / "noval.yaml"), tmp_path / "a", "t", progress=False)
    with pytest.raises(click.ClickException, match=r"the val split has no patients .*'val': 0"):
        run.prepare_data()
    assert not list((tmp_path / "a" / "cache").glob("*/images.npy"))  # refused before preprocessing every slice
    # One patient only: the default split cannot give validation any.
    phantoms.write_dataset(tmp_path / "one", 1, seed=12, layout="rsna", matrix=64, progress=False)
    (tmp_path / "c.yaml").write_text(TINY_CONFIG.replace("workers: 2", "workers: 1"))
    run = train.Run(tmp_path / "one", train.TrainConfig.load(tmp_path / "c.yaml"), tmp_path / "b", "t", progress=False)
    with pytest.raises(click.ClickException, match=r"the val split has no patients .*1 patients in"):
        run.prepare_data()


@pytest.mark.timeout(120, method="thread")  # without the check, fit waited for ever
def test_the_sequence_stage_raises_on_an_empty_split_rather_than_waiting(tmp_path):
    import keras

    from training import train

    config = train.TrainConfig.model_validate(
        {"architecture": {"filters": [4], "embedding_dim": 4, "sequence": "gru", "sequence_units": 2},
         "sequence_stage": {"epochs": 1, "batch_size": 2, "crop": 4}}
    )
    run = train.Run(tmp_path / "data", config, tmp_path / "run", "test", progress=False)
    run.labels = np.zeros((10, len(LABELS)), dtype=np.float32)
    embeddings = np.random.default_rng(0).random((10, 4), dtype=np.float32)
    for empty in ("val", "train"):
        series = {"train": [np.arange(5)], "val": [np.arange(5, 10)], empty: []}
        run.series_rows = series.__getitem__
        with pytest.raises(Exception, match=f"the {empty} split has no series"):
            run.train_sequence_stage(embeddings)
    keras.backend.clear_session()


def test_a_rerun_on_changed_data_recomputes_embeddings_and_finds_hard_slices_by_image(trained, tmp_path, caplog):
    import keras

    from training import train

    data = tmp_path / "data"
    (data / "stage_2_train").mkdir(parents=True)
    for f in (trained["data"] / "stage_2_train").glob("*.dcm"):
        (data / "stage_2_train" / f.name).symlink_to(f)
    shutil.copyfile(trained["data"] / rsna.TRAIN_CSV, data / rsna.TRAIN_CSV)
    (tmp_path / "c.yaml").write_text(TINY_CONFIG.replace("workers: 2", "workers: 1"))
    config = train.TrainConfig.load(tmp_path / "c.yaml")
    slice_model = keras.saving.load_model(trained["out"] / "slice_model.keras", compile=False)
    out = tmp_path / "run"
    first = train.Run(data, config, out, "test", progress=False)
    first.prepare_data()
    first.embeddings(slice_model)
    # Hard slices as a fine-tuning run keeps them: training slices after the first training series.
    train_rows = first.rows["train"]
    dropped = first.index["series_uid"].iat[train_rows[0]]
    hard = [r for r in train_rows if first.index["series_uid"].iat[r] != dropped][:7]
    pd.DataFrame({"row": hard, "image_id": first.index["image_id"].to_numpy()[hard]}).to_csv(
        out / "hard_examples.csv", index=False)

    # The data change: that series is removed, so every later row moves up.
    for path in first.index.loc[first.index["series_uid"] == dropped, "path"]:
        (data / path).unlink()
    again = train.Run(data, config, out, "test", progress=False)
    with caplog.at_level(logging.INFO, logger="training.train"):
        again.prepare_data()
        emb = again.embeddings(slice_model)
    assert len(emb) == len(again.index) < len(first.index)
    rows = np.flatnonzero(again.ok)
    fresh = slice_model.get_layer("slice_encoder").predict_on_batch(again.loader.load(rows))
    np.testing.assert_allclose(emb[rows], fresh, rtol=1e-4, atol=1e-5)
    assert "computing the embeddings anew" in caplog.text
    # The same slices, at their new rows.
    found = again.hardest_slices(slice_model)
    assert again.index["image_id"].to_numpy()[found].tolist() == first.index["image_id"].to_numpy()[hard].tolist()
    # Only the data changed: the config is not blamed.
    assert "seed, data.split or data.split_from" not in caplog.text
    assert "split: the data changed since" in caplog.text and "(0 patients new, 1 no longer in the data)" in caplog.text
    # Unchanged data: the stored embeddings are used as they are.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="training.train"):
        np.testing.assert_array_equal(again.embeddings(slice_model), emb)
    assert "anew" not in caplog.text
    # A slice model trained again (its files removed by hand) makes them anew.
    encoder = slice_model.get_layer("slice_encoder")
    encoder.set_weights([w * 0.5 for w in encoder.get_weights()])
    with caplog.at_level(logging.INFO, logger="training.train"):
        emb = again.embeddings(slice_model)
    assert "by another slice model: computing the embeddings anew" in caplog.text
    np.testing.assert_allclose(emb[rows], encoder.predict_on_batch(again.loader.load(rows)), rtol=1e-4, atol=1e-5)
    keras.backend.clear_session()


def test_a_resumed_stage_keeps_the_best_checkpoint_of_its_earlier_epochs(tmp_path):
    import keras

    from training import train

    run = train.Run(tmp_path / "data", train.TrainConfig(), tmp_path / "run", "test", progress=False)
    best = tmp_path / "best.keras"
    x = np.ones((8, 1), dtype="float32")

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    def fit(epochs, *extra):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid")])
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
        # Learns to say 1 and is validated on 0: its val_loss worsens every epoch.
        model.fit(x, np.ones((8, 1)), validation_data=(x, np.zeros((8, 1))), epochs=epochs, verbose=0,
                  callbacks=run._callbacks("slice", best) + list(extra))

    with pytest.raises(KeyboardInterrupt):
        fit(3, Interrupt())
    fit(3)
    losses = [e["val_loss"] for e in json.loads((tmp_path / "run" / "history.json").read_text())["slice"]]
    assert len(losses) == 3 and losses[0] < losses[1] < losses[2]
    kept = keras.saving.load_model(best)
    assert kept.evaluate(x, np.zeros((8, 1)), verbose=0) == pytest.approx(losses[0], rel=1e-5)
    keras.backend.clear_session()


def test_evaluate_writes_report_plot_and_submission(trained, tmp_path):
    from training import evaluate

    report = tmp_path / "report.json"
    submission = tmp_path / "submission.csv"
    result = CliRunner().invoke(
        evaluate.main,
        ["--model", str(trained["model"]), "--data", str(trained["data"]), "--out", str(report),
         "--submission", str(submission), "--cache-dir", str(tmp_path / "cache"), "--workers", "2", "--quiet"],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads(report.read_text())
    assert math.isfinite(data["weighted_log_loss"])
    for key in ("slice_auc", "series_auc"):
        assert set(data[key]) == set(LABELS)
    assert data["series_sens_spec"]["any"]["threshold"] == load_model(trained["model"]).card.thresholds["any"]
    assert "sensitivity" in data["slice_sens_spec"]["subdural"]
    assert report.with_suffix(".roc.png").stat().st_size > 1000
    assert any("ID_badpixels" in s["path"] for s in data["skipped"])  # its pixels
    assert any("ID_0000garbage" in s["path"] for s in data["skipped"])  # its header, left out of the index
    sub = pd.read_csv(submission)
    assert list(sub.columns) == ["ID", "Label"]
    # every file, scored or not (its header or its pixels unreadable): Kaggle rejects a file missing one
    files = sorted((trained["data"] / "stage_2_train").glob("*.dcm"))
    assert sorted(sub["ID"]) == sorted(f"{f.stem}_{label}" for f in files for label in LABELS)
    assert data["n_slices"] == len(files) - 2 and data["submission_filled"] == 2
    assert sub["ID"].str.match(r"^ID_[0-9a-z]+_(any|epidural|intraparenchymal|intraventricular|subarachnoid|subdural)$").all()
    assert sub["Label"].between(0, 1).all()


def test_an_evaluation_report_names_each_skipped_file_by_folder_and_is_strict_json(trained, tmp_path):
    import pydicom

    from training import evaluate

    # One series (the one with the slice whose pixels cannot be decoded) and the file that is no DICOM.
    images = trained["data"] / rsna.TRAIN_DIR
    series = pydicom.dcmread(images / "ID_badpixels.dcm", stop_before_pixels=True).SeriesInstanceUID
    one = tmp_path / "one"
    (one / rsna.TRAIN_DIR).mkdir(parents=True)
    for f in images.glob("*.dcm"):
        if f.stem == "ID_0000garbage" or pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID == series:
            (one / rsna.TRAIN_DIR / f.name).symlink_to(f)
    shutil.copyfile(trained["data"] / rsna.TRAIN_CSV, one / rsna.TRAIN_CSV)
    evaluate.evaluate(load_model(trained["model"]), one, tmp_path / "report.json", workers=1, progress=False)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    # Every path relative to its data folder, which each entry names (pooled reports hold several).
    assert sorted(s["path"] for s in report["skipped"]) == [f"{rsna.TRAIN_DIR}/ID_0000garbage.dcm",
                                                             f"{rsna.TRAIN_DIR}/ID_badpixels.dcm"]
    assert all(s["data"] == str(one) for s in report["skipped"])
    # One series: no series AUC is defined; null, as in the model card.
    assert report["n_series"] == 1 and set(report["series_auc"].values()) == {None}


def test_export_refuses_a_heldout_report_of_another_model_or_of_its_own_patients(trained, tmp_path):
    from training import evaluate, export, phantoms

    model, out = load_model(trained["model"]), trained["out"]

    def install(report):
        return CliRunner().invoke(export.main, ["--run", str(out), "--out", str(tmp_path / "models"),
                                                "--name", "h", "--heldout", str(report)])

    # On the run's own data (its training and validation patients): not held out.
    evaluate.evaluate(model, trained["data"], tmp_path / "own.json", workers=1, progress=False)
    result = install(tmp_path / "own.json")
    assert result.exit_code != 0 and "is not held out" in result.output
    assert "in " + str(out / "split.csv") in result.output
    # Patients the run never saw.
    phantoms.write_dataset(tmp_path / "new", 2, seed=99, layout="rsna", matrix=64, progress=False)
    report = evaluate.evaluate(model, tmp_path / "new", tmp_path / "new.json", workers=1, progress=False)
    result = install(tmp_path / "new.json")
    assert result.exit_code == 0, result.output
    heldout = load_model(tmp_path / "models" / "h.keras").card.metrics["heldout"]
    assert heldout["data"] == str(tmp_path / "new") and heldout["n_series"] == report["n_series"] == 2
    # The report of another model (another file): refused, as is one of another name and thresholds.
    other = json.loads((tmp_path / "new.json").read_text())
    other["model"]["sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    result = install(tmp_path / "other.json")
    assert result.exit_code != 0 and "is a report of model tiny" in result.output
    del other["model"]["sha256"]
    other["model"].update(name="ich-phantom-default", version="0.4.0")
    (tmp_path / "other.json").write_text(json.dumps(other))
    result = install(tmp_path / "other.json")
    assert result.exit_code != 0 and "is a report of model ich-phantom-default 0.4.0" in result.output


def test_a_submission_for_the_test_layout_has_every_image(trained, tmp_path):
    from training import evaluate

    # The Kaggle test layout: stage_2_test/ and no labels.
    images = tmp_path / "kaggle" / "stage_2_test"
    images.mkdir(parents=True)
    files = sorted((trained["data"] / "stage_2_train").glob("*.dcm"))
    for f in files:
        (images / f.name).symlink_to(f)
    submission = tmp_path / "submission.csv"
    result = evaluate.evaluate(load_model(trained["model"]), tmp_path / "kaggle", tmp_path / "report.json",
                               submission=submission, predictions=tmp_path / "slices.csv",
                               cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert "series_auc" not in result and result["submission_filled"] == 2
    sub = pd.read_csv(submission)
    assert sorted(sub["ID"]) == sorted(f"{f.stem}_{label}" for f in files for label in LABELS)
    assert sub["Label"].between(0, 1).all()
    # The slice whose pixels cannot be decoded: its series' mean; the file that is no DICOM: the mean of all.
    slices = pd.read_csv(tmp_path / "slices.csv")
    scores = slices[[f"p_{label}" for label in LABELS]]
    label = sub.set_index("ID")["Label"]
    series = slices.loc[slices["image_id"] == "ID_badpixels", "series_uid"].iat[0]
    expected = scores[slices["series_uid"] == series].mean()
    np.testing.assert_allclose([label[f"ID_badpixels_{x}"] for x in LABELS], expected, atol=1e-6)
    np.testing.assert_allclose([label[f"ID_0000garbage_{x}"] for x in LABELS], scores.mean(), atol=1e-6)


def test_evaluate_pools_several_folders_with_intervals(trained, tmp_path):
    from training import evaluate

    model = load_model(trained["model"])
    single = evaluate.evaluate(model, trained["data"], tmp_path / "one.json", workers=2, progress=False)
    # The same folder twice: its series count twice (keyed by folder), not merged.
    pooled = evaluate.evaluate(model, [trained["data"], trained["data"]], tmp_path / "two.json",
                               predictions=tmp_path / "slices.csv", workers=2, progress=False)
    assert pooled["n_series"] == 2 * single["n_series"] and pooled["n_slices"] == 2 * single["n_slices"]
    assert pooled["series_auc"] == pytest.approx(single["series_auc"], nan_ok=True)
    assert pooled["data"] == [str(trained["data"])] * 2
    for label, (low, high) in pooled["series_auc_ci95"].items():
        auc = pooled["series_auc"][label]
        assert math.isnan(auc) or low <= auc <= high
    assert set(pd.read_csv(tmp_path / "slices.csv")["data"]) == {str(trained["data"])}


def test_architecture_config_round_trip_and_checks():
    from training.models import ArchitectureConfig

    config = ArchitectureConfig(filters=(8, 16), sequence="conv", sequence_kernel=3)
    assert ArchitectureConfig.from_config(config.get_config()) == config
    with pytest.raises(ValueError, match="backbone"):
        ArchitectureConfig(backbone="NoSuchNet")
    with pytest.raises(ValueError, match="sequence_kernel"):
        ArchitectureConfig(sequence_kernel=4)
    with pytest.raises(ValueError, match="unknown architecture keys"):
        ArchitectureConfig.from_config({"filterz": [8]})


def test_conv_sequence_head_and_single_stage_model_load(tmp_path):
    """The 1-D convolution sequence stage, and a model without a sequence stage."""
    import keras

    from training import models

    config = models.ArchitectureConfig(filters=(4,), embedding_dim=4, sequence="conv", sequence_units=4)
    encoder = models.build_slice_encoder((16, 16, 3), config)
    head = models.build_slice_head()
    x = np.random.default_rng(0).random((5, 16, 16, 3), dtype=np.float32)
    for sequence, stage in ((models.build_sequence_head(4, config), True), (None, False)):
        path = tmp_path / f"m{stage}.keras"
        models.assemble(encoder, head, sequence).save(path)
        card = {
            "name": "t", "version": "0", "labels": list(LABELS), "input_size": [16, 16],
            "windows": [[40, 80]], "context_slices": 1, "channels": 3, "sequence_stage": stage,
            "thresholds": {label: 0.5 for label in LABELS}, "trained_on": "-", "intended_use": "-",
            "disclaimer": "Not for clinical use.", "command": "-", "seed": 0,
        }
        card_path_for(path).write_text(json.dumps(card))
        model = load_model(path)
        assert model.has_sequence_stage is stage
        assert model.predict_series(x).shape == (5, 6)
    keras.backend.clear_session()


def test_fine_tune_from_a_slice_model_keeps_the_previous_split(trained, tmp_path):
    import keras

    from training import train

    previous = trained["out"]
    config = TINY_CONFIG.replace("seed: 3", "seed: 4").replace(
        "data: {split: {train: 0.6, val: 0.4}, workers: 2}",
        f"data: {{split: {{train: 0.6, val: 0.4}}, workers: 2, split_from: '{previous / 'split.csv'}'}}",
    ).replace(
        "slice_stage: {epochs: 2, steps_per_epoch: 3, batch_size: 8}",
        f"slice_stage: {{epochs: 1, steps_per_epoch: 1, batch_size: 8, learning_rate: 1.0e-9, weight_decay: 0,"
        f" init_from: '{previous / 'slice_model.keras'}', hard_examples: 0.3, hard_pool: 0.25}}",
    )
    (tmp_path / "ft.yaml").write_text(config)
    out = tmp_path / "run"
    run = train.Run(trained["data"], train.TrainConfig.load(tmp_path / "ft.yaml"), out, "test", progress=False)
    run.run()
    old = pd.read_csv(previous / "split.csv")
    new = pd.read_csv(out / "split.csv")
    assert new.set_index("image_id")["split"].to_dict() == old.set_index("image_id")["split"].to_dict()

    def first_kernel(path):
        model = keras.saving.load_model(path, compile=False)
        conv = next(w for w in model.weights if len(w.shape) == 4)
        return np.asarray(conv)

    np.testing.assert_allclose(
        first_kernel(out / "slice_model.keras"), first_kernel(previous / "slice_model.keras"), atol=1e-6
    )

    # Hard examples: the quarter of the training slices the starting model got most wrong.
    from training.metrics import sample_log_loss

    start = keras.saving.load_model(previous / "slice_model.keras", compile=False)
    rows = run.rows["train"]
    loss = sample_log_loss(run.labels[rows], np.asarray(start.predict_on_batch(run.loader.load(rows))))
    hard = pd.read_csv(out / "hard_examples.csv")
    assert len(hard) == round(0.25 * len(rows))
    assert set(hard["row"]) <= set(rows)
    easier = loss[~np.isin(rows, hard["row"])]
    assert hard["loss"].min() >= easier.max() - 1e-5
    np.testing.assert_allclose(hard["loss"], loss[np.searchsorted(rows, hard["row"])], rtol=1e-4, atol=1e-6)
    keras.backend.clear_session()


@pytest.mark.parametrize(
    ("size", "filters", "refusal"),
    [
        (48, (4,), r"takes inputs of shape \(48, 48, 9\).* give \(32, 32, 9\)"),
        # The same input, another architecture: the card, which records the config's, would be wrong.
        (32, (8,), "is not of the architecture this config describes"),
    ],
    ids=["input shape", "architecture"],
)
def test_a_starting_model_unlike_the_config_is_refused_before_indexing(phantom_data, tmp_path, size, filters, refusal):
    import click
    import keras

    from training import models, train

    start = tmp_path / "start.keras"
    arch = models.ArchitectureConfig(filters=filters, embedding_dim=4)
    models.build_slice_model(models.build_slice_encoder((size, size, 9), arch), models.build_slice_head()).save(start)
    (tmp_path / "c.yaml").write_text(TINY_CONFIG.replace(
        "slice_stage: {epochs: 2, steps_per_epoch: 3, batch_size: 8}",
        f"slice_stage: {{epochs: 1, steps_per_epoch: 1, batch_size: 8, init_from: '{start}'}}"))
    config = train.TrainConfig.load(tmp_path / "c.yaml")
    assert (tuple(config.input.size), config.arch.filters) != ((size, size), filters)
    run = train.Run(phantom_data, config, tmp_path / "run", "t", progress=False)
    with pytest.raises(click.ClickException, match=refusal):
        run.prepare_data()
    assert not (tmp_path / "run" / "cache" / rsna.INDEX_FILE).exists()
    keras.backend.clear_session()


def test_hard_examples_need_a_starting_model():
    from training import train

    with pytest.raises(ValueError, match="hard_examples needs init_from"):
        train.SliceStage(hard_examples=0.2)
    with pytest.raises(ValueError, match="below 1"):
        train.SliceStage(hard_examples=0.6, oversample=0.5, init_from="x.keras")


def test_a_change_of_the_preprocessing_makes_a_new_slice_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cache of slices preprocessed otherwise than the node now does would
    # train the model on images it never scores.
    import pandas as pd

    from ichnode import imaging
    from training import rsna

    index = pd.DataFrame({"path": ["a.dcm"], "file_size": [1], "file_mtime_ns": [2]})
    before = rsna.cache_key(index, imaging.DEFAULT_WINDOWS, (256, 256), "float16")
    monkeypatch.setattr(imaging, "PREPROCESSING_VERSION", imaging.PREPROCESSING_VERSION + 1)
    assert rsna.cache_key(index, imaging.DEFAULT_WINDOWS, (256, 256), "float16") != before
