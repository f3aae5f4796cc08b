"""The inference worker's CPU work, run in helper processes: reading and
preprocessing a series, and building and spooling its report objects.

Both are CPU-bound Python (DICOM parsing, numpy, highdicom). In threads they
contend for one interpreter lock with each other and with the model's
dispatch, which on a many-core GPU host left the GPU idle; in processes they
use every core. Nothing here imports Keras, so the processes start light.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread

from . import imaging
from .config import SeriesConfig
from .reports import ReportContent, ReportUids, build_sr, build_summary_image, evidence_headers
from .selection import skip_reason
from .spool import Spool


def default_processes() -> int:
    """All cores but one for the model's own dispatch, and at least two."""
    return max(2, (os.cpu_count() or 2) - 1)


def process_pool(processes: int) -> ProcessPoolExecutor:
    # spawn: children start from a clean interpreter, never from a fork of a
    # process that holds the model's threads and GPU context.
    return ProcessPoolExecutor(
        max_workers=processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    )


def _exit_with_parent(parent: int) -> None:
    """End this helper once the node that started it is gone, even killed by SIGKILL
    (its pipes may stay open in other helpers, so it would otherwise wait forever)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="ichnode-parent-watch", daemon=True).start()


def ready() -> int:
    """Nothing: a process that runs it has imported this module and its libraries."""
    return os.getpid()


@dataclass(frozen=True)
class InstanceRow:
    """What the worker knows of one stored instance."""

    id: int
    path: str  # relative to the spool root
    sop_class_uid: str
    sop_instance_uid: str


@dataclass
class PreparedVolume:
    """A series read and preprocessed: the model input, or why there is none."""

    volume: np.ndarray | None = None  # (N, H, W, windows), z order
    volume_file: str | None = None  # where a helper left the volume (see receive_volume)
    sop_uids: list[str] = field(default_factory=list)  # scored slices, same order
    sop_class_uids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    quarantined: dict[int, str] = field(default_factory=dict)  # instance id -> reason
    skip: str | None = None
    seconds: float = 0.0

    def receive_volume(self) -> None:
        """Map the volume a helper process left in a file, and delete the file.

        A volume is large (300 slices: ~240 MB): mapped from the page cache
        it costs the worker nothing until its batches are stacked (on the
        stacking thread), where a pickle through the pool's pipe would be
        copied twice under the worker's interpreter lock. The mapping keeps
        the deleted file's pages until the volume is dropped.
        """
        if self.volume_file is not None:
            try:
                self.volume = np.load(self.volume_file, mmap_mode="r")
            finally:
                os.unlink(self.volume_file)
                self.volume_file = None


def prepare_series(
    spool_root: Path,
    rows: Sequence[InstanceRow],
    rules: SeriesConfig,
    windows: Sequence[tuple[float, float]],
    size: tuple[int, int],
    handoff_dir: Path,
) -> PreparedVolume:
    """Read the files, check eligibility, decode and preprocess in z order; the
    volume is left in a file in ``handoff_dir`` (:meth:`PreparedVolume.receive_volume`)."""
    started = time.perf_counter()
    prepared = PreparedVolume()
    readable = []
    for row in rows:
        try:
            # Each file is read once; its pixels are decoded only if scored.
            readable.append((row, dcmread(Path(spool_root) / row.path)))
        except Exception as exc:
            prepared.quarantined[row.id] = f"unreadable file: {exc}"
    prepared.skip = skip_reason([ds for _, ds in readable], [row.sop_class_uid for row, _ in readable], rules)
    if prepared.skip is None:
        slices = []
        for index in imaging.order_slices([ds for _, ds in readable]):
            row, ds = readable[index]
            try:
                slices.append(imaging.preprocess_slice(ds, windows, size))
            except Exception as exc:
                prepared.quarantined[row.id] = f"cannot decode pixels: {type(exc).__name__}: {exc}"
                continue
            prepared.sop_uids.append(row.sop_instance_uid)
            prepared.sop_class_uids.append(row.sop_class_uid)
            prepared.paths.append(row.path)
        if slices:
            prepared.volume_file = str(Path(handoff_dir) / f"volume-{uuid.uuid4().hex}.npy")
            np.save(prepared.volume_file, np.stack(slices))
        else:
            prepared.skip = "no slice could be decoded"
    prepared.seconds = time.perf_counter() - started
    return prepared


def write_reports(
    spool: Spool,
    study_uid: str,
    key_path: str,
    slices: Sequence[tuple[str, str]],
    content: ReportContent,
    uids: ReportUids,
    *,
    sr: bool,
    summary_image: bool,
) -> tuple[list[tuple[str, str, str]], float]:
    """Build the report objects of a scored series and spool them.

    ``key_path`` is the spooled key slice, ``slices`` the (SOP Class UID, SOP
    Instance UID) of the scored slices: only the key slice is read again.
    Returns (kind, SOP Instance UID, spool path) of each object, and the
    seconds it took.
    """
    started = time.perf_counter()
    key = dcmread(spool.absolute(key_path))
    built = []
    if sr:
        built.append(("sr", build_sr(evidence_headers(key, slices), content, uids=uids)))
    if summary_image:
        built.append(("summary", build_summary_image(key, imaging.to_hu(key), content, uids=uids)))
    written = []
    for kind, dataset in built:
        relative = spool.report_path(study_uid, dataset.SOPInstanceUID)
        staged = spool.tmp_dir / f"{dataset.SOPInstanceUID}.part"
        dataset.save_as(staged, enforce_file_format=True)
        spool.commit_file(staged, relative)
        written.append((kind, str(dataset.SOPInstanceUID), relative))
    return written, time.perf_counter() - started
