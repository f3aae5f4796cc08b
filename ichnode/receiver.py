"""The DICOM receiver: Verification and Storage SCP, access control, C-STORE handler.

The C-STORE handler does the least possible on the association thread: the
dataset arrives in a temporary file (pynetdicom's chunked receive, into a
:class:`ReceivedFile` of the receiver's :class:`ReceivingFolder`), the
handler reads its header, fsyncs it, renames it into the spool, records one
row, and only then answers Success. It never decodes pixels.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, dimse_messages, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from . import db
from .config import AccessConfig, Config
from .dicomfile import TooLarge, Truncated, check_whole, read_elements, same_data_set
from .scu import disable_nagle
from .series import InstanceHeader, Registration, register_instance
from .spool import Spool

logger = logging.getLogger(__name__)

# Receive each dataset straight into a file instead of memory; the handler
# then only moves that file (see event.dataset_path).
_config.STORE_RECV_CHUNKED_DATASET = True
# Real-world files carry UIDs such as "ID_1f6d1e8aeb"; accept them.
_config.ENFORCE_UID_CONFORMANCE = False

# Storage statuses (PS3.4 B.2.3 and the Storage Service Class).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

_STORAGE_CLASSES = {context.abstract_syntax for context in AllStoragePresentationContexts}
# What the node's own reports are stored as (reports.py).
_REPORT_CLASSES = {Comprehensive3DSRStorage, SecondaryCaptureImageStorage}

CT_STORAGE_CLASSES = (CTImageStorage, EnhancedCTImageStorage)
# How long a host name of access.allow is trusted to keep its addresses.
HOST_LOOKUP_SECONDS = 60.0
# How often the receiving folder is cleared of abandoned partial files
# (besides at each association request).
SWEEP_SECONDS = 30.0
# How long a connection may wait before its association request (and a peer
# before it closes the connection after a release or a rejection): it holds
# one of node.max_associations meanwhile (pynetdicom's default: 30 s).
REQUEST_SECONDS = 10
# The largest PDU peers may send (pynetdicom's, and the node's, unit of
# reading: a PDU is read whole and copied several times). A sender that takes
# the offer (pynetdicom does) sends a data set in PDUs of this size; offered
# no limit, it sent a 300 MB image in one, and the node took 1.3 GB for it.
MAX_PDU_BYTES = 2**20


def decodable_transfer_syntaxes() -> list[UID]:
    """Transfer syntaxes whose pixel data this installation can decode.

    The uncompressed ones, plus every compressed syntax for which pydicom has
    an available decoder (pylibjpeg, pyjpegls, ...), so CT is accepted exactly
    in the encodings the worker can read.
    """
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
    for uid in AllTransferSyntaxes:
        uid = UID(uid)
        if uid in syntaxes or not uid.is_compressed:
            continue
        try:
            if get_decoder(uid).is_available:
                syntaxes.append(uid)
        except NotImplementedError:
            continue
    return syntaxes


@dataclass(frozen=True)
class Rejection:
    result: int  # 1 permanent, 2 transient
    source: int
    diagnostic: int
    reason: str


class AccessPolicy:
    """Default-deny allowlist of calling AE titles, each optionally bound to a host."""

    def __init__(self, access: AccessConfig, called_ae_title: str) -> None:
        self.called_ae_title = called_ae_title
        self.allow = access.allow
        self._host_cache: dict[str, tuple[float, set[str]]] = {}  # host -> (when resolved, addresses)

    def may_connect(self, host: str) -> bool:
        """Whether an entry could let a peer at ``host`` in (one for any host,
        or one naming it): a connection from anywhere else is closed before
        it holds one of node.max_associations."""
        host = plain_address(host)
        return any(peer.host is None or host in self._addresses(peer.host) for peer in self.allow)

    def check(self, calling_ae: str, called_ae: str, host: str) -> Rejection | None:
        """None when the association may proceed, else why it may not."""
        host = plain_address(host)
        if called_ae.strip() != self.called_ae_title:
            return Rejection(1, 1, 7, f"called AE title {called_ae!r} is not {self.called_ae_title!r}")
        calling = calling_ae.strip()
        matches_ae = [peer for peer in self.allow if peer.ae_title in ("*", calling)]
        if not matches_ae:
            return Rejection(1, 1, 3, f"calling AE title {calling!r} is not in access.allow")
        for peer in matches_ae:
            if peer.host is None or host in self._addresses(peer.host):
                return None
        return Rejection(1, 1, 3, f"calling AE title {calling!r} is not allowed from host {host}")

    def _addresses(self, host: str) -> set[str]:
        # Allow entries may name hosts: resolved at most once a minute, not per
        # association; a failed lookup is not kept (the next association tries again).
        cached = self._host_cache.get(host)
        if cached is not None and time.monotonic() - cached[0] < HOST_LOOKUP_SECONDS:
            return cached[1]
        try:
            addresses = host_addresses(host)
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode ("a..b")
            logger.warning("cannot resolve %s of access.allow: %s", host, exc)
            return {host}
        self._host_cache[host] = (time.monotonic(), addresses)
        return addresses


def host_addresses(host: str) -> set[str]:
    """The addresses a host name (or address) stands for, itself included;
    OSError when it does not resolve."""
    return {plain_address(info[4][0]) for info in socket.getaddrinfo(host, None)} | {host}


def plain_address(address: str) -> str:
    """A peer's address as access.allow names it: an IPv4 peer of a node
    listening on "::" (every interface) arrives as ::ffff:a.b.c.d."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # a name
    return str(getattr(ip, "ipv4_mapped", None) or ip)


class ReceivedFile:
    """The file one incoming dataset is written to, given to pynetdicom in
    place of its NamedTemporaryFile.

    pynetdicom writes it in its reactor thread, where an error (a full or
    read-only filesystem) would abort the association with a traceback and
    leave the part written behind. Here the error is kept for the C-STORE
    handler to answer 0xA700, the part written is given back at once, and the
    rest of the dataset is read off the network and dropped.
    """

    def __init__(self, folder: Path) -> None:
        self.error: OSError | None = None
        self._fd = -1
        # Closed by pynetdicom, once the C-STORE is answered; a file that could
        # not be made is not, so that its error is kept for the handler.
        self.closed = False
        try:
            self._fd, self.name = tempfile.mkstemp(suffix=".dcm", dir=folder)
        except OSError as exc:
            self.error = exc
            self.name = str(folder / f"unwritable-{uuid.uuid4().hex}.dcm")  # pynetdicom needs a path

    @property
    def file(self) -> ReceivedFile:
        return self  # pynetdicom flushes NamedTemporaryFile.file

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view and self.error is None:
            try:
                view = view[os.write(self._fd, view) :]
            except OSError as exc:
                self.error = exc
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)  # give the room back now
        return len(data)

    def flush(self) -> None:
        """Nothing to flush: each write goes straight to the file."""

    def close(self) -> None:
        self.closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ReceivingFolder:
    """A receiver process's folder of incoming datasets (``.tmp/receiver-N``),
    and the association writing each file.

    A file is its association's until pynetdicom closes it (the C-STORE was
    answered: the file was moved into the spool or is removed). A file whose
    association ended first (a transfer cut off, a C-STORE that came in as
    the association was aborted, an association whose thread died) is
    abandoned: :meth:`sweep` removes it, and any file an earlier run left.
    """

    def __init__(self, path: Path) -> None:
        path.mkdir(exist_ok=True)
        self.path = path
        self._open: dict[str, tuple[threading.Thread, ReceivedFile]] = {}  # file name -> (association, file)
        # Held while a file is made and listed, so that a sweep never takes it for abandoned.
        self._lock = threading.Lock()
        self._next_sweep = time.monotonic() + SWEEP_SECONDS

    def open(self, association: threading.Thread) -> ReceivedFile:
        with self._lock:
            received = ReceivedFile(self.path)
            self._open[Path(received.name).name] = (association, received)
        return received

    def write_error(self, path: Path) -> OSError | None:
        """What stopped the dataset in ``path`` from being written whole, if anything."""
        entry = self._open.get(path.name)
        return entry[1].error if entry is not None else None

    def probe(self) -> OSError | None:
        """Why no dataset can be written now (a read-only or full filesystem), or None."""
        with self._lock:
            probe = ReceivedFile(self.path)
            probe.write(b"\0")
            probe.close()
            with contextlib.suppress(OSError):
                os.unlink(probe.name)
        return probe.error

    def sweep(self) -> int:
        """Remove every file that no open association is writing; returns how many."""
        removed = 0
        with self._lock:
            for name, (association, received) in list(self._open.items()):
                if received.closed or not association.is_alive():
                    received.close()  # an abandoned file's room comes back only once it is closed
                    del self._open[name]
            # A read-only spool keeps its files until a sweep once it is writable.
            with contextlib.suppress(OSError):
                for path in self.path.iterdir():
                    if path.name not in self._open and path.is_file():
                        path.unlink(missing_ok=True)
                        removed += 1
        if removed:
            logger.warning("removed %d partial files of transfers that did not finish", removed)
        return removed

    def sweep_if_due(self) -> None:
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_SECONDS
            self.sweep()


def _open_received_dataset(*args: Any, **kwargs: Any) -> Any:
    """Stands in for NamedTemporaryFile in pynetdicom's DIMSE decoder, which
    calls it in an association's reactor thread for each incoming C-STORE
    dataset: the node's associations get a :class:`ReceivedFile`, any other
    AE in this process what pynetdicom would have made."""
    association = getattr(threading.current_thread(), "assoc", None)
    receiving = getattr(getattr(association, "ae", None), "receiving", None)
    if association is None or receiving is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    return receiving.open(association)


dimse_messages.NamedTemporaryFile = _open_received_dataset  # type: ignore[assignment]

_decode_message = dimse_messages.DIMSEMessage.decode_msg


def _decode_message_or_abort(message: Any, primitive: Any, assoc: Any = None) -> bool:
    """pynetdicom's DIMSEMessage.decode_msg, but for a C-STORE-RQ to the node
    whose command lacks the UIDs its chunked receive writes in the received
    file's meta: that raised in the association's reactor thread, which died
    with a traceback. Here the association is aborted, as pynetdicom aborts
    one whose DIMSE message it cannot decode, with one warning."""
    try:
        return _decode_message(message, primitive, assoc)
    except AttributeError:
        command = getattr(message, "command_set", None)
        needed = ("AffectedSOPClassUID", "AffectedSOPInstanceUID")
        missing = [keyword for keyword in needed if command is not None and keyword not in command]
        received = getattr(message, "_data_set_file", None)
        if not (isinstance(message, dimse_messages.C_STORE_RQ) and missing and isinstance(received, ReceivedFile)):
            raise
    received.close()
    Path(received.name).unlink(missing_ok=True)
    message._data_set_file = None  # removed already: no transfer cut off (discard_partial_transfer)
    logger.warning("aborted the association from %s: a C-STORE without %s", _peer(assoc), " and ".join(missing))
    assoc.dul.event_queue.put("Evt19")  # an invalid PDU: A-ABORT
    return False


dimse_messages.DIMSEMessage.decode_msg = _decode_message_or_abort  # type: ignore[method-assign]


def _peer(assoc: Any) -> str:
    """The peer as ``AE@address:port`` (``address:port`` before its association request)."""
    address = f"{plain_address(assoc.requestor.address)}:{assoc.requestor.port}"
    request = assoc.requestor.primitive
    return address if request is None else f"{request.calling_ae_title}@{address}"


def _log_refusal(assoc: Any, reason: str) -> None:
    logger.warning(
        "refused association from %s to %s: %s", _peer(assoc), assoc.requestor.primitive.called_ae_title, reason
    )


def handle_requested(event: evt.Event, policy: AccessPolicy, spool: Spool, receiving: ReceivingFolder) -> None:
    """EVT_REQUESTED: answer A-ASSOCIATE-RJ with the right reason for a refused peer,
    and for now (transient) while images cannot be stored (:func:`_storage_unavailable`):
    each one would be written out before it could be refused. A C-ECHO still
    gets through: the node is up, its disk is full."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    rejection = policy.check(str(request.calling_ae_title), str(request.called_ae_title), assoc.requestor.address)
    echo_only = all(cx.abstract_syntax == Verification for cx in assoc.requestor.requested_contexts)
    if rejection is None and not echo_only:
        rejection = _storage_unavailable(spool, receiving)
    if rejection is None:
        disable_nagle(assoc)
        return
    _log_refusal(assoc, rejection.reason)
    assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
    # As pynetdicom does for its own rejections: mark the association
    # rejected (so it skips negotiation) and let the DUL flush the A-ASSOCIATE-RJ.
    assoc.is_rejected = True
    assoc.kill()


def _storage_unavailable(spool: Spool, receiving: ReceivingFolder) -> Rejection | None:
    """Why images cannot be received now, or None: too little room (abandoned
    partial files are removed first: they hold some), or a spool that cannot
    be written. Transient, local limit exceeded: the sender tries again later."""
    receiving.sweep()
    problem = spool.room_shortage()
    if problem is None:
        error = receiving.probe()
        if error is not None:
            problem = f"the spool cannot be written: {error.strerror or error}"
    return None if problem is None else Rejection(2, 3, 2, problem)


def log_accepted(event: evt.Event) -> None:
    """EVT_ACCEPTED: the association is open. A presentation context
    pynetdicom rejected (a SOP class or transfer syntax not supported) is a
    WARNING: the peer cannot send those images, and says so only in its own
    log. A standard service other than storage, offered beside what was
    accepted (a PACS's echo that offers query/retrieve too), is INFO."""
    assoc = event.assoc
    logger.info("association from %s to %s", _peer(assoc), assoc.requestor.primitive.called_ae_title)
    offered = {cx.context_id: cx.transfer_syntax for cx in assoc.requestor.requested_contexts}
    for context in assoc.rejected_contexts:
        syntaxes = offered.get(context.context_id) or context.transfer_syntax
        service = UID(context.abstract_syntax)
        other_service = assoc.accepted_contexts and not service.is_private and service not in _STORAGE_CLASSES
        logger.log(
            logging.INFO if other_service else logging.WARNING,
            "rejected presentation context from %s: %s in %s: %s",
            _peer(assoc),
            _uid_name(context.abstract_syntax),
            ", ".join(_uid_name(uid) for uid in syntaxes),
            context.status.lower(),
        )


def log_rejected(event: evt.Event) -> None:
    """EVT_REJECTED: pynetdicom refused an association that handle_requested let
    through: node.max_associations are open already."""
    assoc = event.assoc
    rj = assoc.acceptor.primitive
    reason = f"A-ASSOCIATE-RJ {rj.result_str.lower()}, {rj.reason_str.lower()}"
    if (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2):
        holders = [_peer(other) for other in assoc.ae.active_associations if other.is_acceptor and other is not assoc]
        reason = (
            f"node.max_associations ({assoc.ae.maximum_associations}) are open ({reason}), held by {', '.join(holders)}"
        )
    _log_refusal(assoc, reason)


def end_unrequested(event: evt.Event) -> None:
    """EVT_CONN_CLOSE: a connection that ended before an association request
    (a port scan, a load balancer's probe, a peer silent for REQUEST_SECONDS)
    held one of node.max_associations meanwhile; pynetdicom says nothing of
    it, and would hold that until REQUEST_SECONDS are up. Logged, and the
    association's thread, which waits for the request, told at once."""
    if event.assoc.requestor.primitive is None:
        logger.info("connection from %s ended without an association request", _peer(event.assoc))
        event.assoc.dul.to_user_queue.put(None)  # what it gets when REQUEST_SECONDS are up


def _uid_name(uid: str) -> str:
    name = UID(uid).name
    return uid if name == uid else f"{name} ({uid})"


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    # ErrorComment is LO: at most 64 characters.
    ds.ErrorComment = comment[:64]
    return ds


def handle_store(
    event: evt.Event, spool: Spool, factory: sessionmaker[Session], receiving: ReceivingFolder
) -> int | Dataset:
    """EVT_C_STORE: store durably, record, then answer; a failure status otherwise."""
    request = event.request
    sop_uid = str(request.AffectedSOPInstanceUID)
    calling = event.assoc.requestor.ae_title
    host = plain_address(event.assoc.requestor.address)
    received = Path(event.dataset_path)
    write_error = receiving.write_error(received)
    if write_error is not None:
        return _spool_write_failed(sop_uid, calling, write_error)
    shortage = spool.room_shortage()
    if shortage is not None:
        logger.error("refusing %s from %s: %s", sop_uid, calling, shortage)
        return _failure(
            OUT_OF_RESOURCES, f"ichnode spool: {spool.free_mb():.0f} MB free, {spool.min_free_mb} MB needed"
        )

    try:
        # Every element's header, values longer than a few KB (Pixel Data) not read.
        ds = read_elements(received)
        check_whole(received, ds)
        header = InstanceHeader.from_dataset(
            ds, sop_class_uid=str(request.AffectedSOPClassUID), sop_instance_uid=sop_uid
        )
    except Truncated as exc:  # a cut-off file sent as it was: stored, it would replace a good copy
        logger.warning("refusing %s from %s: truncated: %s", sop_uid, calling, exc)
        return _failure(CANNOT_UNDERSTAND, f"truncated: {exc.brief}")
    except TooLarge as exc:  # inflated, it would take that much of this process's memory
        logger.warning("refusing %s from %s: %s", sop_uid, _peer(event.assoc), exc)
        return _failure(CANNOT_UNDERSTAND, str(exc))
    except Exception as exc:  # any decode problem means we cannot understand it
        logger.warning("refusing %s from %s: unreadable header: %s", sop_uid, calling, exc)
        return _failure(CANNOT_UNDERSTAND, f"bad header: {exc}")  # short: an ErrorComment holds 64 characters
    # An image whose data set names another SOP Class than its C-STORE is
    # refused (as DCMTK's storescp does). One that names another instance is
    # stored under its own UID, the one a PACS files it under too: some
    # files' meta names another instance than their data set (the RSNA set),
    # and a sender taking the request's UID from it must not be refused.
    own_class = _uid_text(ds.get("SOPClassUID"))
    if own_class and own_class != _uid_text(request.AffectedSOPClassUID):
        logger.warning(
            "refusing %s from %s: its data set is a %s, the request says %s",
            sop_uid,
            _peer(event.assoc),
            own_class,
            request.AffectedSOPClassUID,
        )
        return _failure(DATA_SET_DOES_NOT_MATCH, "data set's SOPClassUID differs from the request's")
    if header.sop_instance_uid != _uid_text(sop_uid):
        logger.warning(
            "%s from %s is stored under its data set's SOP Instance UID %s",
            sop_uid,
            _peer(event.assoc),
            header.sop_instance_uid,
        )

    if _one_of_ours(factory, ds, header):
        logger.info("%s from %s is a report of this node's own, sent back: acknowledged, not stored", sop_uid, calling)
        return SUCCESS
    with spool.instance_lock(header.sop_instance_uid):
        return _store(spool, factory, received, header, calling, host)


def _uid_text(value: object) -> str:
    """A UID as compared: senders pad with a space or a NUL, or not."""
    return "" if value is None else str(value).strip(" \0")


def _one_of_ours(factory: sessionmaker[Session], ds: Dataset, header: InstanceHeader) -> bool:
    """A report this node made and sent, come back (a PACS that forwards all
    it stores, a study sent again whole): it would be a series of its own,
    listed and counted as skipped. Looked up only for what could be one."""
    if header.sop_class_uid not in _REPORT_CLASSES or str(ds.get("ManufacturerModelName", "")) != "ichnode":
        return False
    try:
        with factory() as session:
            sent = select(db.Delivery.id).where(db.Delivery.sop_instance_uid == header.sop_instance_uid).limit(1)
            return session.scalar(sent) is not None
    except Exception:  # then it is stored as any image is
        logger.exception("could not tell whether %s is a report of this node's", header.sop_instance_uid)
        return False


def _store(
    spool: Spool, factory: sessionmaker[Session], received: Path, header: InstanceHeader, calling: str, host: str
) -> int | Dataset:
    """Move the received file into the spool and record it (under the instance's lock)."""
    relative = spool.instance_path(header.study_uid, header.series_uid, header.sop_instance_uid)
    store = _store_again if spool.absolute(relative).exists() else _store_new
    return store(spool, factory, received, relative, header, calling, host)


def _store_new(
    spool: Spool,
    factory: sessionmaker[Session],
    received: Path,
    relative: str,
    header: InstanceHeader,
    calling: str,
    host: str,
) -> int | Dataset:
    """The file first, then its row: a crash between the two leaves a file
    that the next start indexes. On a failure, neither stays."""
    try:
        size = received.stat().st_size
        spool.commit_file(received, relative)
    except OSError as exc:
        # The rename may have happened before the error: not acknowledged, so no file.
        spool.remove(relative)
        return _spool_write_failed(header.sop_instance_uid, calling, exc)
    try:
        registration = register_instance(
            factory, header, path=relative, size_bytes=size, calling_ae=calling, peer_host=host
        )
    except Exception as exc:
        # No row, so no file either; the sender keeps the image and retries.
        spool.remove(relative)
        return _database_failed(header.sop_instance_uid, exc)
    _remove_replaced(spool, registration)
    return SUCCESS


def _store_again(
    spool: Spool,
    factory: sessionmaker[Session],
    received: Path,
    relative: str,
    header: InstanceHeader,
    calling: str,
    host: str,
) -> int | Dataset:
    """A copy of an instance whose file is already at its path. The row first,
    then the file: until the row describes the new copy, the acknowledged one
    stays in place, so a failure leaves both as they were. An identical copy
    (the same bytes, or the same data set in another encoding) is only
    counted: its file and series stay as they are."""
    try:
        size = received.stat().st_size
        identical = spool.same_content(received, relative) or same_data_set(received, spool.absolute(relative))
        if not identical:
            spool.sync_file(received)  # on disk before the row says it is there
    except OSError as exc:
        return _spool_write_failed(header.sop_instance_uid, calling, exc)
    try:
        registration = register_instance(
            factory,
            header,
            path=relative,
            size_bytes=size,
            calling_ae=calling,
            peer_host=host,
            identical_to_stored=identical,
        )
    except Exception as exc:
        return _database_failed(header.sop_instance_uid, exc)
    if registration.identical:
        return SUCCESS
    try:
        spool.commit_file(received, relative)
    except OSError as exc:
        # Rare (the file was synced): the row describes the new copy, the old
        # one stays; the sender retries and the retry puts the new one in place.
        return _spool_write_failed(header.sop_instance_uid, calling, exc)
    _remove_replaced(spool, registration)
    return SUCCESS


def _remove_replaced(spool: Spool, registration: Registration) -> None:
    if registration.replaced_path:
        spool.remove(registration.replaced_path)


def _spool_write_failed(sop_uid: str, calling: str, exc: OSError) -> Dataset:
    logger.error("cannot write %s from %s to the spool: %s", sop_uid, calling, exc)
    return _failure(OUT_OF_RESOURCES, f"spool write failed: {exc.strerror or exc}")


def _database_failed(sop_uid: str, exc: Exception) -> Dataset:
    if isinstance(exc, DataError):  # a value the database will never take: sent again, it fails again
        logger.warning("refusing %s: the database refuses a value of it: %s", sop_uid, db.error_text(exc))
        return _failure(CANNOT_UNDERSTAND, f"database refuses a value: {type(exc.orig).__name__}")
    if isinstance(exc, OperationalError):  # unreachable or locked: one line per image, not a traceback
        logger.warning("cannot record %s in the database: %s", sop_uid, db.error_text(exc))
    else:
        logger.exception("cannot record %s in the database", sop_uid)
    return _failure(OUT_OF_RESOURCES, f"database error: {type(exc).__name__}")


def discard_partial_transfer(event: evt.Event) -> None:
    """EVT_CONN_CLOSE: remove the file of a dataset whose transfer was cut off.

    pynetdicom removes its file only after the C-STORE handler ran; an
    aborted or dropped association would leave a partial file, holding room
    in the spool, until the next sweep of the receiving folder.
    """
    message = getattr(event.assoc.dimse, "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    partial.close()
    Path(partial.name).unlink(missing_ok=True)
    logger.warning("removed a dataset cut off by the end of the association from %s", event.assoc.requestor.ae_title)


class _NodeAE(AE):
    """The node's AE: its associations receive datasets into ``receiving``,
    from peers ``policy`` lets in."""

    receiving: ReceivingFolder | None = None
    policy: AccessPolicy | None = None


def build_ae(config: Config, receiving: ReceivingFolder) -> _NodeAE:
    """An AE that accepts Verification, CT in every decodable syntax, and all other storage."""
    ae = _NodeAE(ae_title=config.node.ae_title)
    ae.receiving = receiving
    ae.maximum_associations = config.node.max_associations
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.acse_timeout = REQUEST_SECONDS
    # Access control is ours (AccessPolicy), with reasons in the log.
    ae.require_called_aet = False
    ae.add_supported_context(Verification)
    ct_syntaxes = decodable_transfer_syntaxes()
    for uid in CT_STORAGE_CLASSES:
        ae.add_supported_context(uid, ct_syntaxes)
    # Everything else a PACS routes with a head CT study (scouts, dose
    # reports, secondary captures) is accepted and recorded, then skipped
    # by the worker, so senders do not retry it forever.
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax not in CT_STORAGE_CLASSES:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


class _Receiver(ThreadedAssociationServer):
    """The association server. It closes a connection from a host no entry
    of access.allow could let in as soon as it is made (else it would hold
    one of node.max_associations until its association request is due), and
    between connections it removes abandoned partial files from the
    receiving folder (see :class:`ReceivingFolder`)."""

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # In the connection's own thread, not the accept loop: it may look a host name of access.allow up.
        host = plain_address(client_address[0])
        if not self.ae.policy.may_connect(host):
            port = client_address[1]
            logger.warning("refused connection from %s:%d: no access.allow entry is for this host", host, port)
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def service_actions(self) -> None:
        super().service_actions()
        self.ae.receiving.sweep_if_due()


class _SharedPortReceiver(_Receiver):
    """A receiver that shares its port with the node's other receiver processes."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def start_receiver(
    config: Config, spool: Spool, factory: sessionmaker[Session], *, index: int = 0
) -> ThreadedAssociationServer:
    """Start listening (non-blocking); stop with ``server.shutdown()``.

    ``index`` numbers the receiver processes of one node (``node.receiver_processes``);
    with more than one they share the port (SO_REUSEPORT) and the kernel spreads
    associations over them, so concurrent senders use several CPU cores.
    """
    # Incoming datasets are written on the spool filesystem, so moving them
    # into place is a rename, not a copy. Each receiver process has its own
    # folder, emptied of partial files at start and whenever they are abandoned.
    receiving = ReceivingFolder(spool.tmp_dir / f"receiver-{index}")
    receiving.sweep()
    ae = build_ae(config, receiving)
    policy = ae.policy = AccessPolicy(config.access, config.node.ae_title)
    handlers = [
        (evt.EVT_REQUESTED, handle_requested, [policy, spool, receiving]),
        (evt.EVT_ACCEPTED, log_accepted),
        (evt.EVT_REJECTED, log_rejected),
        (evt.EVT_C_STORE, handle_store, [spool, factory, receiving]),
        (evt.EVT_CONN_CLOSE, discard_partial_transfer),
        (evt.EVT_CONN_CLOSE, end_unrequested),
    ]
    shared = config.node.receiver_processes > 1
    server = ae.make_server(
        (config.node.host, config.node.port),
        evt_handlers=handlers,
        server_class=_SharedPortReceiver if shared else _Receiver,
    )
    threading.Thread(target=server.serve_forever, name=f"receiver-{index}", daemon=True).start()
    # As AE.start_server does: server.shutdown() removes the server from this list.
    ae._servers.append(server)
    logger.info(
        "receiver %d listening as %s on %s:%d",
        index,
        config.node.ae_title,
        config.node.host,
        server.server_address[1],
    )
    return server
