"""The DICOM receiver: Verification and Storage SCP, access control, C-STORE handler.

The C-STORE handler does the least possible on the association thread: the
dataset arrives in a temporary file (pynetdicom's chunked receive), the
handler reads its header, fsyncs it, renames it into the spool, records one
row, and only then answers Success. It never decodes pixels.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from .config import AccessConfig, Config
from .scu import disable_nagle
from .series import InstanceHeader, register_instance
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
CANNOT_UNDERSTAND = 0xC000

CT_STORAGE_CLASSES = (CTImageStorage, EnhancedCTImageStorage)
# How long a host name of access.allow is trusted to keep its addresses.
HOST_LOOKUP_SECONDS = 60.0

# Header attributes the receiver records; reading stops before the pixels.
_HEADER_TAGS = [
    "SOPInstanceUID",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "InstanceNumber",
    "PatientID",
    "AccessionNumber",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
]


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

    def check(self, calling_ae: str, called_ae: str, host: str) -> Rejection | None:
        """None when the association may proceed, else why it may not."""
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
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)} | {host}
        except OSError as exc:
            logger.warning("cannot resolve %s of access.allow: %s", host, exc)
            return {host}
        self._host_cache[host] = (time.monotonic(), addresses)
        return addresses


def handle_requested(event: evt.Event, policy: AccessPolicy, spool: Spool) -> None:
    """EVT_REQUESTED: answer A-ASSOCIATE-RJ with the right reason for a refused peer,
    and for now (transient) while the spool is below ``storage.min_free_mb``: each
    image would be written out before it could be refused. A C-ECHO still gets
    through: the node is up, its disk is full."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    calling = str(request.calling_ae_title)
    called = str(request.called_ae_title)
    host = assoc.requestor.address
    rejection = policy.check(calling, called, host)
    echo_only = all(cx.abstract_syntax == Verification for cx in assoc.requestor.requested_contexts)
    if rejection is None and not echo_only and not spool.has_room():
        reason = f"{spool.free_mb():.0f} MB free in the spool, storage.min_free_mb is {spool.min_free_mb}"
        rejection = Rejection(2, 3, 2, reason)  # transient: local limit exceeded
    if rejection is None:
        logger.info("association from %s@%s:%s to %s", calling, host, assoc.requestor.port, called)
        disable_nagle(assoc)
        return
    logger.warning(
        "refused association from %s@%s:%s to %s: %s",
        calling,
        host,
        assoc.requestor.port,
        called,
        rejection.reason,
    )
    assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
    # As pynetdicom does for its own rejections: mark the association
    # rejected (so it skips negotiation) and let the DUL flush the A-ASSOCIATE-RJ.
    assoc.is_rejected = True
    assoc.kill()


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    # ErrorComment is LO: at most 64 characters.
    ds.ErrorComment = comment[:64]
    return ds


def handle_store(event: evt.Event, spool: Spool, factory: sessionmaker[Session]) -> int | Dataset:
    """EVT_C_STORE: store durably, record, then answer; a failure status otherwise."""
    request = event.request
    sop_uid = str(request.AffectedSOPInstanceUID)
    calling = event.assoc.requestor.ae_title
    host = event.assoc.requestor.address
    if not spool.has_room():
        logger.error(
            "refusing %s from %s: %.0f MB free, storage.min_free_mb is %d",
            sop_uid,
            calling,
            spool.free_mb(),
            spool.min_free_mb,
        )
        return _failure(OUT_OF_RESOURCES, "ichnode spool is below storage.min_free_mb")

    received = Path(event.dataset_path)
    try:
        ds = dcmread(received, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        header = InstanceHeader.from_dataset(
            ds, sop_class_uid=str(request.AffectedSOPClassUID), sop_instance_uid=sop_uid
        )
    except Exception as exc:  # any decode problem means we cannot understand it
        logger.warning("refusing %s from %s: unreadable header: %s", sop_uid, calling, exc)
        return _failure(CANNOT_UNDERSTAND, f"unreadable header: {exc}")

    with spool.instance_lock(header.sop_instance_uid):
        return _store(spool, factory, received, header, calling, host)


def _store(
    spool: Spool, factory: sessionmaker[Session], received: Path, header: InstanceHeader, calling: str, host: str
) -> int | Dataset:
    """Move the received file into the spool and record it (under the instance's lock)."""
    sop_uid = header.sop_instance_uid
    relative = spool.instance_path(header.study_uid, header.series_uid, sop_uid)
    existed = spool.absolute(relative).exists()
    try:
        size = received.stat().st_size
        spool.commit_file(received, relative)
    except OSError as exc:
        logger.error("cannot write %s to the spool: %s", sop_uid, exc)
        if not existed:
            # The rename may have happened before the error: not acknowledged, so no file.
            spool.remove(relative)
        return _failure(OUT_OF_RESOURCES, f"spool write failed: {exc.strerror}")

    try:
        registration = register_instance(
            factory, header, path=relative, size_bytes=size, calling_ae=calling, peer_host=host
        )
    except Exception as exc:
        logger.exception("cannot record %s in the database", sop_uid)
        if not existed:
            # No row, so no file either; the sender keeps the image and retries.
            spool.remove(relative)
        return _failure(OUT_OF_RESOURCES, f"database error: {type(exc).__name__}")
    if registration.replaced_path:
        spool.remove(registration.replaced_path)
    return SUCCESS


def discard_partial_transfer(event: evt.Event) -> None:
    """EVT_CONN_CLOSE: remove the file of a dataset whose transfer was cut off.

    pynetdicom removes its file only after the C-STORE handler ran; an
    aborted or dropped association would leave a partial file, counted
    against ``storage.min_free_mb``, until the next start.
    """
    message = getattr(event.assoc.dimse, "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    partial.close()
    Path(partial.name).unlink(missing_ok=True)
    logger.warning("removed a dataset cut off by the end of the association from %s", event.assoc.requestor.ae_title)


def build_ae(config: Config) -> AE:
    """An AE that accepts Verification, CT in every decodable syntax, and all other storage."""
    ae = AE(ae_title=config.node.ae_title)
    ae.maximum_associations = config.node.max_associations
    # No upper limit on the PDUs peers send us: fewer, larger PDUs are faster.
    ae.maximum_pdu_size = 0
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


class _ReusePortServer(ThreadedAssociationServer):
    """An association server that shares its port with the node's other receiver processes."""

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
    # pynetdicom writes incoming datasets with tempfile; keep them on the
    # spool filesystem so moving them into place is a rename, not a copy. Each
    # receiver process has its own folder, emptied of partial files at start.
    tmp = spool.tmp_dir / f"receiver-{index}"
    tmp.mkdir(exist_ok=True)
    removed = spool.clear_tmp(tmp)
    if removed:
        logger.info("removed %d partial files left by an interrupted transfer", removed)
    tempfile.tempdir = str(tmp)
    ae = build_ae(config)
    policy = AccessPolicy(config.access, config.node.ae_title)
    handlers = [
        (evt.EVT_REQUESTED, handle_requested, [policy, spool]),
        (evt.EVT_C_STORE, handle_store, [spool, factory]),
        (evt.EVT_CONN_CLOSE, discard_partial_transfer),
    ]
    shared = config.node.receiver_processes > 1
    server = ae.make_server(
        (config.node.host, config.node.port),
        evt_handlers=handlers,
        server_class=_ReusePortServer if shared else ThreadedAssociationServer,
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
