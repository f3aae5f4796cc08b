"""Image preprocessing shared by the node and by ``training/``.

This is the only place where CT pixels become model inputs: Hounsfield units
(with the RSNA 2019 "bad intercept" fix and out-of-field padding mapped to
air), slice order along the slice normal (correct under gantry tilt),
intensity windows, resizing and 2.5D neighbour stacking.  ``training/``
imports it so that training and inference always see the same pixels; never
copy it.

Everything is numpy (no ``tf.*``), single-threaded and free of module state,
so it can run on any Keras backend and in any worker thread.

Conventions
-----------
- Images are ``(H, W)`` and windowed images ``(H, W, C)`` float32, one
  channel per ``(center, width)`` window in the order given.
- Volumes are ``(N, H, W, C)``, slices in ascending position along the slice
  normal turned towards the head (ascending patient z, i.e. feet to head,
  whichever way the scanner's row and column cosines point).

Limitations
-----------
- Multi-frame (enhanced) images: :func:`to_hu` decodes one frame (``frame=``)
  and reads the rescale from the functional groups, but :func:`order_slices`
  and :func:`preprocess_series` handle single-frame datasets only (one
  dataset per slice), which is what head CT series are sent as.
- Only single-sample (grayscale) images are accepted.
- Images that cannot be a CT slice raise ValueError (the node quarantines
  the slice, training leaves it out): see :func:`to_hu` and
  :func:`slice_normal`.
"""

from __future__ import annotations

import ctypes
import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array as _decode_pixels

__all__ = [
    "AIR_HU",
    "DEFAULT_WINDOWS",
    "MAX_IMPLAUSIBLE_FRACTION",
    "MAX_ROWS_COLUMNS",
    "ORIENTATION_TOLERANCE",
    "PLAUSIBLE_HU",
    "PREPROCESSING_VERSION",
    "PADDING_HU_THRESHOLD",
    "apply_windows",
    "context_indices",
    "fix_bad_intercept",
    "header_windows",
    "image_position",
    "keep_freed_memory",
    "needs_intercept_fix",
    "order_slices",
    "preprocess_series",
    "preprocess_slice",
    "rescale_parameters",
    "resize",
    "slice_normal",
    "slice_positions",
    "sop_class_uid",
    "stack_context",
    "tilt_degrees",
    "to_hu",
]

logger = logging.getLogger(__name__)

#: Default model windows as ``(center, width)`` in HU: brain, subdural, bone.
DEFAULT_WINDOWS: tuple[tuple[float, float], ...] = ((40, 80), (80, 200), (600, 2800))

#: Value given to padding / out-of-field pixels.
AIR_HU = -1024.0

#: Bumped whenever :func:`preprocess_slice` gives other values for the same
#: input: caches of preprocessed slices (``training/``) made before are stale.
#: 2: slices of another aspect ratio than the model input padded with air.
#: 3: slices with implausible HU, a RescaleSlope <= 0 or a Modality LUT refused.
PREPROCESSING_VERSION = 3

#: HU values strictly below this are out-of-field padding (no tissue or air
#: is that dense-less); scanners pad with e.g. -2000 or -3024 after rescale.
PADDING_HU_THRESHOLD = -1500.0

# RSNA 2019 "correct_dcm" constants: the 12-bit data is offset by 1024 while
# the header claims an intercept near 0.
_FIX_OFFSET = 1000
_FIX_MODULUS = 4096
_FIX_INTERCEPT = -1000.0

#: Rows or Columns beyond this are refused before decoding: CT reconstructs
#: 512 to 1024 pixels a side, and a larger image would take GBs to decode.
MAX_ROWS_COLUMNS = 4096

#: HU that real CT gives in its field of view (air -1000 with noise, up to
#: the 12-bit scale's 3071 and a margin for dense bone or metal).
PLAUSIBLE_HU = (-1100.0, 3100.0)

#: A slice with more of its field of view outside :data:`PLAUSIBLE_HU` is
#: refused.  Real series have none there; signed data read as unsigned
#: (air at ~64500) has about half or more.
MAX_IMPLAUSIBLE_FRACTION = 0.25

#: Row and column cosines must be unit vectors and orthogonal within this
#: (scanners write them rounded, e.g. to 6 decimals).
ORIENTATION_TOLERANCE = 1e-3


# --------------------------------------------------------------------------
# Argument checks (highdicom style: name the argument and the value)
# --------------------------------------------------------------------------


def _check_dataset(ds: Any, name: str = "ds") -> None:
    if not isinstance(ds, Dataset):
        raise TypeError(f"Argument '{name}' must be a pydicom Dataset, got {type(ds).__name__}")


def _check_windows(windows: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return float32 ``(lower, 1 / width)`` per window after checking them."""
    try:
        pairs = [(float(c), float(w)) for c, w in windows]
    except (TypeError, ValueError):
        raise ValueError(
            f"Argument 'windows' must be a sequence of (center, width) pairs, got {windows!r}"
        ) from None
    if not pairs:
        raise ValueError(f"Argument 'windows' must hold at least one window, got {windows!r}")
    for center, width in pairs:
        if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
            raise ValueError(
                "Argument 'windows' must hold finite centers and positive widths, "
                f"got {windows!r}"
            )
    centers = np.array([c for c, _ in pairs], dtype=np.float64)
    widths = np.array([w for _, w in pairs], dtype=np.float64)
    return (centers - widths / 2).astype(np.float32), (1.0 / widths).astype(np.float32)


def _check_size(size: Any) -> tuple[int, int]:
    try:
        height, width = size
    except (TypeError, ValueError):
        raise ValueError(f"Argument 'size' must be a pair (height, width), got {size!r}") from None
    for value in (height, width):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Argument 'size' must hold positive integers, got {size!r}")
    return int(height), int(width)


def _check_context(context: Any) -> int:
    if not isinstance(context, numbers.Integral) or isinstance(context, bool) or context < 0:
        raise ValueError(f"Argument 'context' must be a non-negative integer, got {context!r}")
    return int(context)


# --------------------------------------------------------------------------
# Header helpers
# --------------------------------------------------------------------------


def _first_float(value: Any, default: float, keyword: str) -> float:
    """One float from a DS/IS value that may be absent, empty or multi-valued."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return default
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Attribute {keyword} must be a number, got {value!r}") from None
    if not math.isfinite(result):
        raise ValueError(f"Attribute {keyword} must be finite, got {value!r}")
    return result


def _number_of_frames(ds: Dataset) -> int:
    return int(_first_float(ds.get("NumberOfFrames"), 1.0, "NumberOfFrames"))


def _from_functional_groups(ds: Dataset, sequence: str, frame: int) -> Dataset | None:
    """The first item of ``sequence`` for ``frame`` (per-frame, else shared)."""
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items is not None and len(items) > index:
            inner = items[index].get(sequence)
            if inner:
                return inner[0]
    return None


def rescale_parameters(ds: Dataset, frame: int = 0) -> tuple[float, float]:
    """Return the modality rescale ``(slope, intercept)`` of an image.

    Parameters
    ----------
    ds : pydicom.Dataset
        The image.
    frame : int, optional
        Frame whose functional groups are used for enhanced (multi-frame)
        images where the rescale lives in the Pixel Value Transformation
        Sequence; ignored when the top-level attributes are present.

    Returns
    -------
    tuple[float, float]
        Slope (1 when absent) and intercept (0 when absent), as written in
        the header; the RSNA fix (:func:`fix_bad_intercept`) is not applied.

    Raises
    ------
    ValueError
        If either is not a finite number, or the slope is not positive (a
        slope of 0 would make every pixel one value).
    """
    _check_dataset(ds)
    source: Dataset | None = ds
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        source = _from_functional_groups(ds, "PixelValueTransformationSequence", frame)
    if source is None:
        return 1.0, 0.0
    slope = _first_float(source.get("RescaleSlope"), 1.0, "RescaleSlope")
    if slope <= 0:
        raise ValueError(f"Attribute RescaleSlope must be positive, got {slope:g}")
    return slope, _first_float(source.get("RescaleIntercept"), 0.0, "RescaleIntercept")


def header_windows(ds: Dataset) -> tuple[tuple[float, float], ...]:
    """Return the display windows the header suggests as ``(center, width)``.

    Handles absent, empty and multi-valued WindowCenter / WindowWidth (the
    RSNA files carry e.g. ``[40, 40]``); pairs that are not numbers or have a
    non-positive width are skipped.  Not used by the model (its card fixes
    the windows); useful for summary images and checks.
    """
    _check_dataset(ds)

    def values(keyword: str) -> list[Any]:
        value = ds.get(keyword)
        if value is None or value == "":
            return []
        return list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]

    result = []
    for center, width in zip(values("WindowCenter"), values("WindowWidth")):
        try:
            c, w = float(center), float(width)
        except (TypeError, ValueError):
            continue
        if math.isfinite(c) and math.isfinite(w) and w > 0:
            result.append((c, w))
    return tuple(result)


# --------------------------------------------------------------------------
# Hounsfield units
# --------------------------------------------------------------------------


def needs_intercept_fix(ds: Dataset, intercept: float | None = None) -> bool:
    """Whether the RSNA 2019 "bad intercept" fix applies to ``ds``.

    The condition is the one of the widely used ``correct_dcm`` kernels:
    BitsStored 12, PixelRepresentation 0 (unsigned) and
    ``int(RescaleIntercept) > -100``.  It is restricted to CT (or a missing
    Modality) so that 12-bit unsigned MR or CR data is never altered.

    Parameters
    ----------
    ds : pydicom.Dataset
        The image.
    intercept : float, optional
        The header intercept if already known (e.g. from functional groups);
        read with :func:`rescale_parameters` otherwise.
    """
    _check_dataset(ds)
    if ds.get("Modality", "CT") not in ("CT", "", None):
        return False
    if ds.get("BitsStored") != 12 or ds.get("PixelRepresentation") != 0:
        return False
    if intercept is None:
        intercept = rescale_parameters(ds)[1]
    return int(intercept) > -100


def fix_bad_intercept(
    ds: Dataset, pixels: np.ndarray | None = None, *, frame: int = 0
) -> tuple[np.ndarray, float]:
    """Apply the RSNA 2019 "bad intercept" fix to stored pixel values.

    Some RSNA (and scanner) images are 12-bit unsigned with a header
    intercept of about 0 while the values are really stored with an offset:
    stored values from 3096 up are negative HU that wrapped around.  The fix,
    exactly as in the published ``correct_dcm``, is::

        px = px + 1000; px[px >= 4096] -= 4096; intercept = -1000

    Unlike ``correct_dcm`` the dataset is not modified.

    Parameters
    ----------
    ds : pydicom.Dataset
        The image, used for the condition (:func:`needs_intercept_fix`) and,
        when ``pixels`` is None, as the pixel source.
    pixels : numpy.ndarray, optional
        Stored values already decoded from ``ds``.
    frame : int, optional
        Frame to decode / read the rescale of for multi-frame images.

    Returns
    -------
    tuple[numpy.ndarray, float]
        The stored values to rescale and the intercept to use.  When the fix
        does not apply these are ``pixels`` unchanged (not copied) and the
        header intercept; otherwise a new int32 array and -1000.
    """
    _check_dataset(ds)
    if pixels is None:
        pixels = _decode_frame(ds, frame)
    intercept = rescale_parameters(ds, frame)[1]
    if not needs_intercept_fix(ds, intercept):
        return pixels, intercept
    # int32 so that + 1000 cannot overflow uint16 whatever sits in the unused bits.
    fixed = pixels.astype(np.int32) + _FIX_OFFSET
    fixed[fixed >= _FIX_MODULUS] -= _FIX_MODULUS
    return fixed, _FIX_INTERCEPT


def _decode_frame(ds: Dataset, frame: int | None) -> np.ndarray:
    """Decode one frame as a 2-D array of stored values (no rescale)."""
    n_frames = _number_of_frames(ds)
    if frame is None:
        if n_frames > 1:
            raise ValueError(
                f"Dataset has {n_frames} frames; pass 'frame' to choose one "
                "(multi-frame series are not supported by the series functions)"
            )
        frame = 0
    valid = isinstance(frame, numbers.Integral) and not isinstance(frame, bool)
    if not valid or not 0 <= frame < n_frames:
        raise ValueError(f"Argument 'frame' must be an integer in [0, {n_frames}), got {frame!r}")
    samples = int(_first_float(ds.get("SamplesPerPixel"), 1.0, "SamplesPerPixel"))
    if samples != 1:
        raise ValueError(f"Only grayscale images are supported, got SamplesPerPixel {samples}")
    if "PixelData" not in ds:
        for keyword in ("FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                raise ValueError(f"{keyword} is not supported: CT images hold integer Pixel Data (7FE0,0010)")
        raise ValueError("Dataset has no PixelData (7FE0,0010)")
    rows, columns = ds.get("Rows"), ds.get("Columns")
    for keyword, value in (("Rows", rows), ("Columns", columns)):
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"Attribute {keyword} must be a positive integer, got {value!r}")
    if max(rows, columns) > MAX_ROWS_COLUMNS:
        # Checked before decoding, which would take memory in proportion.
        raise ValueError(
            f"Image of {rows} x {columns} pixels not decoded: larger than CT produces "
            f"(at most {MAX_ROWS_COLUMNS} rows and columns)"
        )
    _check_native_length(ds, rows, columns, n_frames)
    # pydicom.pixels.pixel_array decodes without caching the array on the
    # dataset (a series keeps ~300 datasets alive) and can pick one frame.
    if n_frames > 1:
        pixels = _decode_pixels(ds, index=int(frame))
    else:
        pixels = _decode_pixels(ds)
    if pixels.ndim == 3 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.ndim != 2:
        raise ValueError(f"Expected a 2-D frame, decoded an array of shape {pixels.shape}")
    return pixels


def _check_native_length(ds: Dataset, rows: int, columns: int, n_frames: int) -> None:
    """Uncompressed Pixel Data must hold the pixels the header declares
    (pydicom would otherwise decode them into a wrong shape, or fail vaguely)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    bits = ds.get("BitsAllocated")
    if syntax is None or syntax.is_encapsulated or not isinstance(bits, numbers.Integral) or bits < 1:
        return  # left to the decoder
    expected = (rows * columns * n_frames * bits + 7) // 8
    actual = len(ds.PixelData)
    if actual not in (expected, expected + expected % 2):  # a value of odd length is padded to even
        frames = f" x {n_frames} frames" if n_frames > 1 else ""
        raise ValueError(
            f"Pixel Data holds {actual} bytes, but Rows x Columns x BitsAllocated/8 "
            f"({rows} x {columns} x {bits}/8{frames}) needs {expected}"
        )


def _padding_mask(ds: Dataset, pixels: np.ndarray) -> np.ndarray | None:
    """Mask of stored values equal to PixelPaddingValue (or within the range)."""
    pad = ds.get("PixelPaddingValue")
    if isinstance(pad, (MultiValue, list, tuple)):
        pad = pad[0] if len(pad) else None
    if pad is None or pad == "" or not isinstance(pad, numbers.Integral):
        return None
    # PixelPaddingValue is US or SS; a value read with the other sign must
    # still match, so cast it the way the pixels are stored (wraps).
    dtype = pixels.dtype if pixels.dtype.kind in "iu" else np.dtype(np.int64)
    pad_value = np.array(int(pad), dtype=np.int64).astype(dtype)
    limit = ds.get("PixelPaddingRangeLimit")
    if isinstance(limit, numbers.Integral):
        limit_value = np.array(int(limit), dtype=np.int64).astype(dtype)
        low, high = min(pad_value, limit_value), max(pad_value, limit_value)
        return (pixels >= low) & (pixels <= high)
    return pixels == pad_value


def to_hu(ds: Dataset, *, frame: int | None = None, fix_intercept: bool = True) -> np.ndarray:
    """Return the image in Hounsfield units.

    ``HU = stored * RescaleSlope + RescaleIntercept`` (1 and 0 when absent),
    after the RSNA bad-intercept fix (:func:`fix_bad_intercept`) where it
    applies.  Padding, i.e. stored values equal to PixelPaddingValue (or in
    [PixelPaddingValue, PixelPaddingRangeLimit]) and anything below
    :data:`PADDING_HU_THRESHOLD` after rescale (out-of-field values such as
    -2000 or -3024), is set to :data:`AIR_HU`.  Compressed transfer syntaxes
    are decoded by pydicom's installed plugins.

    The result must look like CT: an image whose field of view (the pixels
    that are not padding) holds one value only, or more than
    :data:`MAX_IMPLAUSIBLE_FRACTION` of it outside :data:`PLAUSIBLE_HU`, is
    refused, as is one with a Modality LUT Sequence: its output is unsigned
    (PS3.3 C.11.1.1.1), so it cannot hold the negative HU of air and fat,
    and CT gives HU by RescaleSlope and RescaleIntercept.

    Parameters
    ----------
    ds : pydicom.Dataset
        A single-sample image with PixelData and a file meta Transfer Syntax.
    frame : int, optional
        Frame index, required when the dataset has more than one frame.
    fix_intercept : bool, optional
        Apply the RSNA bad-intercept fix where its condition holds (default).

    Returns
    -------
    numpy.ndarray
        2-D float32 array ``(Rows, Columns)``.

    Raises
    ------
    ValueError
        If the image is multi-sample, multi-frame without ``frame``, larger
        than :data:`MAX_ROWS_COLUMNS`, has no (integer) pixel data, Pixel
        Data of another length than the header declares, invalid rescale
        values, a Modality LUT, or HU that are not plausible CT.
    """
    _check_dataset(ds)
    if ds.get("ModalityLUTSequence"):
        raise ValueError(
            "ModalityLUTSequence is not supported: its output is unsigned and cannot hold "
            "negative HU (CT gives HU by RescaleSlope and RescaleIntercept)"
        )
    pixels = _decode_frame(ds, frame)
    index = 0 if frame is None else int(frame)
    slope, intercept = rescale_parameters(ds, index)
    pad_mask = _padding_mask(ds, pixels)
    if fix_intercept:
        pixels, intercept = fix_bad_intercept(ds, pixels, frame=index)
    hu = pixels.astype(np.float32)  # always a new array: safe to modify in place
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    padding = hu < PADDING_HU_THRESHOLD
    if pad_mask is not None:
        padding |= pad_mask
    np.copyto(hu, np.float32(AIR_HU), where=padding)
    _check_plausible(hu, padding)
    return hu


def _check_plausible(hu: np.ndarray, padding: np.ndarray) -> None:
    """Refuse HU that no CT gives: a blank image (a slope of 0, a constant
    frame) or much of the field of view out of range (signed data declared
    unsigned, a wrong rescale), which the model would score as if real."""
    # Whole-array passes, no masked ones (several times slower): padding is
    # AIR_HU by now, inside the range, so it adds to no count below.
    n_field = hu.size - int(np.count_nonzero(padding))
    if n_field == 0:
        raise ValueError("Image is blank: every pixel is padding (outside the field of view)")
    low, high = float(hu.min()), float(hu.max())
    if n_field < hu.size and AIR_HU in (low, high):  # the padding may be the one other value
        field = hu[~padding]
        low, high = float(field.min()), float(field.max())
    if low == high:
        raise ValueError(f"Image is blank: every pixel in its field of view is {low:g} HU")
    outside = int(np.count_nonzero(hu < PLAUSIBLE_HU[0])) + int(np.count_nonzero(hu > PLAUSIBLE_HU[1]))
    if outside > MAX_IMPLAUSIBLE_FRACTION * n_field:
        raise ValueError(
            f"HU not plausible for CT: {outside / n_field:.0%} of the field of view is outside "
            f"[{PLAUSIBLE_HU[0]:g}, {PLAUSIBLE_HU[1]:g}] (values {low:g} to {high:g}); "
            "a wrong PixelRepresentation or rescale?"
        )


# --------------------------------------------------------------------------
# Geometry and slice order
# --------------------------------------------------------------------------


def _vector(ds: Dataset, keyword: str, length: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None and keyword == "ImageOrientationPatient":
        # Enhanced images keep the orientation in the shared functional groups.
        item = _from_functional_groups(ds, "PlaneOrientationSequence", 0)
        value = None if item is None else item.get(keyword)
    if value is None or value == "":
        raise ValueError(f"Dataset has no {keyword}")
    # Python floats, not numpy calls: selection and ordering run this several
    # times per slice, where numpy's per-call cost on six numbers dominates.
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(
            f"Attribute {keyword} must hold {length} numbers, got {value!r}"
        ) from None
    if len(numbers) != length or not all(map(math.isfinite, numbers)):
        raise ValueError(f"Attribute {keyword} must hold {length} finite numbers, got {value!r}")
    return np.array(numbers, dtype=np.float64)


def sop_class_uid(ds: Dataset) -> str:
    """The SOP Class UID, from the file meta where the data set lacks it (the
    RSNA files); "" when neither has one."""
    value = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
    return str(value or "").strip()


def image_position(ds: Dataset) -> np.ndarray:
    """Return ImagePositionPatient as a float64 ``(3,)`` vector, in mm.

    Raises
    ------
    ValueError
        If it is missing or does not hold three finite numbers.
    """
    _check_dataset(ds)
    return _vector(ds, "ImagePositionPatient", 3)


def slice_normal(ds: Dataset) -> np.ndarray:
    """Return the unit slice normal, row cosines x column cosines.

    Parameters
    ----------
    ds : pydicom.Dataset
        An image with ImageOrientationPatient.

    Returns
    -------
    numpy.ndarray
        Float64 vector of shape ``(3,)`` in patient (LPS) coordinates; for
        axial images ``[0, 0, 1]`` (towards the head).

    Raises
    ------
    ValueError
        If ImageOrientationPatient is missing or malformed, or its row and
        column cosines are not unit vectors at right angles (within
        :data:`ORIENTATION_TOLERANCE`): a sheared or scaled plane is no
        slice geometry, and normalising it would hide that.
    """
    _check_dataset(ds)
    iop = _vector(ds, "ImageOrientationPatient", 6).tolist()
    r0, r1, r2, c0, c1, c2 = iop
    row_length, column_length = math.hypot(r0, r1, r2), math.hypot(c0, c1, c2)
    if max(abs(row_length - 1), abs(column_length - 1)) > ORIENTATION_TOLERANCE:
        raise ValueError(
            "ImageOrientationPatient's row and column cosines must be unit vectors, "
            f"got lengths {row_length:.4g} and {column_length:.4g}: {_listed(iop)}"
        )
    normal = (r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0)  # rows x columns
    norm = math.hypot(*normal)
    if norm < 1e-6:
        raise ValueError(f"ImageOrientationPatient has parallel row and column cosines: {_listed(iop)}")
    cosine = r0 * c0 + r1 * c1 + r2 * c2
    if abs(cosine) > ORIENTATION_TOLERANCE:
        angle = math.degrees(math.acos(max(-1.0, min(1.0, cosine))))
        raise ValueError(
            "ImageOrientationPatient's row and column cosines must be at right angles, "
            f"got {angle:.4g} degrees: {_listed(iop)}"
        )
    return np.array(normal) / norm


def _listed(values: Sequence[float]) -> str:
    """Numbers for a message, short whatever their size (1e+300, not 301 digits)."""
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def slice_positions(datasets: Sequence[Dataset]) -> np.ndarray:
    """Return each slice's position along the common slice normal, in mm.

    The common normal is the normalised mean of the slices' normals (they
    are expected to share one orientation; series selection rejects mixed
    ones), turned towards the head: row and column cosines whose cross
    product points to the feet (some feet-first or mirrored reconstructions)
    still give positions that ascend from feet to head.  Projecting
    ImagePositionPatient on the normal, rather than taking its z, gives the
    true slice spacing under gantry tilt.

    Parameters
    ----------
    datasets : Sequence[pydicom.Dataset]
        Single-frame images with ImagePositionPatient and
        ImageOrientationPatient.

    Returns
    -------
    numpy.ndarray
        Float64 array of shape ``(N,)``, in the order of ``datasets``.

    Raises
    ------
    ValueError
        If a dataset lacks either attribute (the message names its index) or
        the orientations cancel out.
    """
    datasets = list(datasets)
    if not datasets:
        return np.empty(0, dtype=np.float64)
    normals = np.empty((len(datasets), 3))
    origins = np.empty((len(datasets), 3))
    for i, ds in enumerate(datasets):
        _check_dataset(ds, f"datasets[{i}]")
        try:
            normals[i] = slice_normal(ds)
            origins[i] = image_position(ds)
        except ValueError as exc:
            raise ValueError(f"datasets[{i}]: {exc}") from None
    normal = normals.mean(axis=0)
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        raise ValueError("The slices' orientations disagree: their normals cancel out")
    if normal[2] < 0:
        normal = -normal
    return origins @ (normal / norm)


def _instance_number(ds: Dataset) -> float | None:
    try:
        value = _first_float(ds.get("InstanceNumber"), math.nan, "InstanceNumber")
    except ValueError:
        return None
    return None if math.isnan(value) else value


def order_slices(datasets: Sequence[Dataset]) -> list[int]:
    """Return the indices of ``datasets`` in ascending slice position.

    Slices are sorted by :func:`slice_positions` (projection on the slice
    normal, correct under gantry tilt); ties are broken by InstanceNumber,
    then by input order.  When any slice lacks ImagePositionPatient or
    ImageOrientationPatient, the order falls back to ascending
    InstanceNumber (with a warning), whose direction is then whatever the
    scanner numbered.

    Parameters
    ----------
    datasets : Sequence[pydicom.Dataset]
        Single-frame images of one series.

    Returns
    -------
    list[int]
        A permutation of ``range(len(datasets))``.

    Raises
    ------
    ValueError
        If positions are missing and so is an InstanceNumber.
    """
    datasets = list(datasets)
    n = len(datasets)
    if n <= 1:
        for i, ds in enumerate(datasets):
            _check_dataset(ds, f"datasets[{i}]")
        return list(range(n))
    instance = [_instance_number(ds) if isinstance(ds, Dataset) else None for ds in datasets]
    try:
        positions = slice_positions(datasets)
    except ValueError as exc:
        missing = [i for i, value in enumerate(instance) if value is None]
        if missing:
            raise ValueError(
                f"Cannot order slices: {exc}, and datasets[{missing[0]}] has no InstanceNumber"
            ) from None
        logger.warning("Ordering %d slices by InstanceNumber: %s", n, exc)
        return sorted(range(n), key=lambda i: (instance[i], i))
    tie = np.array([math.inf if v is None else v for v in instance])
    # np.lexsort sorts by the last key first and is stable.
    return [int(i) for i in np.lexsort((np.arange(n), tie, positions))]


def tilt_degrees(ds: Dataset) -> float:
    """Return the angle in degrees between the slice normal and patient z.

    0 for a pure axial slice, about 18.5 for a gantry tilt of 18.5 degrees,
    90 for sagittal or coronal slices.  The sign of the normal is ignored.
    Computed from ImageOrientationPatient (GantryDetectorTilt is optional
    and not always consistent with it).
    """
    normal = slice_normal(ds)
    return math.degrees(math.acos(min(1.0, abs(float(normal[2])))))


# --------------------------------------------------------------------------
# Windows, resizing, context
# --------------------------------------------------------------------------


def _window_planes(hu: np.ndarray, lower: np.ndarray, inverse_width: np.ndarray) -> np.ndarray:
    """Windows as channel-first planes ``(C, *hu.shape)``.

    Channel-first keeps every operation on contiguous memory: broadcasting
    into a trailing axis of 3 is several times slower.
    """
    planes = np.empty((len(lower),) + hu.shape, dtype=np.float32)
    for c in range(len(lower)):
        np.subtract(hu, lower[c], out=planes[c])
        planes[c] *= inverse_width[c]
    np.clip(planes, 0.0, 1.0, out=planes)
    return planes


def apply_windows(
    hu: np.ndarray, windows: Sequence[tuple[float, float]] = DEFAULT_WINDOWS
) -> np.ndarray:
    """Map HU to ``[0, 1]`` through each window, one channel per window.

    For a window ``(center, width)`` the value is
    ``clip((hu - (center - width / 2)) / width, 0, 1)``: HU 40 in the brain
    window (40, 80) gives 0.5, HU 0 gives 0 and HU 80 gives 1.  (Linear
    over the full width, not DICOM's VOI formula with its half-unit shifts.)

    Parameters
    ----------
    hu : numpy.ndarray
        Array of any shape, in HU.
    windows : Sequence[tuple[float, float]], optional
        ``(center, width)`` pairs with positive widths.

    Returns
    -------
    numpy.ndarray
        Float32 array of shape ``hu.shape + (len(windows),)``.
    """
    lower, inverse_width = _check_windows(windows)
    hu = np.asarray(hu, dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis(_window_planes(hu, lower, inverse_width), 0, -1))


def _take(x: np.ndarray, axis: int, index: slice | np.ndarray) -> np.ndarray:
    key: list[Any] = [slice(None)] * x.ndim
    key[axis] = index
    return x[tuple(key)]


def _resize_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Resize float32 ``x`` along one axis (area down, bilinear up)."""
    n_in = x.shape[axis]
    if n_out == n_in:
        return x
    shape = [1] * x.ndim
    shape[axis] = n_out
    if n_in % n_out == 0:
        # Integer factor: exact block mean as a sum of strided views.
        factor = n_in // n_out
        out = _take(x, axis, slice(0, None, factor)) + _take(x, axis, slice(1, None, factor))
        for k in range(2, factor):
            out += _take(x, axis, slice(k, None, factor))
        out *= np.float32(1.0 / factor)
        return out
    if n_out < n_in:
        # Area average over fractional pixel footprints: the integral of a
        # piecewise-constant signal is piecewise linear in its cumulative sum.
        edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
        cumulative = np.cumsum(x, axis=axis, dtype=np.float64)
        zero = np.zeros_like(_take(cumulative, axis, slice(0, 1)))
        cumulative = np.concatenate([zero, cumulative], axis=axis)
        k = np.minimum(np.floor(edges).astype(np.intp), n_in - 1)
        frac = (edges - k).reshape([n_out + 1 if a == axis else 1 for a in range(x.ndim)])
        integral = _take(cumulative, axis, k) + frac * _take(x, axis, k)
        area = _take(integral, axis, slice(1, None)) - _take(integral, axis, slice(None, -1))
        return (area * (n_out / n_in)).astype(np.float32)
    # Upscale: bilinear with half-pixel centres (as keras/TF "bilinear").
    source = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    source = np.clip(source, 0.0, n_in - 1)
    low = np.minimum(np.floor(source).astype(np.intp), max(n_in - 2, 0))
    high = np.minimum(low + 1, n_in - 1)
    weight = (source - low).astype(np.float32).reshape(shape)
    below = _take(x, axis, low)
    return below + weight * (_take(x, axis, high) - below)


def _resize_2d(x: np.ndarray, size: tuple[int, int], axes: tuple[int, int]) -> np.ndarray:
    x = _resize_axis(x, size[0], axes[0])
    x = _resize_axis(x, size[1], axes[1])
    return np.ascontiguousarray(x, dtype=np.float32)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an image to ``size`` = ``(height, width)``.

    Separable, per axis: an integer downscale factor is an exact block mean
    (512 -> 256 averages 2x2 blocks), another downscale an area average over
    fractional footprints, an upscale bilinear interpolation with half-pixel
    centres.  A constant image stays constant; downscaling keeps the mean.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` or ``(H, W, C)`` array.
    size : tuple[int, int]
        Output ``(height, width)``, positive integers.

    Returns
    -------
    numpy.ndarray
        Float32 array ``size`` or ``size + (C,)``; a new array even when the
        size is unchanged.
    """
    size = _check_size(size)
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(
            "Argument 'image' must be a non-empty (H, W) or (H, W, C) array, "
            f"got shape {image.shape}"
        )
    out = _resize_2d(image.astype(np.float32, copy=False), size, (0, 1))
    # Same size and already float32: never hand back the caller's array.
    return out.copy() if np.shares_memory(out, image) else out


def context_indices(n: int, context: int, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """``(len(rows), 2 * context + 1)`` indices of the slices stacked for each row.

    Row ``i`` takes slices ``i - context`` ... ``i + context``, edge slices
    repeated beyond the ends: the rule of :func:`stack_context`, for callers
    that gather the neighbours themselves (the worker, on the model's device).
    """
    context = _check_context(context)
    index = np.arange(n) if rows is None else np.asarray(rows, dtype=np.intp)
    return np.clip(index[:, None] + np.arange(-context, context + 1)[None, :], 0, max(n - 1, 0))


def stack_context(
    volume: np.ndarray,
    context: int,
    *,
    rows: Sequence[int] | np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Stack each slice with its neighbours along the channel axis (2.5D).

    For slice ``i`` the channels are slices ``i - context`` ... ``i +
    context`` (edge slices repeated beyond the ends), each with its ``C``
    channels in order: output channel ``j * C + c`` is channel ``c`` of
    slice ``clip(i - context + j, 0, N - 1)``.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(N, H, W, C)`` array, slices in order.
    context : int
        Neighbours on each side; 0 returns ``volume`` (or its ``rows``) itself.
    rows : sequence of int, optional
        Only these slices (default: all), so a caller can stack one batch at
        a time instead of the whole series (300 slices at 256x256 with 9
        channels would be ~700 MB).
    out : numpy.ndarray, optional
        C-contiguous ``(len(rows), H, W, C * (2 * context + 1))`` array to
        write into, e.g. a batch buffer reused from call to call.

    Returns
    -------
    numpy.ndarray
        ``(len(rows), H, W, C * (2 * context + 1))`` array of ``volume``'s dtype.
    """
    context = _check_context(context)
    volume = np.asarray(volume)
    if volume.ndim != 4:
        raise ValueError(f"Argument 'volume' must be (N, H, W, C), got shape {volume.shape}")
    n, height, width, channels = volume.shape
    index = np.arange(n) if rows is None else np.asarray(rows, dtype=np.intp)
    if context == 0 and out is None:
        return volume if rows is None else volume[index]
    span = 2 * context + 1
    shape = (len(index), height, width, span * channels)
    if out is None:
        out = np.empty(shape, dtype=volume.dtype)
    elif out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"Argument 'out' must be a C-contiguous array of shape {shape}, got {out.shape}")
    if n and channels:
        # Each pixel's C channels copied as one opaque item, slice by slice:
        # about 3x faster than strided float copies through a gathered temporary.
        item = f"V{volume.dtype.itemsize * channels}"
        source = np.ascontiguousarray(volume).view(item)[..., 0]  # (N, H, W)
        target = out.view(item)  # (rows, H, W, span)
        for r, neighbours in enumerate(context_indices(n, context, index)):
            for j, neighbour in enumerate(neighbours):
                target[r, :, :, j] = source[neighbour]
    return out


# --------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------


def _preprocess(
    ds: Dataset,
    lower: np.ndarray,
    inverse_width: np.ndarray,
    size: tuple[int, int],
    frame: int | None,
) -> np.ndarray:
    hu = _pad_to_shape_of(to_hu(ds, frame=frame), size)
    out = np.empty(size + (len(lower),), dtype=np.float32)
    # One full-size plane at a time, reused: fewer large allocations (each a
    # fresh mmap and page faults) than windowing all channels first.  The
    # arithmetic is that of resize(apply_windows(...)), bit for bit.
    plane = np.empty_like(hu)
    for c in range(len(lower)):
        np.subtract(hu, lower[c], out=plane)
        plane *= inverse_width[c]
        np.clip(plane, 0.0, 1.0, out=plane)
        out[:, :, c] = _resize_2d(plane, size, (0, 1))
    return out


def _pad_to_shape_of(hu: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``hu`` with air added evenly on two sides to the aspect ratio of
    ``size``: a 512 x 640 reconstruction is not squeezed into the square
    input, where the head would look narrower than the model ever saw it."""
    rows, columns = hu.shape
    wanted_rows = max(rows, round(columns * size[0] / size[1]))
    wanted_columns = max(columns, round(rows * size[1] / size[0]))
    if (wanted_rows, wanted_columns) == (rows, columns):
        return hu
    top, left = (wanted_rows - rows) // 2, (wanted_columns - columns) // 2
    padded = np.full((wanted_rows, wanted_columns), AIR_HU, dtype=hu.dtype)
    padded[top : top + rows, left : left + columns] = hu
    return padded


def preprocess_slice(
    ds: Dataset,
    windows: Sequence[tuple[float, float]] = DEFAULT_WINDOWS,
    size: tuple[int, int] = (256, 256),
    *,
    frame: int | None = None,
) -> np.ndarray:
    """Return one slice as model input: :func:`to_hu`, air added to the aspect
    ratio of ``size``, :func:`apply_windows`, :func:`resize`.

    Parameters
    ----------
    ds : pydicom.Dataset
        The image.
    windows : Sequence[tuple[float, float]], optional
        ``(center, width)`` per output channel.
    size : tuple[int, int], optional
        Output ``(height, width)``.
    frame : int, optional
        Frame of a multi-frame image.

    Returns
    -------
    numpy.ndarray
        Float32 ``(height, width, len(windows))`` in ``[0, 1]``.
    """
    lower, inverse_width = _check_windows(windows)
    return _preprocess(ds, lower, inverse_width, _check_size(size), frame)


def preprocess_series(
    datasets: Sequence[Dataset],
    windows: Sequence[tuple[float, float]] = DEFAULT_WINDOWS,
    size: tuple[int, int] = (256, 256),
    context: int = 0,
) -> tuple[np.ndarray, list[int]]:
    """Order a series and return its model input volume.

    Parameters
    ----------
    datasets : Sequence[pydicom.Dataset]
        Single-frame images of one series, in any order.
    windows : Sequence[tuple[float, float]], optional
        ``(center, width)`` per channel.
    size : tuple[int, int], optional
        Output ``(height, width)`` of every slice (slices of other sizes are
        resized too, after air is added to keep their aspect ratio).
    context : int, optional
        Neighbouring slices on each side stacked as channels
        (:func:`stack_context`).

    Returns
    -------
    tuple[numpy.ndarray, list[int]]
        Float32 ``(N, height, width, len(windows) * (2 * context + 1))`` and
        the order used (:func:`order_slices`): row ``i`` of the volume is
        ``datasets[order[i]]``.

    Raises
    ------
    ValueError
        If ``datasets`` is empty, an argument is invalid or the slices cannot
        be ordered.  Decoding errors are re-raised with a note naming the
        slice's index and SOPInstanceUID.
    """
    lower, inverse_width = _check_windows(windows)
    size = _check_size(size)
    context = _check_context(context)
    datasets = list(datasets)
    if not datasets:
        raise ValueError("Argument 'datasets' must hold at least one dataset, got none")
    order = order_slices(datasets)
    volume = np.empty((len(datasets),) + size + (len(lower),), dtype=np.float32)
    for row, index in enumerate(order):
        ds = datasets[index]
        try:
            volume[row] = _preprocess(ds, lower, inverse_width, size, None)
        except Exception as exc:
            uid = ds.get("SOPInstanceUID", "?")
            exc.add_note(f"while preprocessing datasets[{index}] (SOPInstanceUID {uid})")
            raise
    return stack_context(volume, context), order


# --------------------------------------------------------------------------
# Process set-up
# --------------------------------------------------------------------------

# glibc's mallopt parameters, and the sizes below which freed memory is kept.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEPT_ALLOCATION_BYTES = 16 << 20
_KEPT_FREE_HEAP_BYTES = 32 << 20


def keep_freed_memory() -> bool:
    """Have this process keep freed memory for reuse; True where it could (glibc).

    Decoding and preprocessing allocate and free several ~1 MB arrays per
    slice. By default glibc returns them to the system on free, so every slice
    page-faults its memory in again, which halves the rate of a process that
    reads slice after slice (``benchmarks/preprocess.py``). Call it once at
    the start of such a process: it then keeps allocations under 16 MiB on
    its heap and up to 32 MiB of free heap (fixed thresholds, where glibc
    would otherwise adjust them as it goes).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEPT_ALLOCATION_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _KEPT_FREE_HEAP_BYTES)
    )
