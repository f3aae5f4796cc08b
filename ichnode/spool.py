"""The spool folder: every received instance as a DICOM file, written durably.

Layout under ``storage.spool_dir``::

    .tmp/                          temporary files, same filesystem as the rest
    .tmp/receiver-N/, .tmp/worker/ each receiver process's, and the worker's
                                   preprocessed volumes in transit (not durable)
    .locks/                        lock files (Spool.instance_lock, Spool.hold_role)
    .installation                  whose spool it is (spool_owner)
    instances/<study>/<series>/<sop>.dcm
    reports/<study>/<sop>.dcm      report objects waiting for or after delivery

Retention removes a series or study folder once it has emptied it; a file
moved in is given its folders again if they went meanwhile.

A file is first written under ``.tmp``, flushed to disk with fsync, then
renamed into place and its folder fsynced, so after a crash or power loss a
file is either whole at its final path or absent.
"""

from __future__ import annotations

import errno
import filecmp
import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UNSAFE = re.compile(r"[^0-9A-Za-z._-]")
# How a replaced name ends (safe_name): a UID that ends so itself is replaced too.
_HASH_SUFFIX = re.compile(r"-[0-9a-f]{8}$")
# Instance locks: files the SOP Instance UIDs are spread over.
LOCK_STRIPES = 256
INSTANCES = "instances"
OWNER_FILE = ".installation"


def safe_name(uid: str) -> str:
    """A file name for a UID; real-world UIDs (``ID_1f6d1e8aeb``) may hold any character.

    Characters outside ``[0-9A-Za-z._-]`` are replaced, and so is a leading
    dot: a sender's UID must never name ``..`` or a hidden folder such as
    ``.tmp``. A short hash keeps replaced names unique. A UID that ends as
    such a name does (``-`` and 8 hex digits) takes a hash too, so that it
    never names another UID's file (``1.2.3_4-cc81865a`` is ``1.2.3/4``'s).
    """
    cleaned = _UNSAFE.sub("_", uid.strip())[:96]
    if cleaned.startswith("."):
        cleaned = "_" + cleaned[1:]
    if cleaned != uid or not cleaned or _HASH_SUFFIX.search(cleaned):
        cleaned += "-" + hashlib.sha1(uid.encode()).hexdigest()[:8]
    return cleaned


class SpoolInUse(RuntimeError):
    """Another process already holds this role (receiver, worker, dispatcher) of the spool."""


class SpoolOfAnotherDatabase(RuntimeError):
    """The spool holds the images of another database than the node's."""


class Spool:
    """The spool folder and its free-space guard."""

    def __init__(self, root: Path, *, min_free_mb: int = 0, fsync: bool = True) -> None:
        self.root = Path(root)
        self.min_free_mb = min_free_mb
        self.fsync = fsync
        self.tmp_dir = self.root / ".tmp"
        self.instances_dir = self.root / INSTANCES
        self.reports_dir = self.root / "reports"
        self.locks_dir = self.root / ".locks"
        for folder in (self.tmp_dir, self.instances_dir, self.reports_dir, self.locks_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # -- space -----------------------------------------------------------
    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 2**20

    def room_shortage(self) -> str | None:
        """None while the spool has ``storage.min_free_mb`` free (room for the
        datasets written out whole before they can be refused), else how much
        is free; a shortage is remembered (:meth:`room_short_at`)."""
        free = self.free_mb()
        if free >= self.min_free_mb:
            return None
        try:
            self._room_marker.touch()
        except OSError:
            pass  # the shortage is then seen again at the next look
        return f"{free:.0f} MB free in the spool, less than storage.min_free_mb ({self.min_free_mb} MB)"

    def room_short_at(self) -> float | None:
        """When (``time.time()``) the spool was last found short of room, by
        any process of the node, before or since a restart; None once forgotten."""
        try:
            return self._room_marker.stat().st_mtime
        except FileNotFoundError:
            return None

    def forget_room_shortage(self) -> None:
        self._room_marker.unlink(missing_ok=True)

    @property
    def _room_marker(self) -> Path:
        return self.root / ".room-short"

    # -- the instance lock ------------------------------------------------
    @contextmanager
    def instance_lock(self, sop_instance_uid: str) -> Iterator[None]:
        """Held while an instance's file and row change together.

        Two associations storing the same SOP Instance at once, or a purge
        meeting a resend, would otherwise interleave their renames, row
        updates and removals, and leave a row whose file is gone. An
        ``flock``, so that it also holds between the node's receiver
        processes; spread over :data:`LOCK_STRIPES` files.
        """
        stripe = hashlib.sha1(sop_instance_uid.encode()).digest()[0] % LOCK_STRIPES
        fd = self._lock_file(f"{stripe:02x}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def hold_role(self, role: str) -> int:
        """Claim ``role`` (receiver, worker, dispatcher) of this spool while this
        process runs; returns the file descriptor to close to let it go.

        A second receiver or worker on one spool would remove the first's
        files in transit at its start, and a second worker or dispatcher would
        requeue the first's work: it is refused with :class:`SpoolInUse`.
        """
        fd = self._lock_file(role)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolInUse(f"another ichnode {role} is running on the spool {self.root}") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _lock_file(self, name: str) -> int:
        return os.open(self.locks_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)

    # -- paths -----------------------------------------------------------
    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Path of an instance relative to the spool root."""
        return f"instances/{safe_name(study_uid)}/{safe_name(series_uid)}/{safe_name(sop_uid)}.dcm"

    def report_path(self, study_uid: str, sop_uid: str) -> str:
        return f"reports/{safe_name(study_uid)}/{safe_name(sop_uid)}.dcm"

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    # -- durable writes --------------------------------------------------
    def commit_file(self, source: Path, relative: str) -> Path:
        """Move a complete file into place durably; returns its final path.

        ``source`` should be on the spool filesystem (``tmp_dir``); from another
        filesystem it is copied to ``tmp_dir`` first, since a rename cannot
        cross filesystems.
        """
        target = self.root / relative
        self.sync_file(source)
        try:
            self._move_into_folder(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            staged = self.tmp_dir / (target.name + ".part")
            shutil.copyfile(source, staged)
            if self.fsync:
                _fsync_path(staged)
            self._move_into_folder(staged, target)
        if self.fsync:
            _fsync_path(target.parent)
        return target

    def _move_into_folder(self, source: Path, target: Path) -> None:
        """Rename ``source`` to ``target``, making the folders it needs.

        Retention removes the folders it empties (:meth:`remove`), and may do
        so just after they were found or made here: then they are made again.
        """
        for attempt in range(3):
            try:
                self._make_parents(target.parent)
                os.replace(source, target)
                return
            except FileNotFoundError:
                if attempt == 2 or target.parent.is_dir():
                    raise  # not a folder gone: the source is missing

    def sync_file(self, path: Path) -> None:
        """Flush a file's content to disk (with ``storage.fsync``)."""
        if self.fsync:
            _fsync_path(path)

    def same_content(self, path: Path, relative: str) -> bool:
        """Whether ``path`` holds the very bytes of the spooled file ``relative``
        (sizes first: most differing copies stop there)."""
        return filecmp.cmp(path, self.root / relative, shallow=False)

    def _make_parents(self, folder: Path) -> None:
        if folder.is_dir():
            return
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
            if self.fsync:
                # The new folder's entry in its parent must reach the disk too.
                _fsync_path(path.parent)

    def remove(self, relative: str, *, remove_empty_folders: bool = False) -> None:
        """Delete a spooled file; with ``remove_empty_folders``, also the folders
        this leaves empty (its series folder, then its study folder), never
        ``instances`` or ``reports`` themselves."""
        path = self.root / relative
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        if not remove_empty_folders:
            return
        tops = (self.instances_dir, self.reports_dir)
        folder = path.parent
        while folder not in tops and any(folder.is_relative_to(top) for top in tops):
            try:
                folder.rmdir()
            except OSError:
                # Not empty: an image of the series arrived meanwhile, and keeps it.
                return
            folder = folder.parent

    def clear_tmp(self, folder: Path | None = None) -> int:
        """Delete leftovers of interrupted writes in ``folder`` (default: ``tmp_dir`` itself,
        not its subfolders, which belong to receiver processes); returns how many."""
        count = 0
        for path in (folder or self.tmp_dir).iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                count += 1
        return count

    def iter_instance_files(self) -> Iterator[Path]:
        yield from self.instances_dir.rglob("*.dcm")

    def claim_for(self, installation: str, *, database_is_empty: bool) -> None:
        """Tie the spool to the database of ``installation`` (:func:`ichnode.db.installation`);
        :class:`SpoolOfAnotherDatabase` when it is another's (:func:`spool_owner`)."""
        if spool_owner(self.root, installation, database_is_empty=database_is_empty) is None:
            marker = self.root / OWNER_FILE
            staged = marker.with_suffix(".part")
            staged.write_text(installation, encoding="utf-8")
            os.replace(staged, marker)


def spool_owner(root: Path, installation: str | None, *, database_is_empty: bool) -> str | None:
    """The installation whose spool ``root`` is, None while it is nobody's; read
    without making or changing anything (``check-config``, a node before it
    makes a new database).

    A node started on another (or a new, empty) database over a spool that
    holds images would index them again as new, score every series of the
    retention period again and send all their reports to the PACS again,
    under new UIDs: :class:`SpoolOfAnotherDatabase`, naming the ways out, when
    the spool is not that of ``installation`` (:func:`ichnode.db.installation`;
    None for a database not made yet, whose installation will be new).
    """
    root = Path(root)
    try:
        owner: str | None = (root / OWNER_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        owner = None
    if owner is None and database_is_empty and next((root / INSTANCES).rglob("*.dcm"), None) is not None:
        owner = "a database this node no longer uses"
    if owner is not None and owner != installation:
        raise SpoolOfAnotherDatabase(
            f"the spool {root} (storage.spool_dir) holds the images of another database "
            f"({owner or 'one from before installation ids'}); point database.url back to it, or give "
            "this database a spool of its own: on this one every retained series would be scored and "
            "reported to the PACS again"
        )
    return owner


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
