"""The inference worker's CPU work, run in helper processes: reading and
preprocessing a series, and building and spooling its report objects.

Both are CPU-bound Python (DICOM parsing, numpy, highdicom). In threads they
contend for one interpreter lock with each other and with the model's
dispatch, which on a many-core GPU host left the GPU idle; in processes they
use every core. Nothing here imports Keras, so the processes start light.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from . import imaging
from .logs import quiet_source_data_warnings
from .config import SeriesConfig
from .reports import ReportContent, ReportUids, build_sr, build_summary_image, evidence_headers, prime
from .selection import skip_reason, stray_slices
from .spool import Spool

logger = logging.getLogger(__name__)

# Errors of the moment, not of the file: short of memory or file descriptors,
# a read that failed. A slice is not quarantined for good for one of them.
_SHORT_OF = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EIO}


class ShortOfResources(Exception):
    """A slice could not be read or decoded for want of what the helper had
    at that moment (memory, file descriptors); its series is scored again."""


def _check_not_short_of(exc: Exception, path: str) -> None:
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno in _SHORT_OF):
        raise ShortOfResources(f"{path}: {type(exc).__name__}: {exc}") from exc


def default_processes() -> int:
    """All cores but one for the model's own dispatch, and at least two."""
    return max(2, (os.cpu_count() or 2) - 1)


def process_pool(processes: int) -> ProcessPoolExecutor:
    # spawn: children start from a clean interpreter, never from a fork of a
    # process that holds the model's threads and GPU context.
    return ProcessPoolExecutor(
        max_workers=processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_helper,
        initargs=(os.getpid(),),
    )


def _start_helper(parent: int) -> None:
    """What each helper process does first."""
    # The node stops its helpers itself, once their series are done: Ctrl-C in
    # a terminal, which signals the whole process group, must not kill one
    # mid-series. SIGTERM stays: the pool ends its helpers with it when one
    # of them dies (systemd's unit signals the main process only). SIGHUP is
    # ignored, as the node ignores it (inherited, where the node started it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    imaging.keep_freed_memory()
    quiet_source_data_warnings()  # spawned: without the node's log set-up
    try:
        prime()
    except Exception:  # a real report then fails with its reason; the helper still decodes
        logger.warning("building a throwaway report at the start of a helper process failed", exc_info=True)
    _exit_with_parent(parent)


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
    volume_file: str | None = None  # where helpers left the volume (see receive_volume)
    rows: list[InstanceRow] = field(default_factory=list)  # the slices, z order: one per volume row
    quarantined: dict[int, str] = field(default_factory=dict)  # instance id -> reason
    skip: str | None = None
    seconds: float = 0.0  # helper-process seconds spent on it

    @property
    def sop_uids(self) -> list[str]:
        return [row.sop_instance_uid for row in self.rows]

    @property
    def sop_class_uids(self) -> list[str]:
        return [row.sop_class_uid for row in self.rows]

    @property
    def paths(self) -> list[str]:
        return [row.path for row in self.rows]

    def receive_volume(self, min_slices: int = 1) -> None:
        """Map the volume the helpers left in a file, delete the file, and drop
        the rows of slices that could not be decoded; fewer than ``min_slices``
        left, the series is skipped, as one received with fewer would be.

        A volume is large (300 slices: ~240 MB): mapped from the page cache
        it costs the worker nothing until its batches are gathered (on the
        gathering thread), where a pickle through the pool's pipe would be
        copied twice under the worker's interpreter lock. The mapping keeps
        the deleted file's pages until the volume is dropped.
        """
        if self.volume_file is None:
            return
        try:
            volume = np.load(self.volume_file, mmap_mode="r")
        finally:
            os.unlink(self.volume_file)
            self.volume_file = None
        keep = [index for index, row in enumerate(self.rows) if row.id not in self.quarantined]
        if not keep:
            self.rows = []
            self.skip = "no slice could be decoded"
        elif len(keep) < min_slices:
            self.rows = []
            self.skip = f"{len(keep)} slices could be decoded, fewer than series.min_slices ({min_slices})"
        elif len(keep) < len(self.rows):
            self.rows = [self.rows[index] for index in keep]
            self.volume = volume[keep]  # a copy, only when slices were quarantined
        else:
            self.volume = volume


def new_volume_file(
    path: str | Path, slices: int, windows: Sequence[tuple[float, float]], size: tuple[int, int]
) -> None:
    """Create the ``.npy`` file at ``path`` for a series' volume, for helpers to
    fill (``decode_slices``). Raises ``OSError`` when the disk cannot hold it."""
    try:
        volume = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(slices, *size, len(windows)))
        _reserve(path, volume.offset + volume.nbytes)
    except OSError:
        Path(path).unlink(missing_ok=True)
        raise


def _reserve(path: str | Path, length: int) -> None:
    """Reserve the file's blocks, so that a full disk is an error here, not a
    SIGBUS in the helper that writes a page the file system cannot hold. A
    file system that cannot reserve (or a platform without the call) goes on
    without."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    finally:
        os.close(fd)


# Values longer than this (a vendor's raw-data blob) are read only if used,
# not held for every slice of a series at once; 512 x 512 Pixel Data is
# read with the header.
_DEFER_BYTES = 1 << 20


def _read_and_order(
    spool_root: Path, rows: Sequence[InstanceRow], rules: SeriesConfig, prepared: PreparedVolume, *, pixels: bool
) -> list[tuple[InstanceRow, Dataset]]:
    """Read each file once (with its pixels or not), quarantine the unreadable
    and the images that are not slices of the series' volume, decide
    eligibility; the slices of an eligible series in z order."""
    readable = []
    for row in rows:
        try:
            readable.append(
                (row, dcmread(Path(spool_root) / row.path, stop_before_pixels=not pixels, defer_size=_DEFER_BYTES))
            )
        except Exception as exc:
            _check_not_short_of(exc, row.path)
            prepared.quarantined[row.id] = f"unreadable file: {exc}"
    strays = stray_slices([ds for _, ds in readable])
    for index, reason in strays.items():
        prepared.quarantined[readable[index][0].id] = f"not a slice of the series' volume: {reason}"
    readable = [pair for index, pair in enumerate(readable) if index not in strays]
    prepared.skip = skip_reason([ds for _, ds in readable], [row.sop_class_uid for row, _ in readable], rules)
    if prepared.skip is not None:
        return []
    try:
        order = imaging.order_slices([ds for _, ds in readable])
    except ValueError as exc:
        prepared.skip = f"slices cannot be ordered: {exc}"
        return []
    ordered = [readable[index] for index in order]
    prepared.rows = [row for row, _ in ordered]
    return ordered


def _decode_into(
    volume_file: str,
    start: int,
    slices: Sequence[tuple[InstanceRow, Dataset | None]],
    windows: Sequence[tuple[float, float]],
    size: tuple[int, int],
    spool_root: Path,
) -> dict[int, str]:
    """Preprocess ``slices`` into rows ``start ...`` of ``volume_file`` (from
    :func:`new_volume_file`): each row with its dataset, or None to read its
    file here. Returns the quarantined: instance id -> reason."""
    layout = np.load(volume_file, mmap_mode="r")  # reads the header only
    row_bytes = layout[0].nbytes
    quarantined = {}
    # Written with write(), not through a memory map, where each fresh page
    # of the file is a page fault (~20% of a helper's time per slice); never
    # synced: the worker maps the same pages from the page cache.
    with open(volume_file, "r+b") as out:
        for offset, (row, ds) in enumerate(slices):
            try:
                ds = ds if ds is not None else dcmread(Path(spool_root) / row.path, defer_size=_DEFER_BYTES)
                image = imaging.preprocess_slice(ds, windows, size)
                # Exactly one row's bytes, or an error: never a neighbour's.
                image = np.ascontiguousarray(image, dtype=layout.dtype).reshape(layout.shape[1:])
            except Exception as exc:
                _check_not_short_of(exc, row.path)
                quarantined[row.id] = f"cannot decode pixels: {type(exc).__name__}: {exc}"
                continue
            out.seek(layout.offset + (start + offset) * row_bytes)
            out.write(image.data)
    return quarantined


def prepare_series(
    spool_root: Path,
    rows: Sequence[InstanceRow],
    rules: SeriesConfig,
    windows: Sequence[tuple[float, float]],
    size: tuple[int, int],
    volume_file: str,
) -> PreparedVolume:
    """Read the files, check eligibility, decode and preprocess in z order; the
    volume is left in ``volume_file`` (:meth:`PreparedVolume.receive_volume`),
    a path the worker chose, so that it can remove the file if this fails."""
    started = time.perf_counter()
    prepared = PreparedVolume()
    ordered = _read_and_order(spool_root, rows, rules, prepared, pixels=True)
    if ordered:
        new_volume_file(volume_file, len(ordered), windows, size)
        prepared.volume_file = volume_file
        prepared.quarantined.update(_decode_into(volume_file, 0, ordered, windows, size, spool_root))
    prepared.seconds = time.perf_counter() - started
    return prepared


def order_series(spool_root: Path, rows: Sequence[InstanceRow], rules: SeriesConfig) -> PreparedVolume:
    """The first step of a series prepared by several helpers: read the headers,
    check eligibility, order the slices. ``decode_slices`` does the rest."""
    started = time.perf_counter()
    prepared = PreparedVolume()
    _read_and_order(spool_root, rows, rules, prepared, pixels=False)
    prepared.seconds = time.perf_counter() - started
    return prepared


def decode_slices(
    spool_root: Path,
    rows: Sequence[InstanceRow],
    windows: Sequence[tuple[float, float]],
    size: tuple[int, int],
    volume_file: str,
    start: int,
) -> tuple[dict[int, str], float]:
    """Decode and preprocess ``rows`` into rows ``start ...`` of ``volume_file``
    (from :func:`new_volume_file`); returns the quarantined and the seconds."""
    started = time.perf_counter()
    quarantined = _decode_into(volume_file, start, [(row, None) for row in rows], windows, size, spool_root)
    return quarantined, time.perf_counter() - started


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
        try:
            dataset.save_as(staged, enforce_file_format=True)
            spool.commit_file(staged, relative)
        except BaseException:
            # A full disk keeps no part of them: not this one, nor one written before.
            staged.unlink(missing_ok=True)
            for _, _, done in written:
                spool.remove(done)
            raise
        written.append((kind, str(dataset.SOPInstanceUID), relative))
    return written, time.perf_counter() - started
