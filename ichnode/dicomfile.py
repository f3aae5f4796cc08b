"""Reading a DICOM file's elements without its pixels, telling a whole file
from one cut off (an interrupted copy, a transfer that ended early), and
telling one data set sent again in another encoding.

``ichnode send`` refuses a cut-off file, as DCMTK's storescu does, and the
receiver refuses such a data set: stored, it would replace a good copy with
whatever part of the Pixel Data arrived. A deflated data set that would
inflate past :data:`MAX_INFLATED_BYTES` is refused before it is read: pydicom
reads one only inflated whole, into memory.
"""

from __future__ import annotations

import warnings
import zlib
from pathlib import Path

import numpy as np

from pydicom import dcmread
from pydicom.datadict import dictionary_description, dictionary_has_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

# Values longer than this (Pixel Data) are skipped, never read: their length
# and position are kept.
DEFER_BYTES = 1024
# pydicom inflates a deflated data set whole into memory before it reads any
# of it, and a file of a few hundred KB can inflate to GBs. One that inflates
# past this is refused unread: deflated objects are SRs and single images,
# a few MB at most, nowhere near it.
MAX_INFLATED_BYTES = 256 * 2**20
# How much is inflated at a time while the inflated size is counted.
_INFLATE_CHUNK_BYTES = 2**20
# The shortest element header: tag and length (implicit VR).
_ELEMENT_HEADER_BYTES = 8
_PIXEL_DATA = Tag("PixelData")
# What an encoder adds or sets when it compresses without loss (DCMTK's
# lossless JPEG describes itself in Derivation Description), besides the
# pixels, which are compared decoded.
_ENCODER_NOTES = {_PIXEL_DATA, Tag("DerivationDescription"), Tag("LossyImageCompression")}


class Truncated(ValueError):
    """The file is cut off; the message says where, :attr:`brief` in fewer
    words (a C-STORE's ErrorComment holds 64 characters)."""

    def __init__(self, message: str, brief: str | None = None) -> None:
        super().__init__(message)
        self.brief = brief or message


class TooLarge(ValueError):
    """The deflated data set inflates past :data:`MAX_INFLATED_BYTES`."""


def read_elements(path: Path, *, force: bool = False) -> Dataset:
    """Every top-level element of a file, long values skipped; :class:`Truncated`
    when it ends inside an element of undefined length, :class:`TooLarge` when
    it is deflated and inflates past :data:`MAX_INFLATED_BYTES`."""
    _inflated_end(path, force=force)
    with warnings.catch_warnings():
        # pydicom only warns, and keeps none of the data set, when the file
        # ends inside an element of undefined length (encapsulated Pixel Data).
        warnings.filterwarnings("error", message="End of file reached before delimiter")
        try:
            return dcmread(path, defer_size=DEFER_BYTES, force=force)
        except UserWarning:
            raise Truncated("the file ends inside an element of undefined length") from None


def _inflated_end(path: Path, *, force: bool) -> tuple[int, bytes] | None:
    """Where the data set in ``path`` ends when it is deflated: its inflated
    length and last few bytes (None for any other transfer syntax);
    :class:`TooLarge` when it inflates past the limit. Inflated a chunk at a
    time, nothing else kept."""
    with open(path, "rb") as f:
        read_preamble(f, force)
        meta = _read_file_meta_info(f)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return None
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated, tail = 0, b""
        while not inflater.eof and (deflated := f.read(_INFLATE_CHUNK_BYTES)):
            # max_length keeps each piece small; what it leaves is inflated next.
            while deflated and not inflater.eof:
                piece = inflater.decompress(deflated, _INFLATE_CHUNK_BYTES)
                inflated += len(piece)
                tail = (tail + piece[-_ELEMENT_HEADER_BYTES:])[-_ELEMENT_HEADER_BYTES:]
                if inflated > MAX_INFLATED_BYTES:
                    raise TooLarge(f"deflated data set inflates past {MAX_INFLATED_BYTES // 2**20} MiB")
                deflated = inflater.unconsumed_tail
    return inflated, tail


def check_whole(path: Path, ds: Dataset) -> None:
    """:class:`Truncated` when ``path`` (read into ``ds`` by :func:`read_elements`)
    falls short of its last element, or ends in part of another. A deflated
    data set is inflated once more to tell (a sender that deflates a cut-off
    file as it reads it sends a whole deflate stream)."""
    if not ds:
        return
    # A deflated data set's positions are those of its inflated stream.
    inflated = _inflated_end(path, force=True) if transfer_syntax(ds) == DeflatedExplicitVRLittleEndian else None
    # The element last in the file (not always the highest tag).
    raw = [e for e in (ds.get_item(tag, keep_deferred=True) for tag in ds.keys()) if isinstance(e, RawDataElement)]
    if not raw:
        return
    last = max(raw, key=lambda element: element.value_tell)
    if last.length == 0xFFFFFFFF:
        return  # read to its end already: an undefined length ends at its delimiter
    name = dictionary_description(last.tag) if dictionary_has_tag(last.tag) else "element"
    size, whole = (inflated[0], "the inflated data set") if inflated else (path.stat().st_size, "the file")
    left = size - last.value_tell
    if last.length > left:
        raise Truncated(
            f"{name} {last.tag} is {last.length} bytes, {whole} has {left}",
            brief=f"{last.tag} short by {last.length - left} bytes",
        )
    rest = left - last.length
    if 0 < rest < _ELEMENT_HEADER_BYTES and (inflated[1][-rest:] if inflated else _tail(path, rest)).strip(b"\0"):
        # pydicom stops without a word where the next element's header is cut
        # (padding of zeros after the data set is no element, and harmless).
        raise Truncated(
            f"{rest} bytes after {name} {last.tag} are no whole element",
            brief=f"{rest} bytes after {last.tag} are no whole element",
        )


def _tail(path: Path, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(-count, 2)
        return f.read()


def transfer_syntax(ds: Dataset) -> UID:
    """The transfer syntax of a data set: its file meta's (a file may have one
    without the preamble before it), else the encoding it was read in (native
    pixels: no meta, no compression)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return UID(meta.TransferSyntaxUID)
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def same_data_set(first: Path, second: Path) -> bool:
    """Whether two files hold one data set, whatever their encodings: a PACS
    forwarding a study in Implicit VR, or compressed without loss, sends the
    scanner's images again, not other ones. The same elements with equal
    values (their VRs and group lengths aside, and what a lossless encoder
    notes of itself), and the same pixels once decoded. Any doubt (a file
    that cannot be read or decoded) is a difference."""
    try:
        a, b = dcmread(first), dcmread(second)
        if not _same_elements(a, b):
            return False
        if "PixelData" not in a:
            return True
        if transfer_syntax(a) == transfer_syntax(b):
            return a.PixelData == b.PixelData
        return bool(np.array_equal(a.pixel_array, b.pixel_array))
    except Exception:
        return False


def _same_elements(a: Dataset, b: Dataset) -> bool:
    tags = {tag for tag in a.keys() if tag.element != 0 and tag not in _ENCODER_NOTES}
    if tags != {tag for tag in b.keys() if tag.element != 0 and tag not in _ENCODER_NOTES}:
        return False
    if a.get("LossyImageCompression", "00") != b.get("LossyImageCompression", "00"):
        return False
    for tag in tags:
        x, y = a[tag].value, b[tag].value
        if isinstance(x, Sequence) or isinstance(y, Sequence):
            if not (isinstance(x, Sequence) and isinstance(y, Sequence) and len(x) == len(y)):
                return False
            if not all(_same_elements(i, j) for i, j in zip(x, y)):
                return False
        elif x != y:
            return False
    return True
