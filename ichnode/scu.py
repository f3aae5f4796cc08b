"""Client side of DICOM: C-ECHO and C-STORE to a peer, with every status checked."""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from tqdm import tqdm

from .dicomfile import TooLarge, Truncated, check_whole, read_elements, transfer_syntax

logger = logging.getLogger(__name__)

# A peer may propose at most 128 presentation contexts in one association.
MAX_CONTEXTS = 128
# The longest a failed association's TCP probe (which says why) waits.
CONNECT_PROBE_SECONDS = 5.0
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage


def disable_nagle(assoc: Any) -> None:
    """Send each PDU at once (TCP_NODELAY) on an association's socket.

    A C-STORE is a small command PDU then the dataset; with Nagle's algorithm
    and the peer's delayed ACK every store would stall ~40 ms.
    """
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def limit_socket_waits(assoc: Any, seconds: float) -> None:
    """Make each send and read on an association's socket give up after ``seconds``.

    pynetdicom clears the socket's timeout once connected: a peer that stops
    reading mid-dataset would then block the send, and Association.kill()
    that waits for it, for ever. A timed-out send closes the connection instead.
    """
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.settimeout(seconds)


def status_category(status: int | None) -> str:
    """Success, Warning, Failure, or "No response" for a C-STORE/C-ECHO status."""
    if status is None:
        return "No response"
    if status == 0x0000:
        return "Success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "Warning"
    return "Failure"


def request_store_contexts(ae: AE, pairs: Iterable[tuple[str, str]]) -> None:
    """A presentation context per (SOP Class, transfer syntax) of the data sets
    to send. One in Explicit VR Little Endian comes with another in Implicit
    VR Little Endian: every SCP must accept that (PS3.5 10.1) and some accept
    nothing else, and pynetdicom re-encodes the data set for it. A context of
    its own, not a second syntax in one: a peer that takes both gets Explicit."""
    for sop_class, syntax in sorted(set(pairs)):
        ae.add_requested_context(sop_class, syntax)
        if syntax == ExplicitVRLittleEndian:
            ae.add_requested_context(sop_class, ImplicitVRLittleEndian)


def store_context_count(pairs: Iterable[tuple[str, str]]) -> int:
    """How many presentation contexts :func:`request_store_contexts` proposes for ``pairs``."""
    return sum(2 if syntax == ExplicitVRLittleEndian else 1 for _, syntax in set(pairs))


def client_ae(calling_ae: str, timeout: float) -> AE:
    """An AE for outgoing associations with every timeout set, the TCP connect included:
    without one, a peer behind a firewall that drops SYNs blocks the connect for
    about two minutes (the kernel's SYN retries)."""
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


def associate(ae: AE, ae_title: str, host: str, port: int) -> tuple[Any, str | None]:
    """Request an association with ``ae``'s contexts and timeouts; returns it and,
    when it was not established, a line saying why."""
    started = time.monotonic()
    try:
        assoc = ae.associate(host, port, ae_title=ae_title)
    except socket.gaierror as exc:  # pynetdicom looks the host up before it connects
        return None, f"cannot resolve host {host}: {exc.strerror or exc}"
    if not assoc.is_established:
        return assoc, association_failure(assoc, ae_title, host, port, waited=time.monotonic() - started)
    disable_nagle(assoc)
    limit_socket_waits(assoc, ae.network_timeout)
    return assoc, None


def echo(ae_title: str, host: str, port: int, *, calling_ae: str = "ICHNODE_SCU", timeout: float = 10) -> tuple[bool, str]:
    """C-ECHO; returns (succeeded, a line saying what happened)."""
    ae = client_ae(calling_ae, timeout)
    ae.add_requested_context(Verification)
    assoc, failure = associate(ae, ae_title, host, port)
    if failure:
        return False, failure
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(response.Status) if "Status" in response else None
    ok = code == 0x0000
    shown = "no response" if code is None else f"0x{code:04X} ({status_category(code)})"
    return ok, f"C-ECHO {ae_title}@{host}:{port}: {shown}"


def association_failure(assoc, ae_title: str, host: str, port: int, *, waited: float = 0.0) -> str:
    """Why an association was not established; ``waited``: the seconds its request took."""
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        reason = f"rejected (result 0x{rj.result:02X}, source 0x{rj.result_source:02X}, reason 0x{rj.diagnostic:02X})"
        try:
            reason += f": {rj.reason_str}"
        except Exception:  # the description is a convenience only
            pass
        return f"association with {ae_title}@{host}:{port} {reason}"
    if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
        # The peer answered but supports none of what we offered (e.g. no 3D SR).
        offered = sorted({cx.abstract_syntax.name for cx in assoc.rejected_contexts})
        return f"{ae_title}@{host}:{port} accepted no presentation context for {', '.join(offered)}"
    if assoc.is_aborted:
        # pynetdicom reports a failed TCP connect as an abort; say which it was.
        probe = min(CONNECT_PROBE_SECONDS, assoc.connection_timeout or CONNECT_PROBE_SECONDS)
        unreachable = _connect_error(host, port, probe)
        if unreachable:
            return f"cannot connect to {ae_title}@{host}:{port}: {unreachable}"
        if assoc.acse_timeout and waited >= assoc.acse_timeout:
            # pynetdicom also aborts a request that gets no answer in time.
            return f"{ae_title}@{host}:{port} did not answer the association request within {assoc.acse_timeout:g} s"
        return f"association with {ae_title}@{host}:{port} aborted"
    return f"cannot associate with {ae_title}@{host}:{port} (no answer)"


def _connect_error(host: str, port: int, timeout: float) -> str | None:
    """Why a TCP connection to ``host:port`` fails; None when it succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


class _File(NamedTuple):
    """A file found for sending, from its header."""

    path: Path
    sop_class: str
    syntax: str
    sop_class_in_meta_only: bool
    has_meta: bool = True


class NotSendable(Exception):
    """A file that is not sent; the message says why."""


class NotAnImage(NotSendable):
    """A file that is no DICOM image (a text file, a DICOMDIR): in a folder
    sent whole (a CD export), one to pass over, not a failure."""


@dataclass
class SendSummary:
    """What happened to each file of a send."""

    statuses: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    passed_over: list[str] = field(default_factory=list)  # found in a folder, not images

    @property
    def all_stored(self) -> bool:
        return not self.failures and not self.skipped and self.statuses["Success"] + self.statuses["Warning"] > 0

    def lines(self) -> list[str]:
        out = [f"{name}: {count}" for name, count in sorted(self.statuses.items())]
        out += [f"not sent: {line}" for line in self.skipped]
        out += [f"passed over: {line}" for line in self.passed_over]
        out += [f"failed: {line}" for line in self.failures]
        return out


def iter_files(paths: Iterable[Path]) -> list[tuple[Path, bool]]:
    """Files given, and every file under folders given, in a stable order;
    with each, whether it was found in a folder (rather than named)."""
    files: list[tuple[Path, bool]] = []
    for path in paths:
        if path.is_dir():
            files.extend((p, True) for p in sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append((path, False))
    return files


def send_files(
    paths: Sequence[Path],
    ae_title: str,
    host: str,
    port: int,
    *,
    calling_ae: str = "ICHNODE_SCU",
    progress: bool = False,
    timeout: float = 30,
) -> SendSummary:
    """C-STORE every DICOM file under ``paths`` over one association per batch of contexts.

    Files that are not DICOM images (a DICOMDIR, a text file) or are cut off
    are listed as not sent, with the reason; those that are not images and
    were found in a folder, as passed over.
    """
    summary = SendSummary()
    # A mistyped series folder that exists but holds nothing would otherwise
    # end the send with no line at all.
    for path in paths:
        if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
            summary.failures.append(f"no files found under {path}")
    found: list[_File] = []
    for path, in_folder in iter_files(paths):
        try:
            found.append(_examine(path))
        except NotAnImage as exc:
            (summary.passed_over if in_folder else summary.skipped).append(f"{path}: {exc}")
        except NotSendable as exc:
            summary.skipped.append(f"{path}: {exc}")

    # Propose exactly the (SOP class, transfer syntax) pairs present, in
    # batches of at most 128 contexts, one association per batch.
    batches: list[list[_File]] = []
    contexts: list[set[tuple[str, str]]] = []
    for item in found:
        pair = (item.sop_class, item.syntax)
        for batch, pairs in zip(batches, contexts):
            if pair in pairs or store_context_count(pairs | {pair}) <= MAX_CONTEXTS:
                batch.append(item)
                pairs.add(pair)
                break
        else:
            batches.append([item])
            contexts.append({pair})

    bar = tqdm(total=len(found), unit="file", disable=not progress)
    for batch, pairs in zip(batches, contexts):
        ae = client_ae(calling_ae, timeout)
        request_store_contexts(ae, pairs)
        assoc, failure = associate(ae, ae_title, host, port)
        if failure:
            summary.statuses["Not sent"] += len(batch)
            summary.failures.append(failure)
            bar.update(len(batch))
            continue
        tried = 0
        try:
            for item in batch:
                _store_and_count(assoc, item, summary)
                tried += 1
                bar.update(1)
                if not assoc.is_established:
                    break
            untried = len(batch) - tried
            if untried:
                summary.statuses["Not sent"] += untried
                summary.failures.append(
                    f"association with {ae_title}@{host}:{port} ended after {tried} of {len(batch)} files; "
                    f"{untried} not sent"
                )
                bar.update(untried)
        finally:
            if assoc.is_established:
                assoc.release()
    bar.close()
    return summary


def _examine(path: Path) -> _File:
    """What sending ``path`` takes, from its header; :class:`NotSendable` says why it cannot be sent.

    A data set without the Part 10 preamble and file meta (older archives)
    is sent when it names its SOP class and instance.
    """
    try:
        try:
            ds, has_meta = read_elements(path), True
        except InvalidDicomError:  # no preamble and file meta: perhaps a bare data set
            ds, has_meta = _read_without_meta(path), False
        check_whole(path, ds)
    except Truncated as exc:
        raise NotSendable(f"truncated: {exc}") from None
    except TooLarge as exc:  # a receiver would refuse it: said, not passed over as "not DICOM"
        raise NotSendable(str(exc)) from None
    except NotSendable:
        raise
    except Exception as exc:  # a corrupt body fails in many ways, each meaning "not DICOM"
        raise NotAnImage(f"not a DICOM file ({exc.__class__.__name__})") from None
    if not has_meta:
        return _File(path, str(ds.SOPClassUID), transfer_syntax(ds), sop_class_in_meta_only=False, has_meta=False)
    try:
        sop_class = str(ds.file_meta.MediaStorageSOPClassUID)
        syntax = str(ds.file_meta.TransferSyntaxUID)
    except AttributeError:
        raise NotAnImage("not a DICOM file (AttributeError)") from None
    if sop_class == DICOMDIR_SOP_CLASS:
        raise NotAnImage("a DICOMDIR, not an image")
    return _File(path, sop_class, syntax, "SOPClassUID" not in ds)


def _read_without_meta(path: Path) -> Dataset:
    """A data set written without preamble and file meta; not DICOM unless it names its SOP class and instance."""
    try:
        ds = read_elements(path, force=True)
        if ds.get("SOPClassUID") and ds.get("SOPInstanceUID"):
            return ds
    except Truncated:
        raise
    except Exception:  # any file "reads" when forced; most fail somewhere
        pass
    raise NotAnImage("not a DICOM file (InvalidDicomError)")


def _store_and_count(assoc, item: _File, summary: SendSummary) -> None:
    """C-STORE one file and count what happened to it in ``summary``.

    A file that cannot be sent (the peer accepted no context for its SOP
    class or transfer syntax, it cannot be read) is one failure, not the end
    of the send: the other files are still tried.
    """
    try:
        status = store_file(assoc, item.path, dataset=_as_sent(item))
    except Exception as exc:
        summary.statuses["Not sent"] += 1
        summary.failures.append(f"{item.path}: not sent: {exc}")
        return
    category = status_category(status)
    summary.statuses[category] += 1
    if category in ("Failure", "No response"):
        shown = "no response" if status is None else f"0x{status:04X}"
        summary.failures.append(f"{item.path}: {shown}")


def _as_sent(item: _File) -> Dataset | None:
    """The data set to send in place of the file's own bytes, read and completed; None to send the file as it is."""
    if item.has_meta and not item.sop_class_in_meta_only:
        return None
    dataset = dcmread(item.path, force=not item.has_meta)
    if item.sop_class_in_meta_only:
        # The RSNA files keep the SOP Class UID only in the file meta; C-STORE needs it in the data set.
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID
    if not item.has_meta:
        # pynetdicom sends a data set in the transfer syntax its file meta names.
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = item.syntax
    return dataset


def store_file(assoc, path: Path, *, dataset: Dataset | None = None) -> int | None:
    """C-STORE one file (or ``dataset``, read from it) on an open association;
    the response status, None if none came."""
    response = assoc.send_c_store(path if dataset is None else dataset)
    if response is None or "Status" not in response:
        return None
    status = int(response.Status)
    if status != 0x0000:
        comment = response.get("ErrorComment", "")
        logger.warning("C-STORE of %s answered 0x%04X %s", path, status, comment)
    return status
