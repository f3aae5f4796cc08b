"""``ichnode.dicomfile``: a whole file from one cut off, as ``ichnode send`` and the receiver tell them."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from ichnode.dicomfile import TooLarge, Truncated, check_whole, read_elements

# An element after Pixel Data, out of tag order: (0009,0010) LO "ABCD".
LATE_ELEMENT = bytes.fromhex("09001000") + b"LO" + (4).to_bytes(2, "little") + b"ABCD"


def _check(path: Path) -> None:
    check_whole(path, read_elements(path))


def deflated_ct(path: Path, rows: int, columns: int) -> Path:
    """pydicom's small CT as a ``rows`` x ``columns`` image of zeros, as another
    instance, deflated a piece at a time as a sender can stream it: 16384 x
    16384 (512 MiB of pixels) takes 2.3 MB."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.Rows, ds.Columns = rows, columns
    del ds.PixelData
    elements = DicomBytesIO()
    elements.is_little_endian, elements.is_implicit_VR = True, False
    write_dataset(elements, ds)
    pixel_bytes = rows * columns * 2
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(16 * 2**20)
    with open(path, "wb") as f:
        f.write(bytes(128) + b"DICM")
        write_file_meta_info(f, ds.file_meta)
        f.write(deflater.compress(elements.getvalue() + pixel_header))
        for start in range(0, pixel_bytes, len(zeros)):
            f.write(deflater.compress(zeros[: pixel_bytes - start]))
        f.write(deflater.flush())
    return path


def deflated_copy(part10: bytes, target: Path) -> Path:
    """A Part 10 file's bytes (a cut-off file's too) with its data set
    deflated, as a sender that deflates a file as it reads it sends it: a
    whole deflate stream, whatever the data set inflates to."""
    source = DicomBytesIO(part10)
    read_preamble(source, False)
    meta = _read_file_meta_info(source)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(target, "wb") as f:
        f.write(bytes(128) + b"DICM")
        write_file_meta_info(f, meta)
        f.write(deflater.compress(source.read()) + deflater.flush())
    return target


@pytest.mark.parametrize(
    ("change", "whole"),
    [
        ("as it is", True),
        ("16 zero bytes after the data set", True),
        ("3 zero bytes after the data set", True),
        ("an element after Pixel Data, out of order", True),
        ("cut 4 bytes into Pixel Data's header", False),
        ("cut 100 bytes short of its Pixel Data", False),
    ],
)
def test_a_file_cut_off_is_told_from_a_whole_one(tmp_path: Path, change: str, whole: bool) -> None:
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    changed = {
        "as it is": data,
        "16 zero bytes after the data set": data + bytes(16),
        "3 zero bytes after the data set": data + bytes(3),
        "an element after Pixel Data, out of order": data + LATE_ELEMENT,
        "cut 4 bytes into Pixel Data's header": data[: data.rindex(b"\xe0\x7f\x10\x00") + 4],
        "cut 100 bytes short of its Pixel Data": data[:-100],
    }[change]
    path = tmp_path / "file.dcm"
    path.write_bytes(changed)
    if whole:
        _check(path)
    else:
        with pytest.raises(Truncated):
            _check(path)


@pytest.mark.parametrize("encoding", ["implicit VR", "RLE", "deflated"])
def test_one_data_set_in_another_encoding_is_the_same_and_any_change_is_not(tmp_path: Path, encoding: str) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

    from ichnode.dicomfile import same_data_set
    from tests.pipeline_support import phantom

    original = phantom(8, n_slices=2).datasets[0]
    original.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    again = pydicom.dcmread(tmp_path / "a.dcm")
    if encoding == "RLE":
        again.compress(RLELossless, generate_instance_uid=False)
        # As DCMTK's lossless encoders note themselves.
        again.DerivationDescription = "Lossless RLE compression"
        again.LossyImageCompression = "00"
    else:
        again.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if encoding == "implicit VR" else DeflatedExplicitVRLittleEndian
        )
    again.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    assert (tmp_path / "a.dcm").read_bytes() != (tmp_path / "b.dcm").read_bytes()
    assert same_data_set(tmp_path / "a.dcm", tmp_path / "b.dcm")

    changed = pydicom.dcmread(tmp_path / "b.dcm")
    changed.ImageComments = "corrected"
    changed.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    assert not same_data_set(tmp_path / "a.dcm", tmp_path / "c.dcm")
    pixels = pydicom.dcmread(tmp_path / "a.dcm")
    array = pixels.pixel_array.copy()
    array[0, 0] += 1
    pixels.PixelData = array.tobytes()
    pixels.save_as(tmp_path / "d.dcm", enforce_file_format=True)
    assert not same_data_set(tmp_path / "b.dcm", tmp_path / "d.dcm")


def test_a_deflated_file_that_inflates_to_gbs_is_refused_without_inflating_it(tmp_path: Path) -> None:
    # Read whole, as pydicom reads a deflated data set, 2.3 MB would take 512 MiB.
    bomb = deflated_ct(tmp_path / "bomb.dcm", 16384, 16384)
    assert bomb.stat().st_size < 4 * 2**20
    tracemalloc.start()
    try:
        with pytest.raises(TooLarge, match="^deflated data set inflates past 256 MiB$"):
            read_elements(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20
    # A deflated image of a real size reads as before.
    ds = read_elements(deflated_ct(tmp_path / "ct.dcm", 512, 512))
    assert (ds.Rows, ds.Columns, ds.file_meta.TransferSyntaxUID) == (512, 512, DeflatedExplicitVRLittleEndian)
    assert read_elements(Path(get_testdata_file("image_dfl.dcm"))).file_meta.TransferSyntaxUID.is_deflated


@pytest.mark.parametrize(
    ("cut", "whole"),
    [
        ("as it is", True),
        ("100 bytes short of its Pixel Data", False),
        ("4 bytes into Pixel Data's header", False),
    ],
)
def test_a_deflated_data_set_cut_off_is_told_from_a_whole_one(tmp_path: Path, cut: str, whole: bool) -> None:
    # The deflate stream is whole: only the inflated data set tells that it was cut.
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    changed = {
        "as it is": data,
        "100 bytes short of its Pixel Data": data[: data.rindex(b"\xe0\x7f\x10\x00") + 12 + 32768 - 100],
        "4 bytes into Pixel Data's header": data[: data.rindex(b"\xe0\x7f\x10\x00") + 4],
    }[cut]
    path = deflated_copy(changed, tmp_path / "deflated.dcm")
    if whole:
        _check(path)
    else:
        with pytest.raises(Truncated):
            _check(path)
