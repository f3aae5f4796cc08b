"""Reading the RSNA 2019 Intracranial Hemorrhage Detection layout.

Layout (the Kaggle download, or ``python -m training.phantoms --layout rsna``)::

    DIR/stage_2_train.csv            ID,Label  rows ID_<sop>_<label>,<0|1>
    DIR/stage_2_train/ID_<sop>.dcm   one slice per file, all series mixed

Steps, each usable on its own and each scaling to the full data set (~750k
slices, ~120 GB):

1. :func:`read_labels` parses the CSV (dropping duplicated rows) into one row
   per image with the six labels in :data:`LABELS` order.
2. :func:`build_index` reads every header once (parallel, progress bar) and
   caches a table (``index.csv``) grouping slices by patient, study and
   series, in z order (``ichnode.imaging.order_slices``); unreadable files
   are skipped and listed in ``index_skipped.csv``.  The table is rebuilt
   when the folder, its files or the labels CSV change.
3. :func:`split_by_patient` assigns whole patients to splits (seeded).
4. :func:`build_slice_cache` writes each slice once, preprocessed by
   ``ichnode.imaging`` (HU, windows, resize; no context), into an on-disk
   ``.npy`` memory map (optional; parallel; resumable).  Slices whose pixels
   cannot be decoded are dropped and reported.
5. :func:`slice_dataset` streams ``(x, y)`` batches with ``tf.data``:
   shuffled rows, parallel loading (from the cache, or decoding DICOM), 2.5D
   context via ``ichnode.imaging.stack_context``, prefetch.  Only the rows of
   one batch are in memory.

Nothing here copies preprocessing: pixels always go through
``ichnode.imaging``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ichnode import imaging
from ichnode.config import LABELS
from ichnode.selection import mixed_series, stray_slices

logger = logging.getLogger(__name__)

TRAIN_CSV = "stage_2_train.csv"
TRAIN_DIR = "stage_2_train"
TEST_DIR = "stage_2_test"  # the Kaggle test images: no labels
INDEX_FILE = "index.csv"
INDEX_FINGERPRINT = "index_fingerprint.json"
# Bumped when the rules of what is indexed change: an index an older rule
# built is rebuilt, not read.  3: skipped files relative to the data folder.
INDEX_FORMAT = 3
SKIPPED_FILE = "index_skipped.csv"
HEADER_TAGS = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "ImageType",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "Rows",
    "Columns",
)


class DataError(ValueError):
    """A data folder that cannot be read as the RSNA layout (the command lines
    report it in one line)."""


# --------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------


def read_labels(csv_path: Path) -> pd.DataFrame:
    """Parse ``stage_2_train.csv`` into one row per image.

    Returns a frame indexed by ``image_id`` (``ID_<sop>``) with one uint8
    column per label in :data:`LABELS` order.  Exact duplicated rows are
    dropped; an image listed twice for one label with different values keeps
    the maximum (and is logged).  Images lacking a label are dropped (logged).
    A Label other than 0 or 1 (``-1`` for "uncertain", an empty one) is
    refused with :class:`DataError`.
    """
    frame = pd.read_csv(csv_path, dtype={"ID": str, "Label": str}, keep_default_na=False)
    if list(frame.columns[:2]) != ["ID", "Label"]:
        raise DataError(f"{csv_path}: expected header ID,Label, got {list(frame.columns)}")
    # Checked before any cast: -1 would become 255 as uint8 (a negative log loss,
    # 255 "positives" per slice).
    values = pd.to_numeric(frame["Label"], errors="coerce")
    bad = ~values.isin([0, 1])
    if bad.any():
        examples = ", ".join(f"{i} {v or '(empty)'}" for i, v in frame.loc[bad, ["ID", "Label"]].head(5).to_numpy())
        raise DataError(f"{csv_path}: {int(bad.sum())} rows have a Label other than 0 or 1: {examples}")
    frame["Label"] = values.astype(np.uint8)
    n = len(frame)
    frame = frame.drop_duplicates()
    if len(frame) < n:
        logger.info("%s: dropped %d duplicated rows", csv_path, n - len(frame))
    parts = frame["ID"].str.rsplit("_", n=1, expand=True)
    frame = pd.DataFrame({"image_id": parts[0], "label": parts[1], "value": frame["Label"]})
    unknown = set(frame["label"].unique()) - set(LABELS)
    if unknown:
        raise DataError(f"{csv_path}: unknown labels {sorted(unknown)}, expected {list(LABELS)}")
    conflicts = frame.duplicated(["image_id", "label"]).sum()
    if conflicts:
        logger.warning("%s: %d image/label pairs listed with different values; keeping the max", csv_path, conflicts)
    table = frame.pivot_table(index="image_id", columns="label", values="value", aggfunc="max")
    incomplete = table.isna().any(axis=1)
    if incomplete.any():
        logger.warning("%s: %d images lack some labels; dropped", csv_path, int(incomplete.sum()))
        table = table[~incomplete]
    table = table[list(LABELS)].astype(np.uint8)
    table.columns.name = None
    return table


# --------------------------------------------------------------------------
# Header index
# --------------------------------------------------------------------------


def _quiet_pydicom() -> None:
    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", module="pydicom")


def _read_header(path: str) -> dict[str, Any]:
    """A few header fields of one file, or ``{"path", "error"}``."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
        record: dict[str, Any] = {"path": path, "error": ""}
        for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            value = ds.get(keyword)
            if value in (None, ""):
                raise ValueError(f"missing {keyword}")
            record[keyword] = str(value)
        # What tells a secondary capture filed in a CT series from its slices.
        record["SOPClassUID"] = imaging.sop_class_uid(ds)
        record["Modality"] = str(ds.get("Modality", "") or "")
        image_type = ds.get("ImageType") or []
        record["ImageType"] = "\\".join(str(v) for v in ([image_type] if isinstance(image_type, str) else image_type))
        record["InstanceNumber"] = _float_or_nan(ds.get("InstanceNumber"))
        for keyword, length in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6)):
            value = ds.get(keyword)
            values = [float(v) for v in value] if value is not None and len(value) == length else []
            record[keyword] = "\\".join(repr(v) for v in values)
        record["Rows"] = int(ds.get("Rows") or 0)
        record["Columns"] = int(ds.get("Columns") or 0)
        return record
    except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped and reported
        return {"path": path, "error": f"{type(exc).__name__}: {exc}"}


def _float_or_nan(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _read_headers(paths: list[str]) -> list[dict[str, Any]]:
    _quiet_pydicom()
    return [_read_header(p) for p in paths]


def _minimal_dataset(row: Any) -> Any:
    import pydicom
    from pydicom.dataset import Dataset

    ds = Dataset()
    # Without value validation: RSNA's "ID_..." UIDs are no valid UIDs, and
    # pydicom would warn once per image here, in the main process (the header
    # reading workers quiet pydicom in their own processes only).
    with pydicom.config.disable_value_validation():
        # What the node's selection reads: identity, kind and geometry.
        ds.PatientID = row.patient_id if isinstance(row.patient_id, str) else ""
        ds.StudyInstanceUID = row.study_uid if isinstance(row.study_uid, str) else ""
        ds.SOPClassUID = row.SOPClassUID if isinstance(row.SOPClassUID, str) else ""
        ds.Modality = row.Modality if isinstance(row.Modality, str) else ""
        if row.ImageType:
            ds.ImageType = row.ImageType.split("\\")
        if row.ImagePositionPatient:
            ds.ImagePositionPatient = [float(v) for v in row.ImagePositionPatient.split("\\")]
        if row.ImageOrientationPatient:
            ds.ImageOrientationPatient = [float(v) for v in row.ImageOrientationPatient.split("\\")]
        if not np.isnan(row.InstanceNumber):
            ds.InstanceNumber = int(row.InstanceNumber)
    return ds


def _executor(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # spawn: never fork a process that may hold TensorFlow's threads.
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=imaging.keep_freed_memory
    )


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _dicom_files(root: Path) -> dict[str, tuple[int, int]]:
    """Every ``.dcm`` file of ``root``: path -> (size, mtime in ns), links followed."""
    files = {}
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.lower().endswith(".dcm"):
                stat = entry.stat()
                files[entry.path] = (stat.st_size, stat.st_mtime_ns)
    return files


def _fingerprint(data_dir: Path, image_dir: str, files: dict[str, tuple[int, int]], csv: Path | None) -> dict:
    """What an index was built from: the folder, each file's name, size and
    mtime, and the labels' content (a corrected CSV may keep its size)."""
    listing = hashlib.sha256()
    for path in sorted(files):
        listing.update(f"{os.path.basename(path)}\t{files[path][0]}\t{files[path][1]}\n".encode())
    labels = None
    if csv is not None and csv.exists():
        digest = hashlib.sha256()
        with csv.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        labels = {"name": csv.name, "sha256": digest.hexdigest()}
    return {
        "format": INDEX_FORMAT,
        "data_dir": str(data_dir.resolve()),
        "image_dir": image_dir,
        "files": len(files),
        "files_sha256": listing.hexdigest(),
        "labels": labels,
    }


def build_index(
    data_dir: Path,
    cache_dir: Path,
    *,
    image_dir: str = TRAIN_DIR,
    labels_csv: str | None = TRAIN_CSV,
    workers: int | None = None,
    progress: bool = True,
    rebuild: bool = False,
) -> pd.DataFrame:
    """Index every slice of ``data_dir`` once; later calls read ``cache_dir/index.csv``
    while its fingerprint (``index_fingerprint.json``: the resolved folder, the
    image files' names, sizes and mtimes, the labels CSV's hash) still matches,
    and rebuild it otherwise.

    Columns: ``image_id`` (file stem), ``path`` (relative to ``data_dir``),
    ``patient_id``, ``study_uid``, ``series_uid``, ``slice_index`` (z order
    within the series, by ``ichnode.imaging.order_slices``), ``n_slices``,
    ``rows``, ``cols``, ``file_size``, ``file_mtime_ns`` (what the slice cache
    is keyed on), and the six labels when ``labels_csv`` exists (images
    without labels are then dropped).  Rows are sorted by series then z.
    Files whose header cannot be read are skipped and written, with the
    reason and their path relative to ``data_dir``, to
    ``cache_dir/index_skipped.csv``.  A folder that cannot be indexed (no
    image folder, no ``.dcm`` file, a labels CSV that is wrong or names none
    of the images) raises :class:`DataError`.
    """
    from tqdm import tqdm

    data_dir, cache_dir = Path(data_dir), Path(cache_dir)
    index_path = cache_dir / INDEX_FILE
    fingerprint_path = cache_dir / INDEX_FINGERPRINT
    root = data_dir / image_dir
    if not root.is_dir():
        misplaced = len(_dicom_files(data_dir)) if data_dir.is_dir() else 0
        raise DataError(
            f"image folder {root} does not exist: the images go in {image_dir}/ inside the data folder"
            + (f" ({misplaced} .dcm files are in {data_dir} itself)" if misplaced else "")
        )
    files = _dicom_files(root)
    if not files:
        raise DataError(f"no .dcm files in {root}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    csv = data_dir / labels_csv if labels_csv else None
    fingerprint = _fingerprint(data_dir, image_dir, files, csv)
    if index_path.exists() and not rebuild:
        stored = json.loads(fingerprint_path.read_text()) if fingerprint_path.exists() else None
        if stored == fingerprint:
            index = pd.read_csv(index_path, dtype={"patient_id": str, "study_uid": str, "series_uid": str})
            logger.info("read index of %d slices from %s", len(index), index_path)
            return index
        changed = [key for key in fingerprint if (stored or {}).get(key) != fingerprint[key]]
        logger.info("rebuilding %s: it was built from other data (%s changed)", index_path, ", ".join(changed))
    # Gone first: an index rebuilt only in part must not pass for the old one.
    fingerprint_path.unlink(missing_ok=True)

    paths = sorted(files)
    workers = workers or default_workers()
    chunk = 256
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(paths), desc="index headers", unit="file", disable=not progress)
    if workers > 1 and len(chunks) > 1:
        with _executor(workers) as pool:
            for part in pool.map(_read_headers, chunks):
                records.extend(part)
                bar.update(len(part))
    else:
        for part in map(_read_headers, chunks):
            records.extend(part)
            bar.update(len(part))
    bar.close()

    table = pd.DataFrame.from_records(records)
    table["file_size"] = [files[p][0] for p in table["path"]]
    table["file_mtime_ns"] = [files[p][1] for p in table["path"]]
    # Skipped files relative too, as the index and the decoding failures name
    # files (a pooled evaluation report gives the data folder beside each).
    table["path"] = [os.path.relpath(p, data_dir) for p in table["path"]]
    skipped = table[table["error"] != ""][["path", "error"]].copy()
    table = table[table["error"] == ""].drop(columns="error")
    table["image_id"] = [Path(p).stem for p in table["path"]]
    table = table.rename(
        columns={
            "PatientID": "patient_id",
            "StudyInstanceUID": "study_uid",
            "SeriesInstanceUID": "series_uid",
            "Rows": "rows",
            "Columns": "cols",
        }
    )

    # The volume of each series and its z order, by the node's own rules.
    table = table.reset_index(drop=True)
    slice_index = np.zeros(len(table), dtype=np.int32)
    left_out: dict[int, str] = {}  # table row -> why it is not a slice of its series' volume
    for series_uid, group in table.groupby("series_uid", sort=False):
        rows = group.index.to_numpy()
        datasets = [_minimal_dataset(r) for r in group.itertuples()]
        strays = stray_slices(datasets)
        left_out.update({rows[i]: f"not a slice of the series' volume: {why}" for i, why in strays.items()})
        kept = np.array([i for i in range(len(rows)) if i not in strays])
        # What the node would not score as one volume is left out whole.
        mixed = mixed_series([datasets[i] for i in kept])
        if mixed:
            left_out.update({rows[i]: f"series left out: {mixed}" for i in kept})
            logger.warning("series %s left out: %s", series_uid, mixed)
            continue
        order = imaging.order_slices([datasets[i] for i in kept])
        slice_index[rows[kept[order]]] = np.arange(len(order))
    if left_out:
        bad = np.zeros(len(table), dtype=bool)
        bad[list(left_out)] = True
        reasons = [left_out[i] for i in np.flatnonzero(bad)]
        skipped = pd.concat([skipped, pd.DataFrame({"path": table["path"].to_numpy()[bad], "error": reasons})])
        table = table[~bad]
        slice_index = slice_index[~bad]
    table["slice_index"] = slice_index

    if csv is not None and csv.exists():
        labels = read_labels(csv)
        missing = ~table["image_id"].isin(labels.index)
        if len(missing) and missing.all():
            # Else an empty index: the metrics, or the split, would fail far from the cause.
            raise DataError(f"none of the {len(missing)} images in {root} has a label in {csv} (it names "
                            f"{len(labels)} other images)")
        if missing.any():
            logger.warning("%d images have no labels in %s; skipped", int(missing.sum()), csv)
            skipped = pd.concat(
                [skipped, pd.DataFrame({"path": table.loc[missing, "path"], "error": "no labels"})]
            )
            table = table[~missing]
        table = table.join(labels, on="image_id")
        absent = len(labels) - len(table)
        if absent > 0:
            logger.info("%d labelled images have no readable file", absent)

    table = finalize_index(table)
    table.to_csv(index_path, index=False)
    skipped.to_csv(cache_dir / SKIPPED_FILE, index=False)
    fingerprint_path.write_text(json.dumps(fingerprint, indent=1))
    if len(skipped):
        logger.warning("skipped %d files, listed in %s", len(skipped), cache_dir / SKIPPED_FILE)
    logger.info("indexed %d slices of %d series into %s", len(table), table["series_uid"].nunique(), index_path)
    return table


def index_skipped(cache_dir: Path) -> list[dict[str, str]]:
    """The files :func:`build_index` left out of ``cache_dir``'s index, and why."""
    path = Path(cache_dir) / SKIPPED_FILE
    if not path.exists() or path.stat().st_size == 0:
        return []
    skipped = pd.read_csv(path, dtype=str, keep_default_na=False)
    return skipped[["path", "error"]].to_dict("records")


def finalize_index(table: pd.DataFrame) -> pd.DataFrame:
    """Sort by series then z, renumber ``slice_index`` 0..n-1 and set ``n_slices``."""
    table = table.sort_values(["patient_id", "study_uid", "series_uid", "slice_index"]).reset_index(drop=True)
    table["slice_index"] = table.groupby("series_uid", sort=False).cumcount().astype(np.int32)
    table["n_slices"] = table.groupby("series_uid", sort=False)["slice_index"].transform("size").astype(np.int32)
    return table


def has_labels(index: pd.DataFrame) -> bool:
    return all(label in index.columns for label in LABELS)


def label_matrix(index: pd.DataFrame) -> np.ndarray:
    """``(N, 6)`` float32 labels in :data:`LABELS` order."""
    return index[list(LABELS)].to_numpy(dtype=np.float32)


# --------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------


def split_by_patient(
    index: pd.DataFrame, fractions: dict[str, float], seed: int
) -> pd.Series:
    """Assign each row a split name so that no patient is in two splits.

    Patients are shuffled with ``seed`` and cut by the cumulative
    ``fractions`` (normalised); every split with a positive fraction gets at
    least one patient when there are enough patients.
    """
    if not fractions or min(fractions.values()) < 0 or sum(fractions.values()) <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {fractions}")
    patients = np.array(sorted(index["patient_id"].unique()))
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    names = list(fractions)
    weights = np.array([fractions[n] for n in names], dtype=np.float64)
    counts = np.floor(weights / weights.sum() * len(patients)).astype(int)
    for i in np.argsort(-weights):  # hand out the remainder, then ensure non-empty splits
        if counts.sum() >= len(patients):
            break
        counts[i] += 1
    for i, w in enumerate(weights):
        if w > 0 and counts[i] == 0 and counts.max() > 1:
            counts[i] += 1
            counts[int(np.argmax(counts))] -= 1
    assignment: dict[str, str] = {}
    start = 0
    for name, count in zip(names, counts):
        for patient in patients[start : start + count]:
            assignment[patient] = name
        start += count
    return index["patient_id"].map(assignment).rename("split")


def patient_digests(patient_ids: Sequence[str]) -> list[str]:
    """Sorted SHA-256 digests of the distinct patient IDs: a report can say which
    patients it holds (to tell held-out data from a run's own) without naming them."""
    return sorted({hashlib.sha256(str(p).encode()).hexdigest() for p in patient_ids})


def split_like(index: pd.DataFrame, split_csv: Path, fractions: dict[str, float], seed: int) -> pd.Series:
    """Each row's split, as an earlier run's ``split.csv`` had its patient, so
    that fine-tuning never validates on the patients the starting model was
    trained on; patients new since are split by :func:`split_by_patient`."""
    # As text: a patient ID of digits ("00012345") must not become a number.
    previous = pd.read_csv(split_csv, usecols=["patient_id", "split"], dtype=str, keep_default_na=False)
    kept = dict(zip(previous["patient_id"], previous["split"]))
    new = ~index["patient_id"].isin(kept)
    if new.all():
        raise ValueError(f"no patient of this data set is in {split_csv}: not the split of the same data")
    split = index["patient_id"].map(kept).rename("split")
    if new.any():
        split[new] = split_by_patient(index[new], fractions, seed)
    return split


# --------------------------------------------------------------------------
# Preprocessed slice cache
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceCache:
    """Preprocessed slices (no context) of an index, one row per index row.

    ``images`` is an ``.npy`` file of shape ``(N, H, W, len(windows))``,
    opened as a read-only memory map; ``ok[i]`` is False where the slice could
    not be decoded (those rows must not be used).
    """

    directory: Path
    windows: tuple[tuple[float, float], ...]
    size: tuple[int, int]
    dtype: str

    @property
    def images_path(self) -> Path:
        return self.directory / "images.npy"

    @property
    def ok_path(self) -> Path:
        return self.directory / "ok.npy"

    def images(self) -> np.ndarray:
        return np.load(self.images_path, mmap_mode="r")

    def ok(self) -> np.ndarray:
        return np.load(self.ok_path)


def cache_key(
    index: pd.DataFrame, windows: Sequence[Sequence[float]], size: Sequence[int], dtype: str,
    data_dir: Path | None = None,
) -> str:
    """A short hash of what the cache holds: the files of the index rows (with
    their size and mtime, so a regenerated file of the same name is not taken
    for the old one), their folder, and the preprocessing."""
    h = hashlib.sha256()
    preprocessing = [imaging.PREPROCESSING_VERSION, [list(map(float, w)) for w in windows], list(size), dtype]
    h.update(json.dumps(preprocessing).encode())
    if data_dir is not None:
        h.update(str(Path(data_dir).resolve()).encode())
    columns = [c for c in ("path", "file_size", "file_mtime_ns") if c in index.columns]
    h.update("\n".join("\t".join(map(str, row)) for row in index[columns].itertuples(index=False)).encode())
    return h.hexdigest()[:16]


def _cache_series(job: tuple[str, str, list[int], list[str], list, tuple[int, int], str]) -> list[tuple[int, str]]:
    """Preprocess one series into the memory map (only check that it decodes
    when ``images_path`` is empty); return ``(row, error)`` failures."""
    import pydicom

    _quiet_pydicom()
    images_path, data_dir, rows, paths, windows, size, _ = job
    images = np.load(images_path, mmap_mode="r+") if images_path else None
    failures: list[tuple[int, str]] = []
    datasets, kept = [], []
    for row, path in zip(rows, paths):
        try:
            datasets.append(pydicom.dcmread(os.path.join(data_dir, path)))
            kept.append(row)
        except Exception as exc:  # noqa: BLE001 - reported, slice dropped
            failures.append((row, f"{type(exc).__name__}: {exc}"))
    if datasets:
        try:
            volume, order = imaging.preprocess_series(datasets, windows, size, 0)
            if images is not None:
                for j, i in enumerate(order):
                    images[kept[i]] = volume[j]
        except Exception:  # noqa: BLE001 - fall back slice by slice to find the bad ones
            for ds, row in zip(datasets, kept):
                try:
                    image = imaging.preprocess_slice(ds, windows, size)
                    if images is not None:
                        images[row] = image
                except Exception as exc:  # noqa: BLE001
                    failures.append((row, f"{type(exc).__name__}: {exc}"))
    if images is not None:
        images.flush()
    return failures


def build_slice_cache(
    index: pd.DataFrame,
    data_dir: Path,
    cache_root: Path,
    windows: Sequence[Sequence[float]],
    size: Sequence[int],
    *,
    dtype: str = "float16",
    workers: int | None = None,
    progress: bool = True,
    pixels: bool = True,
) -> SliceCache:
    """Preprocess every slice of ``index`` once into ``cache_root/<key>/``.

    Resumable: series already written (``done.npy``) are skipped, so an
    interrupted build continues where it stopped.  Decoding failures are
    written to ``failures.csv`` and their rows marked not ok.  With
    ``pixels=False`` every slice is only decoded, not stored: ``ok`` and
    ``failures.csv`` for training straight from DICOM (one slice that cannot
    be decoded would stop it mid-epoch), and the cache has no ``images``.
    """
    from tqdm import tqdm

    windows = tuple((float(c), float(w)) for c, w in windows)
    size = (int(size[0]), int(size[1]))
    key = cache_key(index, windows, size, dtype if pixels else "decode-check", data_dir)
    directory = Path(cache_root) / key
    directory.mkdir(parents=True, exist_ok=True)
    cache = SliceCache(directory, windows, size, dtype)
    meta = {"windows": windows, "size": size, "dtype": dtype, "rows": len(index), "pixels": pixels}
    (directory / "meta.json").write_text(json.dumps(meta))
    if (directory / "complete").exists():
        return cache

    shape = (len(index), *size, len(windows))
    if pixels and not cache.images_path.exists():
        np.lib.format.open_memmap(cache.images_path, mode="w+", dtype=dtype, shape=shape).flush()
    done_path = directory / "done.npy"
    series = index.groupby("series_uid", sort=False).indices
    series_ids = list(series)
    done = np.load(done_path) if done_path.exists() else np.zeros(len(series_ids), dtype=bool)
    ok = np.load(cache.ok_path) if cache.ok_path.exists() else np.ones(len(index), dtype=bool)
    failures: list[tuple[int, str]] = []
    todo = [i for i in range(len(series_ids)) if not done[i]]
    jobs = (
        (
            str(cache.images_path) if pixels else "",
            str(data_dir),
            [int(r) for r in series[series_ids[i]]],
            [index["path"].iat[r] for r in series[series_ids[i]]],
            windows,
            size,
            dtype,
        )
        for i in todo
    )
    workers = workers or default_workers()
    bar = tqdm(total=len(index), initial=int(sum(len(series[series_ids[i]]) for i in range(len(series_ids)) if done[i])),
               desc="cache slices" if pixels else "check decoding", unit="slice", disable=not progress)

    def record(i: int, result: list[tuple[int, str]]) -> None:
        for row, error in result:
            ok[row] = False
            failures.append((row, error))
        done[i] = True
        bar.update(len(series[series_ids[i]]))

    try:
        if workers > 1 and len(todo) > 1:
            with _executor(workers) as pool:
                for i, result in zip(todo, pool.map(_cache_series, jobs, chunksize=4)):
                    record(i, result)
                    if bar.n % 2000 < len(series[series_ids[i]]):
                        np.save(done_path, done)
                        np.save(cache.ok_path, ok)
        else:
            for i, job in zip(todo, jobs):
                record(i, _cache_series(job))
    finally:
        bar.close()
        np.save(done_path, done)
        np.save(cache.ok_path, ok)
        if failures:
            pd.DataFrame(
                {"path": [index["path"].iat[r] for r, _ in failures], "error": [e for _, e in failures]}
            ).to_csv(directory / "failures.csv", mode="a", index=False,
                     header=not (directory / "failures.csv").exists())
            logger.warning("%d slices could not be decoded; listed in %s", len(failures), directory / "failures.csv")
    (directory / "complete").touch()
    return cache


# --------------------------------------------------------------------------
# Streaming with tf.data
# --------------------------------------------------------------------------


def neighbour_rows(index: pd.DataFrame, context: int, ok: np.ndarray | None = None) -> np.ndarray:
    """``(N, 2k+1)`` row numbers of each row's z-neighbours (edges repeated).

    Rows that are not ``ok`` are left out of their series (their neighbours
    skip them); their own entry is ``-1``.  Requires ``index`` sorted by
    series then z (as :func:`build_index` returns it).
    """
    n = len(index)
    ok = np.ones(n, dtype=bool) if ok is None else np.asarray(ok, dtype=bool)
    out = np.full((n, 2 * context + 1), -1, dtype=np.int64)
    for rows in index.groupby("series_uid", sort=False).indices.values():
        rows = rows[np.argsort(index["slice_index"].to_numpy()[rows])]
        rows = rows[ok[rows]]
        m = len(rows)
        if m == 0:
            continue
        out[rows] = rows[imaging.context_indices(m, context)]
    return out


class SliceLoader:
    """Loads model inputs ``(B, H, W, C*(2k+1))`` for index rows.

    From a :class:`SliceCache` when given, else by decoding the DICOM files
    (``ichnode.imaging.preprocess_slice``).  The context is stacked with
    ``ichnode.imaging.stack_context`` on the slice and its neighbours.
    """

    def __init__(
        self,
        index: pd.DataFrame,
        neighbours: np.ndarray,
        context: int,
        windows: Sequence[Sequence[float]],
        size: Sequence[int],
        *,
        cache: SliceCache | None = None,
        data_dir: Path | None = None,
    ) -> None:
        if cache is None and data_dir is None:
            raise ValueError("SliceLoader needs a cache or a data_dir")
        self.neighbours = neighbours
        self.context = context
        self.windows = tuple((float(c), float(w)) for c, w in windows)
        self.size = (int(size[0]), int(size[1]))
        self.cache = cache
        self._images = cache.images() if cache is not None else None
        self.paths = None if data_dir is None else [os.path.join(data_dir, p) for p in index["path"]]

    @property
    def channels(self) -> int:
        return len(self.windows) * (2 * self.context + 1)

    def _slices(self, rows: np.ndarray) -> np.ndarray:
        if self._images is not None:
            return self._images[rows]  # cache dtype; converted once after stacking
        import pydicom

        _quiet_pydicom()
        return np.stack(
            [imaging.preprocess_slice(pydicom.dcmread(self.paths[r]), self.windows, self.size) for r in rows]
        )

    def load(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        span = 2 * self.context + 1
        nbrs = self.neighbours[rows]
        if (nbrs < 0).any():
            raise ValueError(f"rows {rows[(nbrs < 0).any(axis=1)].tolist()} are not usable (decoding failed)")
        unique, inverse = np.unique(nbrs.reshape(-1), return_inverse=True)
        slices = self._slices(unique)[inverse].reshape(len(rows), span, *self.size, len(self.windows))
        return _centre_context(slices)


def _centre_context(slices: np.ndarray) -> np.ndarray:
    """``(B, 2k+1, H, W, C)`` neighbour stacks -> ``(B, H, W, (2k+1)*C)`` model inputs.

    The channel layout is ``ichnode.imaging.stack_context``'s (neighbour-major,
    window-minor); :func:`_check_context_layout` asserts that on import, so the
    two cannot drift apart.  Vectorised over the batch: stack_context itself
    would build all 2k+1 outputs of each stack to keep one.
    """
    b, span, h, w, c = slices.shape
    out = np.empty((b, h, w, span, c), dtype=np.float32)
    out[...] = slices.transpose(0, 2, 3, 1, 4)
    return out.reshape(b, h, w, span * c)


def _check_context_layout() -> None:
    rng = np.random.default_rng(0)
    for n, k in ((5, 1), (4, 2), (1, 1), (3, 0)):
        volume = rng.random((n, 3, 2, 3), dtype=np.float32)
        expected = imaging.stack_context(volume, k)
        if not np.array_equal(_centre_context(volume[imaging.context_indices(n, k)]), expected):
            raise RuntimeError("training.rsna disagrees with ichnode.imaging.stack_context on channel layout")


_check_context_layout()


def slice_dataset(
    loader: SliceLoader,
    rows: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    repeat: bool,
    augment: bool = False,
    oversample: float = 0.0,
    hard_rows: np.ndarray | None = None,
    hard_fraction: float = 0.0,
    parallel_calls: int | None = None,
    prefetch: int | None = None,
) -> Any:
    """A ``tf.data.Dataset`` of ``(x (B,H,W,C) float32, y (B,6) float32)``.

    Rows (ints) are shuffled with ``seed`` (reshuffled each epoch), batched,
    then each batch is loaded by ``loader`` in parallel (``numpy_function``,
    ``num_parallel_calls``), optionally augmented (random left-right flip)
    and prefetched.  The batches, their order and their flips follow from
    ``seed`` alone: not from which parallel load finishes first, nor from
    the global random state.  With ``oversample`` > 0 (shuffled, repeated datasets
    only) that fraction of the rows is drawn from the positive slices of each
    subtype in equal parts, so rare subtypes are seen more often.  With
    ``hard_fraction`` > 0 that fraction is drawn from ``hard_rows`` (the
    slices a starting model got most wrong, see ``training.train``).
    """
    import tensorflow as tf

    rows = np.asarray(rows, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.float32)
    autotune = tf.data.AUTOTUNE

    def rows_dataset(part: np.ndarray, part_seed: int) -> Any:
        ds = tf.data.Dataset.from_tensor_slices(part)
        if shuffle:
            ds = ds.shuffle(len(part), seed=part_seed, reshuffle_each_iteration=True)
        return ds.repeat() if repeat else ds

    # (dataset, share of the samples): the rows themselves, then the extra draws.
    sources = []
    if (oversample > 0 or hard_fraction > 0) and (
        not (shuffle and repeat) or not 0 <= oversample < 1 or not 0 <= hard_fraction < 1 - oversample
    ):
        raise ValueError(
            "oversample and hard_fraction need a shuffled, repeated dataset and together less "
            f"than 1, got {oversample} and {hard_fraction}"
        )
    if oversample > 0:
        pools = [rows[labels[rows, j] > 0.5] for j in range(1, len(LABELS))]
        pools = [pool for pool in pools if len(pool)]
        sources += [(rows_dataset(pool, seed + 1 + j), oversample / len(pools)) for j, pool in enumerate(pools)]
    if hard_fraction > 0 and hard_rows is not None and len(hard_rows):
        sources.append((rows_dataset(np.asarray(hard_rows, dtype=np.int64), seed + len(LABELS) + 1), hard_fraction))
    ds = rows_dataset(rows, seed)
    if sources:
        ds = tf.data.Dataset.sample_from_datasets(
            [ds] + [source for source, _ in sources],
            weights=[1.0 - sum(share for _, share in sources)] + [share for _, share in sources],
            seed=seed,
        )
    # Numbered: each batch's flips are drawn from the seed and its number.
    ds = ds.batch(batch_size, drop_remainder=False).enumerate()
    h, w = loader.size
    c = loader.channels
    label_table = tf.constant(labels)

    def load(number: Any, batch_rows: Any) -> tuple[Any, Any]:
        x = tf.numpy_function(loader.load, [batch_rows], tf.float32, stateful=False)
        x = tf.ensure_shape(x, [None, h, w, c])
        if augment:
            # Stateless: a shared random state would hand its draws to the batches
            # in the order the parallel loads happen to finish.
            batch_seed = tf.stack([tf.constant(seed, tf.int64), number])
            draw = tf.random.stateless_uniform([tf.shape(x)[0], 1, 1, 1], seed=batch_seed)
            x = tf.where(draw < 0.5, tf.reverse(x, axis=[2]), x)
        return x, tf.gather(label_table, batch_rows)

    # In order, not as the parallel loads finish.
    ds = ds.map(load, num_parallel_calls=parallel_calls or autotune, deterministic=True)
    return ds.prefetch(prefetch or autotune)


def iter_series(index: pd.DataFrame, ok: np.ndarray | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """``(series_uid, rows in z order)`` for every series (rows not ``ok`` left out)."""
    ok = np.ones(len(index), dtype=bool) if ok is None else np.asarray(ok, dtype=bool)
    z = index["slice_index"].to_numpy()
    for series_uid, rows in index.groupby("series_uid", sort=False).indices.items():
        rows = rows[np.argsort(z[rows])]
        rows = rows[ok[rows]]
        if len(rows):
            yield str(series_uid), rows


def default_cache_dir(data_dir: Path) -> Path:
    """``DIR/.ichnode-cache`` when ``DIR`` is writable, else under ``~/.cache/ichnode``."""
    data_dir = Path(data_dir).resolve()
    if os.access(data_dir, os.W_OK):
        return data_dir / ".ichnode-cache"
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "ichnode" / digest
