"""Tests for ichnode.imaging: hand-computed values, then real series read in place."""

from __future__ import annotations

import copy
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from ichnode import imaging
from ichnode.imaging import (
    AIR_HU,
    DEFAULT_WINDOWS,
    apply_windows,
    fix_bad_intercept,
    header_windows,
    needs_intercept_fix,
    order_slices,
    preprocess_series,
    preprocess_slice,
    resize,
    slice_normal,
    slice_positions,
    stack_context,
    tilt_degrees,
    to_hu,
)

from .conftest import require_data


BRAIN = (40, 80)
TILT_IOP = [1, 0, 0, 0, math.cos(math.radians(18.5)), -math.sin(math.radians(18.5))]


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing (CI=true)")
    pytest.skip(f"{what} is missing")


def _ct(
    pixels: list | np.ndarray,
    *,
    signed: bool = True,
    bits_stored: int = 16,
    **attributes: object,
) -> Dataset:
    """A minimal uncompressed single-frame CT image holding ``pixels``."""
    array = np.asarray(pixels, dtype="<i2" if signed else "<u2")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = array.tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _positioned(
    position: list[float], iop: list[float] = TILT_IOP, **attributes: object
) -> Dataset:
    return _ct([[0]], ImagePositionPatient=position, ImageOrientationPatient=iop, **attributes)


# --------------------------------------------------------------------------
# to_hu
# --------------------------------------------------------------------------


def test_to_hu_applies_slope_and_intercept() -> None:
    ds = _ct([[0, 1], [100, 1000]], RescaleSlope=2, RescaleIntercept=-1024)
    hu = to_hu(ds)
    assert hu.dtype == np.float32 and hu.shape == (2, 2)
    np.testing.assert_array_equal(hu, [[-1024, -1022], [-824, 976]])


def test_to_hu_defaults_without_rescale_or_optional_tags() -> None:
    ds = _ct([[-5, 0, 7]])
    np.testing.assert_array_equal(to_hu(ds), [[-5, 0, 7]])


def test_to_hu_maps_padding_and_out_of_field_to_air() -> None:
    # -1500 is GE's PixelPaddingValue (not below the threshold, caught by the
    # tag); -1600 is below -1500 HU; -1400 is kept (noise in air, rare
    # enough among the tissue of the last row to be plausible).
    ds = _ct([[-1500, -1600, -1400], [0, 40, -2000], [20, 30, 1000]], PixelPaddingValue=-1500)
    np.testing.assert_array_equal(
        to_hu(ds), [[AIR_HU, AIR_HU, -1400], [0, 40, AIR_HU], [20, 30, 1000]]
    )


def test_to_hu_padding_value_applies_before_rescale() -> None:
    # Stored -2000 with intercept -1024 is -3024 HU: padding either way.
    ds = _ct([[-2000, 0, 1064]], RescaleIntercept=-1024, PixelPaddingValue=-2000)
    np.testing.assert_array_equal(to_hu(ds), [[AIR_HU, -1024, 40]])


def test_to_hu_padding_range_limit() -> None:
    ds = _ct(
        [[0, 5, 10, 11, 1040]],
        signed=False,
        RescaleIntercept=-1000,
        PixelPaddingValue=0,
        PixelPaddingRangeLimit=10,
    )
    np.testing.assert_array_equal(to_hu(ds), [[AIR_HU, AIR_HU, AIR_HU, -989, 40]])


def test_to_hu_accepts_multivalued_windows_and_string_rescale() -> None:
    ds = _ct(
        [[1024, 1064]],
        RescaleIntercept="-1024",
        RescaleSlope="1",
        WindowCenter=["00040", "00040"],
        WindowWidth=["00080", "00080"],
    )
    np.testing.assert_array_equal(to_hu(ds), [[0, 40]])
    assert header_windows(ds) == ((40.0, 80.0), (40.0, 80.0))
    assert header_windows(_ct([[0]])) == ()


def test_to_hu_rejects_color_and_non_datasets() -> None:
    ds = _ct([[0]])
    ds.SamplesPerPixel = 3
    with pytest.raises(ValueError, match="SamplesPerPixel"):
        to_hu(ds)
    with pytest.raises(TypeError, match="'ds'"):
        to_hu(np.zeros((2, 2)))  # type: ignore[arg-type]
    no_pixels = _ct([[0]])
    del no_pixels.PixelData
    with pytest.raises(ValueError, match="PixelData"):
        to_hu(no_pixels)


def test_to_hu_single_frame_with_number_of_frames() -> None:
    ds = _ct([[1, 2], [3, 4]], NumberOfFrames=1, RescaleIntercept=-1)
    np.testing.assert_array_equal(to_hu(ds), [[0, 1], [2, 3]])
    np.testing.assert_array_equal(to_hu(ds, frame=0), [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="'frame'"):
        to_hu(ds, frame=1)


def test_to_hu_enhanced_ct_frame_uses_functional_group_rescale() -> None:
    path = get_testdata_file("eCT_Supplemental.dcm")
    if path is None:
        _missing("pydicom-data eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    assert "RescaleIntercept" not in ds  # only in the shared functional groups
    with pytest.raises(ValueError, match="frames"):
        to_hu(ds)
    stored = pydicom.pixels.pixel_array(ds, index=1).astype(np.float32)
    # Intercept -1024 from the shared Pixel Value Transformation Sequence.
    expected = np.where(stored - 1024 < -1500, AIR_HU, stored - 1024)
    np.testing.assert_array_equal(to_hu(ds, frame=1), expected)
    assert tilt_degrees(ds) == pytest.approx(0.0)


# --------------------------------------------------------------------------
# Images that are no CT slice: refused (the node quarantines them with the
# message as reason and scores the rest of the series)
# --------------------------------------------------------------------------


def _head(size: int = 64) -> np.ndarray:
    """HU of a small head: brain (40) in a skull (1000), air (-1000) around it."""
    rows, columns = np.mgrid[:size, :size]
    radius = np.hypot(rows - size / 2, columns - size / 2)
    return np.select([radius < size * 0.3, radius < size * 0.35], [40, 1000], -1000)


@pytest.mark.parametrize("slope", [0, -1])
def test_a_rescale_slope_not_positive_is_refused(slope: float) -> None:
    # Slope 0 makes every pixel 0 HU (water): the model would call it "Absent".
    ds = _ct(_head(), RescaleSlope=slope, RescaleIntercept=0)
    with pytest.raises(ValueError, match=f"RescaleSlope must be positive, got {slope}"):
        preprocess_slice(ds)


def test_a_modality_lut_is_refused() -> None:
    # A LUT's output is unsigned: it cannot give the negative HU of air, so
    # its values are no HU the model could read.
    ds = _ct(_head() + 2048, signed=False)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "HU"
    item.LUTData = np.arange(4096, dtype="<u2").tobytes()
    ds.ModalityLUTSequence = Sequence([item])
    with pytest.raises(ValueError, match="ModalityLUTSequence is not supported"):
        preprocess_slice(ds)


def test_signed_pixels_declared_unsigned_are_refused() -> None:
    # Air stored as -1000 and read as unsigned is 64536 HU: bright as blood to the model.
    ds = _ct(_head())
    ds.PixelRepresentation = 0
    with pytest.raises(ValueError, match=r"HU not plausible for CT: \d+% of the field of view .* PixelRepresentation"):
        to_hu(ds)


def test_signed_pixels_declared_unsigned_refused_on_every_ge_slice(ge: tuple[list[Path], list[Dataset]]) -> None:
    # Where the head fills half the field of view, still refused; the real
    # slices themselves (padding ring of -1500 included) all pass.
    for ds in ge[1]:
        to_hu(ds)
        wrong = copy.deepcopy(ds)
        wrong.PixelRepresentation = 0
        with pytest.raises(ValueError, match="HU not plausible for CT"):
            to_hu(wrong)


def test_a_blank_image_is_refused() -> None:
    with pytest.raises(ValueError, match="Image is blank: every pixel in its field of view is 0 HU"):
        to_hu(_ct(np.zeros((64, 64))))
    # Blank inside a padding ring, as a scanner would pad it.
    ring = np.where(_head() == -1000, -2000, 0)
    with pytest.raises(ValueError, match="every pixel in its field of view is 0 HU"):
        to_hu(_ct(ring, PixelPaddingValue=-2000))
    with pytest.raises(ValueError, match="every pixel is padding"):
        to_hu(_ct(np.full((64, 64), -3024)))


def test_an_image_larger_than_ct_is_refused_before_decoding() -> None:
    # Decoding 16384 x 16384 takes GBs, and running out of memory fails the
    # whole series; refused from the header, it is one quarantined slice.
    ds = _ct(_head())
    ds.Rows = ds.Columns = 16384
    with pytest.raises(ValueError, match=r"16384 x 16384 pixels not decoded: .* \(at most 4096 rows and columns\)"):
        to_hu(ds)
    tall = _ct(np.tile(_head(), (65, 8)))  # 4160 x 512, Pixel Data to match
    with pytest.raises(ValueError, match="4160 x 512 pixels not decoded"):
        to_hu(tall)


@pytest.mark.parametrize("keyword", ["FloatPixelData", "DoubleFloatPixelData"])
def test_float_pixel_data_says_it_is_not_supported(keyword: str) -> None:
    ds = _ct(_head())
    del ds.PixelData
    ds.BitsAllocated = 32 if keyword == "FloatPixelData" else 64
    setattr(ds, keyword, _head().astype("<f4" if keyword == "FloatPixelData" else "<f8").tobytes())
    with pytest.raises(ValueError, match=f"{keyword} is not supported"):
        to_hu(ds)


def test_pixel_data_of_another_length_than_rows_and_columns_say() -> None:
    ds = _ct(_head())  # 64 x 64 x 2 bytes
    ds.Rows = 32
    with pytest.raises(ValueError, match=r"Pixel Data holds 8192 bytes, .* \(32 x 64 x 16/8\) needs 4096"):
        to_hu(ds)
    ds.Rows = 100
    with pytest.raises(ValueError, match=r"Pixel Data holds 8192 bytes, .* needs 12800"):
        to_hu(ds)


# --------------------------------------------------------------------------
# RSNA bad-intercept fix
# --------------------------------------------------------------------------

# Stored 12-bit values and what correct_dcm makes of them: px + 1000, minus
# 4096 from 4096 up, intercept -1000, so HU = stored for 0..3095 and
# stored - 4096 for 3096..4095.
BAD_STORED = [[0, 40, 1024, 3095, 3096, 4095]]
BAD_FIXED = [[1000, 1040, 2024, 4095, 0, 999]]
BAD_HU = [[0, 40, 1024, 3095, -1000, -1]]


@pytest.mark.parametrize("intercept", [0, 1, -99])
def test_bad_intercept_fix(intercept: int) -> None:
    ds = _ct(BAD_STORED, signed=False, bits_stored=12, RescaleSlope=1, RescaleIntercept=intercept)
    before = ds.PixelData
    assert needs_intercept_fix(ds)
    fixed, new_intercept = fix_bad_intercept(ds)
    np.testing.assert_array_equal(fixed, BAD_FIXED)
    assert new_intercept == -1000.0
    np.testing.assert_array_equal(to_hu(ds), BAD_HU)
    # The dataset is left as it was (unlike correct_dcm).
    assert ds.PixelData == before and ds.RescaleIntercept == intercept
    # Without the fix the header is taken at its word.
    np.testing.assert_array_equal(
        to_hu(ds, fix_intercept=False), np.asarray(BAD_STORED) + intercept
    )


@pytest.mark.parametrize(
    ("signed", "bits_stored", "attributes"),
    [
        (False, 12, {"RescaleIntercept": -1024}),  # RSNA's usual, correct header
        (False, 12, {"RescaleIntercept": -100}),  # the bound is exclusive
        (True, 12, {"RescaleIntercept": 0}),  # signed
        (False, 16, {"RescaleIntercept": 0}),  # 16-bit
        (False, 12, {"RescaleIntercept": 0, "Modality": "MR"}),  # not CT
    ],
)
def test_bad_intercept_fix_not_applied(signed: bool, bits_stored: int, attributes: dict) -> None:
    ds = _ct([[0, 100, 2000]], signed=signed, bits_stored=bits_stored, **attributes)
    assert not needs_intercept_fix(ds)
    pixels = np.array([[0, 100, 2000]])
    fixed, intercept = fix_bad_intercept(ds, pixels)
    assert fixed is pixels and intercept == attributes["RescaleIntercept"]


# --------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------


def test_brain_window_values() -> None:
    out = apply_windows(np.array([-100.0, 0.0, 20.0, 40.0, 80.0, 500.0]), [BRAIN])
    assert out.shape == (6, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], [0.0, 0.0, 0.25, 0.5, 1.0, 1.0], atol=1e-6)


def test_default_windows_channels_in_order() -> None:
    hu = np.array([[40.0, 80.0], [-800.0, 600.0]], dtype=np.float32)
    out = apply_windows(hu)
    assert out.shape == (2, 2, 3)
    # brain (40, 80): [0, 80]; subdural (80, 200): [-20, 180]; bone (600, 2800): [-800, 2000]
    np.testing.assert_allclose(out[0, 0], [0.5, 60 / 200, 840 / 2800], atol=1e-6)
    np.testing.assert_allclose(out[0, 1], [1.0, 0.5, 880 / 2800], atol=1e-6)
    np.testing.assert_allclose(out[1, 0], [0.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out[1, 1], [1.0, 1.0, 0.5], atol=1e-6)
    assert DEFAULT_WINDOWS == ((40, 80), (80, 200), (600, 2800))


@pytest.mark.parametrize("windows", [[], [(40, 0)], [(40, -80)], [(40,)], [(math.nan, 80)], "x"])
def test_apply_windows_rejects_bad_windows(windows: object) -> None:
    with pytest.raises(ValueError, match="'windows'"):
        apply_windows(np.zeros(2), windows)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# resize
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(2, 2), (3, 5), (8, 8), (12, 7), (1, 1)])
def test_resize_constant_stays_constant(size: tuple[int, int]) -> None:
    image = np.full((8, 8, 2), 0.25, dtype=np.float32)
    out = resize(image, size)
    assert out.shape == size + (2,) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.25, atol=1e-6)


def test_resize_integer_factor_is_block_mean() -> None:
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(resize(image, (2, 2)), [[2.5, 4.5], [10.5, 12.5]])


def test_resize_non_integer_downscale_is_area_average() -> None:
    # 3 -> 2: footprints [0, 1.5) and [1.5, 3).
    column = np.array([[0.0], [3.0], [6.0]])
    np.testing.assert_allclose(resize(column, (2, 1)), [[1.0], [5.0]])
    rng = np.random.default_rng(0)
    image = rng.random((50, 40)).astype(np.float32)
    assert resize(image, (30, 17)).mean() == pytest.approx(image.mean(), abs=1e-5)


def test_resize_upscale_is_bilinear_with_half_pixel_centres() -> None:
    np.testing.assert_allclose(resize(np.array([[0.0, 4.0]]), (1, 4)), [[0.0, 1.0, 3.0, 4.0]])
    np.testing.assert_allclose(resize(np.array([[7.0]]), (3, 2)), np.full((3, 2), 7.0))


def test_resize_same_size_returns_a_copy() -> None:
    image = np.ones((4, 4), dtype=np.float32)
    out = resize(image, (4, 4))
    out[0, 0] = 5
    assert image[0, 0] == 1


def test_a_wide_reconstruction_keeps_its_aspect_ratio() -> None:
    # A round head of 40 HU in a 256 x 320 image (a wider field of view, the
    # same pixel spacing): in the square model input it is still round, with
    # air where the image had none.
    rows, columns = np.mgrid[:256, :320]
    head = np.where((rows - 128) ** 2 + (columns - 160) ** 2 < 100**2, 40, -1000)
    x = preprocess_slice(_ct(head), [(40.0, 80.0)], (128, 128))[..., 0]
    inside = np.argwhere(x > 0.25)
    height, width = inside.max(axis=0) - inside.min(axis=0) + 1
    assert abs(int(height) - int(width)) <= 1, (height, width)
    assert x[:8].max() == 0.0 and x[-8:].max() == 0.0  # the air added above and below


@pytest.mark.parametrize("size", [(0, 4), (4,), (4.0, 4), (True, 4), None])
def test_resize_rejects_bad_size(size: object) -> None:
    with pytest.raises(ValueError, match="'size'"):
        resize(np.zeros((4, 4)), size)  # type: ignore[arg-type]


def test_resize_rejects_bad_image() -> None:
    with pytest.raises(ValueError, match="'image'"):
        resize(np.zeros(4), (2, 2))


# --------------------------------------------------------------------------
# stack_context
# --------------------------------------------------------------------------


def test_stack_context_replicates_edges() -> None:
    # Value = 10 * slice + channel, so every output channel names its source.
    n, channels = 3, 2
    volume = (10 * np.arange(n)[:, None] + np.arange(channels)[None, :]).astype(np.float32)
    volume = np.broadcast_to(volume[:, None, None, :], (n, 2, 2, channels)).copy()
    out = stack_context(volume, 1)
    assert out.shape == (3, 2, 2, 6)
    np.testing.assert_array_equal(out[0, 0, 0], [0, 1, 0, 1, 10, 11])
    np.testing.assert_array_equal(out[1, 0, 0], [0, 1, 10, 11, 20, 21])
    np.testing.assert_array_equal(out[2, 1, 1], [10, 11, 20, 21, 20, 21])
    assert stack_context(volume, 2)[0, 0, 0].tolist() == [0, 1, 0, 1, 0, 1, 10, 11, 20, 21]
    assert stack_context(volume, 0) is volume


@pytest.mark.parametrize("context", [-1, 1.5, True])
def test_stack_context_rejects_bad_context(context: object) -> None:
    with pytest.raises(ValueError, match="'context'"):
        stack_context(np.zeros((2, 2, 2, 1)), context)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Geometry and order (synthetic)
# --------------------------------------------------------------------------


def test_slice_normal_and_tilt() -> None:
    axial = _positioned([0, 0, 0], [1, 0, 0, 0, 1, 0])
    np.testing.assert_allclose(slice_normal(axial), [0, 0, 1])
    assert tilt_degrees(axial) == 0.0
    tilted = _positioned([0, 0, 0])
    np.testing.assert_allclose(
        slice_normal(tilted), [0, math.sin(math.radians(18.5)), math.cos(math.radians(18.5))]
    )
    assert tilt_degrees(tilted) == pytest.approx(18.5)
    assert tilt_degrees(_positioned([0, 0, 0], [0, 1, 0, 0, 0, -1])) == pytest.approx(90.0)
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        slice_normal(_ct([[0]]))
    with pytest.raises(ValueError, match="parallel"):
        slice_normal(_positioned([0, 0, 0], [1, 0, 0, 1, 0, 0]))


def test_slice_normal_refuses_sheared_or_scaled_orientations() -> None:
    # Normalised, [1,0,0, 0.7,0.7,0] would pass for axial, with rows and
    # columns both running to the patient's left.
    with pytest.raises(ValueError, match=r"unit vectors, got lengths 1 and 0.9899: \[1, 0, 0, 0.7, 0.7, 0\]"):
        slice_normal(_positioned([0, 0, 0], [1, 0, 0, 0.7, 0.7, 0]))
    with pytest.raises(ValueError, match="unit vectors, got lengths 1e\\+300 and 1"):
        slice_normal(_positioned([0, 0, 0], [1e300, 0, 0, 0, 1, 0]))
    sheared = [1, 0, 0, math.sin(math.radians(5)), math.cos(math.radians(5)), 0]  # unit, 85 degrees apart
    with pytest.raises(ValueError, match="at right angles, got 85 degrees"):
        slice_normal(_positioned([0, 0, 0], sheared))
    # Cosines as scanners write them, rounded (the 18.5 degree tilt to 4 decimals).
    rounded = [1, 0, 0, 0, 0.9483, -0.3173]
    np.testing.assert_allclose(slice_normal(_positioned([0, 0, 0], rounded)), [0, 0.3173, 0.9483], atol=1e-4)


def test_order_uses_projection_on_normal_not_z() -> None:
    normal = np.array([0, math.sin(math.radians(18.5)), math.cos(math.radians(18.5))])
    column = np.array(TILT_IOP[3:])
    # Slice A at 0 mm along the normal but shifted -20 mm in-plane along the
    # columns (z +6.3); slice B 2 mm further along the normal (z +1.9).
    a = _positioned(list(-20 * column), InstanceNumber=2)
    b = _positioned(list(2 * normal), InstanceNumber=1)
    assert a.ImagePositionPatient[2] > b.ImagePositionPatient[2]
    np.testing.assert_allclose(slice_positions([a, b]), [0.0, 2.0], atol=1e-9)
    assert order_slices([b, a]) == [1, 0]


@pytest.mark.parametrize("orientation", [[1, 0, 0, 0, 1, 0], [-1, 0, 0, 0, 1, 0], [1, 0, 0, 0, -1, 0]])
def test_order_runs_feet_to_head_whichever_way_the_normal_points(orientation: list[int]) -> None:
    # Row x column points to the head for the first orientation and to the
    # feet for the two mirrored ones (some feet-first reconstructions).
    slices = [_positioned([0, 0, z], orientation) for z in (30.0, 10.0, 20.0)]
    assert order_slices(slices) == [1, 2, 0]
    np.testing.assert_allclose(slice_positions(slices), [30.0, 10.0, 20.0])


def test_order_ties_and_fallbacks() -> None:
    axial = [1, 0, 0, 0, 1, 0]
    same = [_positioned([0, 0, 5], axial, InstanceNumber=n) for n in (3, 1, 2)]
    assert order_slices(same) == [1, 2, 0]
    # Positions missing: InstanceNumber order.
    numbered = [_ct([[0]], InstanceNumber=n) for n in (5, 2, 9)]
    assert order_slices(numbered) == [1, 0, 2]
    with pytest.raises(ValueError, match="InstanceNumber"):
        order_slices([_ct([[0]]), _ct([[0]])])
    assert order_slices([]) == []
    assert order_slices([_ct([[0]])]) == [0]


# --------------------------------------------------------------------------
# Real series, read in place
# --------------------------------------------------------------------------


def _read_series(name: str) -> tuple[list[Path], list[Dataset]]:
    files = sorted(require_data(name).glob("*.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RSNA's invalid UIDs
        return files, [pydicom.dcmread(f) for f in files]


@pytest.fixture(scope="module")
def ge() -> tuple[list[Path], list[Dataset]]:
    return _read_series("ge-head-ct")


@pytest.fixture(scope="module")
def rsna() -> tuple[list[Path], list[Dataset]]:
    return _read_series("rsna-series")


def test_ge_order_and_tilt(ge: tuple[list[Path], list[Dataset]]) -> None:
    files, datasets = ge
    order = order_slices(datasets)
    positions = slice_positions(datasets)
    assert order == np.argsort(positions, kind="stable").tolist()
    assert np.all(np.diff(positions[order]) > 0)
    # Hand-checked: files 01..28 are InstanceNumber 1..28, feet to head; on
    # this series naive sorting by IPP z happens to give the same order.
    assert [int(datasets[i].InstanceNumber) for i in order] == list(range(1, 29))
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    assert order == np.argsort(z).tolist()
    # The normal turns the tilted table steps (4.22 / 7.38 mm in z) into the
    # real slice spacing, which equals SliceThickness (4 mm, then 7 mm).
    steps, z_steps = np.diff(positions[order]), np.diff(z[order])
    np.testing.assert_allclose(z_steps[:13], 4.22, atol=0.01)
    np.testing.assert_allclose(z_steps[14:], 7.38, atol=0.01)
    np.testing.assert_allclose(steps[:13], 4.0, atol=0.01)
    np.testing.assert_allclose(steps[14:], 7.0, atol=0.01)
    for ds in datasets:
        assert tilt_degrees(ds) == pytest.approx(18.5, abs=0.01)
        assert tilt_degrees(ds) == pytest.approx(float(ds.GantryDetectorTilt), abs=0.01)


def test_ge_hu_and_padding(ge: tuple[list[Path], list[Dataset]]) -> None:
    ds = ge[1][10]
    raw = pydicom.pixels.pixel_array(ds)
    hu = to_hu(ds)
    assert ds.PixelPaddingValue == -1500 and (raw == -1500).any()
    assert hu.min() == AIR_HU
    # Intercept 0: HU are the stored values, except padding which becomes air.
    np.testing.assert_array_equal(hu[raw != -1500], raw[raw != -1500])
    assert np.all(hu[raw == -1500] == AIR_HU)


def test_ge_preprocess_series(ge: tuple[list[Path], list[Dataset]]) -> None:
    datasets = ge[1]
    reversed_input = datasets[::-1]
    volume, order = preprocess_series(reversed_input, context=1)
    assert order == list(range(27, -1, -1))
    assert volume.shape == (28, 256, 256, 9) and volume.dtype == np.float32
    assert volume.min() >= 0.0 and volume.max() <= 1.0
    flat, _ = preprocess_series(reversed_input)
    np.testing.assert_array_equal(volume[..., 3:6], flat)
    np.testing.assert_array_equal(volume[0, ..., 0:3], flat[0])  # edge replicated
    np.testing.assert_array_equal(volume[5, ..., 6:9], flat[6])
    # preprocess_slice is exactly to_hu -> apply_windows -> resize.
    one = preprocess_slice(reversed_input[order[0]])
    np.testing.assert_array_equal(one, flat[0])
    np.testing.assert_array_equal(
        one, resize(apply_windows(to_hu(reversed_input[order[0]])), (256, 256))
    )
    # A non-integer factor and an upscale go through the other paths.
    for size in ((300, 300), (600, 600)):
        odd = preprocess_slice(datasets[0], [BRAIN, (80, 200)], size)
        assert odd.shape == (*size, 2)
        np.testing.assert_array_equal(odd, resize(apply_windows(to_hu(datasets[0]), [BRAIN, (80, 200)]), size))


def test_preprocess_series_errors(ge: tuple[list[Path], list[Dataset]]) -> None:
    with pytest.raises(ValueError, match="'datasets'"):
        preprocess_series([])
    with pytest.raises(ValueError, match="'size'"):
        preprocess_series(ge[1], size=(0, 256))
    broken = _positioned([0, 0, 1000])
    broken.SOPInstanceUID = "1.2.3"
    broken.SamplesPerPixel = 3
    with pytest.raises(ValueError, match="SamplesPerPixel") as info:
        preprocess_series([ge[1][0], broken])
    assert "datasets[1] (SOPInstanceUID 1.2.3)" in "".join(info.value.__notes__)


def test_rsna_quirks(rsna: tuple[list[Path], list[Dataset]]) -> None:
    files, datasets = rsna
    # Imaging must not trip over the invalid UIDs: nothing here reads them.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        order = order_slices(datasets)
        volume, _ = preprocess_series(datasets[:3])
    assert volume.shape == (3, 256, 256, 3)
    assert all("InstanceNumber" not in ds for ds in datasets)  # positions only
    positions = slice_positions(datasets)[order]
    assert np.all(np.diff(positions) > 0)
    # Hand-checked from the headers: lowest z 155.02 mm, highest 313.12 mm.
    assert files[order[0]].name == "ID_38ed6bf3c.dcm"
    assert files[order[-1]].name == "ID_b9070ba98.dcm"
    np.testing.assert_allclose(np.diff(positions), 5.0, atol=0.01)
    assert tilt_degrees(datasets[0]) == pytest.approx(11.0, abs=0.01)
    ds = datasets[order[10]]
    assert header_windows(ds) == ((40.0, 80.0), (40.0, 80.0))
    # 12-bit unsigned with intercept -1024: a correct header, no fix.
    assert ds.BitsStored == 12 and ds.PixelRepresentation == 0
    assert not needs_intercept_fix(ds)
    raw = pydicom.pixels.pixel_array(ds)
    np.testing.assert_array_equal(to_hu(ds), raw.astype(np.float32) - 1024)


# --------------------------------------------------------------------------
# Compressed transfer syntaxes
# --------------------------------------------------------------------------

# (uncompressed reference, compressed file, frame); the first four come from
# pydicom-data, the MR_small ones from pydicom's own test files.
COMPRESSED_PAIRS = [
    ("693_UNCR.dcm", "693_J2KR.dcm", None),  # CT, JPEG 2000 lossless, padding -2000
    ("emri_small.dcm", "emri_small_RLE.dcm", 4),
    ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm", 4),
    ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", 4),
    ("MR_small.dcm", "MR_small_RLE.dcm", None),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", None),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm", None),
]


def _testdata(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        _missing(f"pydicom test file {name}")
    return pydicom.dcmread(path)


@pytest.mark.parametrize(("reference", "compressed", "frame"), COMPRESSED_PAIRS)
def test_compressed_matches_uncompressed(
    reference: str, compressed: str, frame: int | None
) -> None:
    ref, comp = _testdata(reference), _testdata(compressed)
    assert comp.file_meta.TransferSyntaxUID.is_compressed
    assert not ref.file_meta.TransferSyntaxUID.is_compressed
    expected = to_hu(ref, frame=frame)
    np.testing.assert_array_equal(to_hu(comp, frame=frame), expected)
    assert np.isfinite(expected).all() and expected.std() > 0


def test_compressed_ct_padding_and_jpeg_lossless() -> None:
    hu = to_hu(_testdata("693_J2KR.dcm"))
    assert hu.min() == AIR_HU  # stored -2000 padding
    # JPEG Lossless (process 14, SV1), 12-bit unsigned CT with intercept -1024:
    # no uncompressed twin exists, so check it decodes to plausible HU.
    ds = _testdata("bad_sequence.dcm")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    hu = to_hu(ds)
    assert hu.shape == (512, 512)
    assert -1024 <= hu.min() < -900 and 1000 < hu.max() < 3072


def test_module_does_not_import_tensorflow() -> None:
    # Backend neutrality: the module must not need tf (numpy only).
    source = Path(imaging.__file__).read_text()
    assert "import tensorflow" not in source and "from tensorflow" not in source


def test_stack_context_rows_into_a_buffer_equal_the_whole_stack() -> None:
    volume = np.arange(5 * 2 * 2 * 3, dtype=np.float32).reshape(5, 2, 2, 3)
    whole = stack_context(volume, 1)
    buffer = np.full((2, 2, 2, 9), -1.0, dtype=np.float32)
    part = stack_context(volume, 1, rows=range(3, 5), out=buffer)
    assert part is buffer
    np.testing.assert_array_equal(buffer, whole[3:5])
    with pytest.raises(ValueError, match="out"):
        stack_context(volume, 1, rows=[0], out=buffer)
