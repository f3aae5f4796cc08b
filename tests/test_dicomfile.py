"""``ichnode.dicomfile``: a whole file from one cut off, as ``ichnode send`` and the receiver tell them."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from ichnode.dicomfile import Truncated, check_whole, read_elements

# An element after Pixel Data, out of tag order: (0009,0010) LO "ABCD".
LATE_ELEMENT = bytes.fromhex("09001000") + b"LO" + (4).to_bytes(2, "little") + b"ABCD"


def _check(path: Path) -> None:
    check_whole(path, read_elements(path))


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
