"""Series -> volume with geometry (inference.volume): sorting, orientation,
laterality, refusals, pixel decoding, enhanced multi-frame, DWI selection and
resampling. Every series is built in memory (a few 8-16 pixel slices)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from io import BytesIO

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from inference.errors import (
    DuplicateSlicesError,
    GantryTiltError,
    GeometryError,
    InferenceError,
    MissingSlicesError,
    MixedOrientationError,
    NoMatchingBValueError,
    PixelDataError,
)
from inference.volume import (
    FrameSelection,
    Volume,
    b_value,
    resample_to,
    select_b_value,
    split_by_b_value,
    stack_channels,
    volume_from_datasets,
)

AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
CORONAL = ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0))
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))


def _ds_values(values: Sequence[float]) -> list[float]:
    return [round(float(v), 6) for v in values]  # DS strings are at most 16 characters


def make_slices(
    pixels: np.ndarray,
    *,
    origin: Sequence[float] | np.ndarray = (0.0, 0.0, 0.0),
    orientation: tuple[Sequence[float], Sequence[float]] = AXIAL,
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0),
    step: Sequence[float] | None = None,
    series_uid: str | None = None,
    for_uid: str | None = None,
    slope: float | None = None,
    intercept: float | None = None,
) -> list[Dataset]:
    """One single-frame MR instance per ``pixels[k]`` (int16, rows x cols).

    Slice k lies at ``origin + k * step`` (default: slice spacing along the normal).
    ``spacing`` is (column, row, slice) spacing in mm.
    """
    row, col = np.asarray(orientation[0], float), np.asarray(orientation[1], float)
    normal = np.cross(row, col)
    step_v = np.asarray(step, float) if step is not None else spacing[2] * normal
    series_uid = series_uid or generate_uid()
    for_uid = for_uid or generate_uid()
    out = []
    for k, frame in enumerate(pixels):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = _ds_values(np.asarray(origin, float) + k * step_v)
        ds.ImageOrientationPatient = _ds_values([*row, *col])
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = frame.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        if slope is not None:
            ds.RescaleSlope = slope
        if intercept is not None:
            ds.RescaleIntercept = intercept
        ds.PixelData = np.ascontiguousarray(frame, dtype=np.int16).tobytes()
        out.append(ds)
    return out


def numbered(n: int, rows: int = 6, cols: int = 5) -> np.ndarray:
    """Slice k is filled with 10*(k+1): the value tells which slice a voxel came from."""
    return np.stack([np.full((rows, cols), 10 * (k + 1), np.int16) for k in range(n)])


def make_enhanced(
    slices: list[Dataset], frame_order: Sequence[int], *, per_frame_intercept: float | None = None
) -> Dataset:
    """An Enhanced CT instance holding ``slices`` as frames, in ``frame_order``.

    Orientation, pixel measures and a (deliberately wrong when overridden) rescale
    go in the shared functional groups; positions, and ``per_frame_intercept`` if
    given, in the per-frame groups.
    """
    first = slices[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = first.SeriesInstanceUID
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.NumberOfFrames = len(frame_order)
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated"):
        setattr(ds, keyword, getattr(first, keyword))
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = first.BitsStored, first.HighBit, first.PixelRepresentation
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PlaneOrientationSequence = [orientation]
    measures = Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    shared.PixelMeasuresSequence = [measures]
    rescale = Dataset()
    rescale.RescaleSlope = first.get("RescaleSlope", 1)
    rescale.RescaleIntercept = -999 if per_frame_intercept is not None else first.get("RescaleIntercept", 0)
    rescale.RescaleType = "HU"
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in frame_order:
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = slices[k].ImagePositionPatient
        item.PlanePositionSequence = [position]
        if per_frame_intercept is not None:
            own = Dataset()
            own.RescaleSlope = first.get("RescaleSlope", 1)
            own.RescaleIntercept = per_frame_intercept
            own.RescaleType = "HU"
            item.PixelValueTransformationSequence = [own]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = b"".join(slices[k].PixelData for k in frame_order)
    return ds


def pydicom_file(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available offline")
    return pydicom.dcmread(path)


# --------------------------------------------------------------------------- sorting and geometry


def test_shuffled_axial_series_is_sorted_by_position_not_instance_number() -> None:
    slices = make_slices(numbered(7), origin=(-2.0, -3.0, 10.0), spacing=(0.5, 0.75, 2.5))
    expected_sops = [ds.SOPInstanceUID for ds in slices]
    for ds in slices:
        ds.InstanceNumber = 100 - ds.InstanceNumber  # reversed: must be ignored
    shuffled = slices[:]
    random.Random(3).shuffle(shuffled)

    vol = volume_from_datasets(shuffled)

    assert vol.shape == (7, 6, 5)
    assert vol.array.dtype == np.float32
    assert [float(vol.array[k, 0, 0]) for k in range(7)] == [10.0 * (k + 1) for k in range(7)]
    assert list(vol.sop_uids) == expected_sops
    assert vol.frame_numbers is None
    np.testing.assert_allclose(vol.origin, [-2.0, -3.0, 10.0])
    assert vol.spacing == pytest.approx((0.5, 0.75, 2.5))
    np.testing.assert_allclose(vol.direction, np.eye(3))
    assert vol.series_uid == slices[0].SeriesInstanceUID
    assert vol.frame_of_reference_uid == slices[0].FrameOfReferenceUID
    assert vol.voxel_volume_ml == pytest.approx(0.5 * 0.75 * 2.5 / 1000)


def test_sop_uids_name_the_instance_that_holds_each_slice() -> None:
    pixels = np.random.default_rng(1).integers(0, 1000, size=(5, 4, 6)).astype(np.int16)
    slices = make_slices(pixels, orientation=SAGITTAL)
    random.Random(0).shuffle(slices)
    vol = volume_from_datasets(slices)
    by_uid = {ds.SOPInstanceUID: ds for ds in slices}
    for k, uid in enumerate(vol.sop_uids):
        np.testing.assert_array_equal(vol.array[k], by_uid[uid].pixel_array)
        np.testing.assert_allclose(vol.index_to_lps((0, 0, k)), [float(v) for v in by_uid[uid].ImagePositionPatient])


@pytest.mark.parametrize(
    ("orientation", "normal"),
    [(AXIAL, (0, 0, 1)), (CORONAL, (0, 1, 0)), (SAGITTAL, (-1, 0, 0))],
    ids=["axial", "coronal", "sagittal"],
)
def test_orientation_gives_direction_and_index_to_lps_matches_each_slice(
    orientation: tuple[Sequence[float], Sequence[float]], normal: tuple[int, int, int]
) -> None:
    spacing = (0.7, 0.9, 3.0)
    slices = make_slices(numbered(4), origin=(12.0, -40.0, 55.0), orientation=orientation, spacing=spacing)
    vol = volume_from_datasets(list(reversed(slices)))

    np.testing.assert_allclose(vol.direction[:, 0], orientation[0])
    np.testing.assert_allclose(vol.direction[:, 1], orientation[1])
    np.testing.assert_allclose(vol.direction[:, 2], normal)
    by_uid = {ds.SOPInstanceUID: ds for ds in slices}
    for k, uid in enumerate(vol.sop_uids):
        ipp = np.array([float(v) for v in by_uid[uid].ImagePositionPatient])
        np.testing.assert_allclose(vol.index_to_lps((0, 0, k)), ipp, atol=1e-6)
        # DICOM pixel (row r, column c) lies at IPP + c * colspacing * row_dir + r * rowspacing * col_dir
        r, c = 3, 2
        expected = ipp + c * spacing[0] * np.array(orientation[0]) + r * spacing[1] * np.array(orientation[1])
        np.testing.assert_allclose(vol.index_to_lps((c, r, k)), expected, atol=1e-6)
        np.testing.assert_allclose(vol.lps_to_index(expected), (c, r, k), atol=1e-9)


@pytest.mark.parametrize("row_x", [1.0, -1.0], ids=["columns-to-left", "columns-to-right"])
def test_laterality_marker_on_patient_left_maps_to_its_voxel(row_x: float) -> None:
    """A marker placed by DICOM rules at LPS x = +30 mm (patient LEFT) must be found there."""
    rows, cols, n = 8, 64, 3
    spacing = (1.0, 1.0, 2.0)
    row, col = np.array([row_x, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    normal = np.cross(row, col)  # +z for row_x = 1, -z for row_x = -1
    marker_lps = np.array([30.5, 1.0, 2.0])  # patient left
    origin = np.array([-31.5 * row_x, -4.0, 2.0 - spacing[2] * normal[2]])  # the marker is in slice 1
    # DICOM: pixel (r, c) of slice k lies at origin + c * dx * row + r * dy * col + k * dz * normal
    offset = marker_lps - origin
    c, r, k = (int(round(offset @ axis / d)) for axis, d in zip((row, col, normal), spacing, strict=True))
    assert (r, k) == (5, 1) and c == (62 if row_x > 0 else 1)
    pixels = np.zeros((n, rows, cols), np.int16)
    pixels[k, r, c] = 1000
    slices = make_slices(pixels, origin=origin, orientation=((row_x, 0, 0), (0, 1, 0)), spacing=spacing)
    vol = volume_from_datasets(slices)

    idx = np.rint(vol.lps_to_index(marker_lps)).astype(int)
    assert vol.array[idx[2], idx[1], idx[0]] == 1000
    z, y, x = np.argwhere(vol.array == 1000)[0]
    lps = vol.index_to_lps((x, y, z))
    assert lps[0] > 0, "the marker must be on the patient's left (+x in LPS)"
    np.testing.assert_allclose(lps, marker_lps, atol=1e-6)
    image = vol.to_sitk()
    assert image.TransformPhysicalPointToIndex(tuple(marker_lps)) == (x, y, z)


# --------------------------------------------------------------------------- refusals


def test_missing_slice_names_the_positions() -> None:
    slices = make_slices(numbered(8), origin=(0, 0, 0), spacing=(1, 1, 2.5))
    del slices[3]  # 7.5 mm
    with pytest.raises(MissingSlicesError, match=r"between positions 5\.00 and 10\.00 mm") as info:
        volume_from_datasets(slices)
    message = str(info.value)
    assert slices[0].SeriesInstanceUID in message
    assert "expected spacing 2.50 mm" in message and "gap 5.00 mm" in message and "resend" in message


def test_mixed_orientations_are_refused() -> None:
    slices = make_slices(numbered(4))
    localizer = make_slices(numbered(1), orientation=CORONAL, series_uid=slices[0].SeriesInstanceUID)[0]
    localizer.FrameOfReferenceUID = slices[0].FrameOfReferenceUID
    with pytest.raises(MixedOrientationError, match="orientation") as info:
        volume_from_datasets([*slices, localizer])
    assert localizer.SOPInstanceUID in str(info.value)
    assert isinstance(info.value, GeometryError)


def test_gantry_tilt_is_refused_with_its_angle_then_resampled_on_request() -> None:
    n, rows, cols = 5, 12, 6
    pixels = np.zeros((n, rows, cols), np.int16)
    for k in range(n):
        pixels[k, 6 - k, :] = 100  # a structure at LPS y = 6 mm; slice k's first row is at y = k mm
    slices = make_slices(pixels, spacing=(1.0, 1.0, 2.0), step=(0.0, 1.0, 2.0))  # 1 mm shift per 2 mm slice
    angle = math.degrees(math.atan2(1.0, 2.0))
    with pytest.raises(GantryTiltError, match=f"{angle:.1f} degrees") as info:
        volume_from_datasets(slices)
    assert "allow_resample=True" in str(info.value)

    vol = volume_from_datasets(slices, allow_resample=True)
    assert vol.shape == (n, rows, cols)
    np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-12)
    assert vol.spacing == pytest.approx((1.0, 1.0, 2.0))
    np.testing.assert_allclose(vol.origin, [0.0, 0.0, 0.0])
    assert vol.sop_uids == tuple(ds.SOPInstanceUID for ds in slices)
    np.testing.assert_allclose(vol.array[:, 6, :], 100.0, atol=1e-4)  # now at one row in every slice
    assert np.count_nonzero(vol.array > 50) == n * cols


def test_duplicate_positions_name_the_instances() -> None:
    slices = make_slices(numbered(4))
    twin = make_slices(numbered(1), series_uid=slices[0].SeriesInstanceUID, for_uid=slices[0].FrameOfReferenceUID)
    with pytest.raises(DuplicateSlicesError) as info:
        volume_from_datasets([*slices, twin[0]])
    assert twin[0].SOPInstanceUID in str(info.value) and slices[0].SOPInstanceUID in str(info.value)


def test_duplicates_that_differ_in_b_value_point_to_the_diffusion_split() -> None:
    b0 = make_slices(numbered(3))
    b1000 = make_slices(numbered(3), series_uid=b0[0].SeriesInstanceUID, for_uid=b0[0].FrameOfReferenceUID)
    for ds in b0:
        ds.DiffusionBValue = 0
    for ds in b1000:
        ds.DiffusionBValue = 1000
    with pytest.raises(DuplicateSlicesError, match="split_by_b_value"):
        volume_from_datasets(b0 + b1000)


def test_same_instance_twice_is_used_once() -> None:
    slices = make_slices(numbered(3))
    assert volume_from_datasets([*slices, slices[1]]).shape[0] == 3


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: s.clear(), "no images given"),
        (lambda s: delattr(s[1], "ImagePositionPatient"), "no ImagePositionPatient"),
        (lambda s: delattr(s[0], "ImageOrientationPatient"), "no ImageOrientationPatient"),
        (lambda s: setattr(s[2], "SeriesInstanceUID", generate_uid()), "2 series"),
        (lambda s: setattr(s[2], "FrameOfReferenceUID", generate_uid()), "frames of reference"),
        (lambda s: setattr(s[2], "PixelSpacing", [0.5, 0.5]), "PixelSpacing"),
    ],
    ids=["empty", "no-position", "no-orientation", "two-series", "two-frames-of-reference", "pixel-spacing"],
)
def test_unusable_input_raises_geometry_error(mutate: object, match: str) -> None:
    slices = make_slices(numbered(3))
    mutate(slices)  # type: ignore[operator]
    with pytest.raises(GeometryError, match=match):
        volume_from_datasets(slices)


def test_irregular_spacing_is_refused() -> None:
    slices = make_slices(numbered(5), spacing=(1, 1, 2.0))
    slices[2].ImagePositionPatient = [0.0, 0.0, 4.6]  # 2.6 then 1.4 mm: not a whole missing slice
    with pytest.raises(GeometryError, match="irregular slice spacing"):
        volume_from_datasets(slices)


# --------------------------------------------------------------------------- pixel data


def test_rescale_slope_and_intercept_are_applied() -> None:
    pixels = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    vol = volume_from_datasets(make_slices(pixels, slope=2.5, intercept=-1024))
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, pixels * 2.5 - 1024)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_compressed_instance_gives_the_same_volume_as_its_uncompressed_twin(name: str) -> None:
    reference = volume_from_datasets([pydicom_file("MR_small.dcm")])
    compressed = pydicom_file(name)
    assert compressed.file_meta.TransferSyntaxUID.is_compressed
    vol = volume_from_datasets([compressed])
    np.testing.assert_array_equal(vol.array, reference.array)
    np.testing.assert_allclose(vol.origin, reference.origin)
    assert vol.spacing == reference.spacing


def test_truncated_pixel_data_raises_pixel_data_error() -> None:
    ds = pydicom_file("MR_small.dcm")
    ds.PixelData = ds.PixelData[:-100]
    with pytest.raises(PixelDataError) as info:
        volume_from_datasets([ds])
    assert ds.SOPInstanceUID in str(info.value)
    assert "Explicit VR Little Endian" in str(info.value)
    assert "resend" in str(info.value)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupt_compressed_pixel_data_raises_pixel_data_error() -> None:
    ds = pydicom_file("MR_small_RLE.dcm")
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[64:] = b"\xff" * (len(frame) - 64)
    ds.PixelData = encapsulate([bytes(frame)])
    with pytest.raises(PixelDataError, match="RLE Lossless") as info:
        volume_from_datasets([ds])
    assert ds.SOPInstanceUID in str(info.value)


# --------------------------------------------------------------------------- enhanced multi-frame


def test_enhanced_multiframe_gives_the_same_volume_as_its_single_frame_twin() -> None:
    pixels = np.random.default_rng(7).integers(0, 3000, size=(5, 6, 7)).astype(np.int16)
    slices = make_slices(pixels, origin=(5, -8, 20), orientation=CORONAL, spacing=(0.8, 0.6, 1.5), intercept=-1024)
    order = [3, 0, 4, 1, 2]
    enhanced = make_enhanced(slices, order, per_frame_intercept=-1024)  # shared says -999: per-frame must win

    single = volume_from_datasets(slices)
    multi = volume_from_datasets([enhanced])

    np.testing.assert_array_equal(multi.array, single.array)
    np.testing.assert_allclose(multi.origin, single.origin)
    np.testing.assert_allclose(multi.direction, single.direction)
    assert multi.spacing == pytest.approx(single.spacing)
    assert multi.sop_uids == (enhanced.SOPInstanceUID,) * 5
    # frame_numbers[k] is the 1-based frame holding sorted slice k
    assert multi.frame_numbers == tuple(order.index(k) + 1 for k in range(5))


def test_enhanced_ct_test_file_uses_functional_groups() -> None:
    ds = pydicom_file("eCT_Supplemental.dcm")  # 2 frames at z -159 and -149, rows along -x
    vol = volume_from_datasets([ds])
    assert vol.shape == (2, 512, 512)
    np.testing.assert_allclose(vol.direction[:, 0], [-1, 0, 0])
    np.testing.assert_allclose(vol.direction[:, 2], [0, 0, -1])  # normal = row x col: slices sorted head->feet
    assert vol.frame_numbers == (2, 1)
    np.testing.assert_allclose(vol.origin, [99.5, -301.5, -149.0])
    assert vol.spacing[2] == pytest.approx(10.0)
    raw = ds.pixel_array
    np.testing.assert_array_equal(vol.array[0], raw[1].astype(np.float32) - 1024)  # shared rescale intercept


# --------------------------------------------------------------------------- SimpleITK


def test_to_sitk_round_trip_keeps_geometry_exactly() -> None:
    angle = math.radians(20)
    row = (math.cos(angle), math.sin(angle), 0.0)
    col = (0.0, 0.0, -1.0)  # an oblique coronal-ish plane
    pixels = np.random.default_rng(2).integers(-100, 100, size=(4, 5, 6)).astype(np.int16)
    vol = volume_from_datasets(make_slices(pixels, origin=(3, -7, 11), orientation=(row, col), spacing=(0.6, 0.8, 2.2)))

    image = vol.to_sitk()
    assert image.GetSize() == (6, 5, 4)
    np.testing.assert_allclose(image.GetOrigin(), vol.origin)
    np.testing.assert_allclose(image.GetSpacing(), vol.spacing)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), vol.direction)
    for ijk in [(0, 0, 0), (5, 0, 0), (0, 4, 0), (0, 0, 3), (2, 3, 1)]:
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk), vol.index_to_lps(ijk), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), vol.array)

    back = Volume.from_sitk(image, like=vol)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.origin, vol.origin)
    np.testing.assert_allclose(back.direction, vol.direction)
    assert back.spacing == vol.spacing
    assert back.sop_uids == vol.sop_uids and back.series_uid == vol.series_uid

    shifted = sitk.Image(image)
    shifted.SetOrigin(tuple(np.array(image.GetOrigin()) + 5.0))
    with pytest.raises(GeometryError, match="not on the grid"):
        Volume.from_sitk(shifted, like=vol)


def test_with_array_keeps_the_grid_and_checks_the_shape() -> None:
    vol = volume_from_datasets(make_slices(numbered(3)))
    labels = vol.with_array(np.ones(vol.shape, np.uint8))
    assert labels.array.dtype == np.uint8 and labels.sop_uids == vol.sop_uids and labels.same_grid(vol)
    with pytest.raises(GeometryError, match="does not fit"):
        vol.with_array(np.ones((2, 2, 2)))


# --------------------------------------------------------------------------- diffusion


def _dwi(b_values: Sequence[int], n: int = 3, tag: str = "standard", series_uid: str | None = None) -> list[Dataset]:
    """``n`` positions per b-value, the b-value stored the way ``tag`` says."""
    series_uid = series_uid or generate_uid()
    for_uid = "1.2.3.4"
    out: list[Dataset] = []
    for b in b_values:
        for ds in make_slices(numbered(n), series_uid=series_uid, for_uid=for_uid):
            if tag == "standard":
                ds.DiffusionBValue = b
            elif tag == "siemens":
                ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", b)
            elif tag == "ge":
                ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", [1_000_000_000 + b, 8, 0, 0])
            elif tag == "philips":
                ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x03, "FL", float(b))
            out.append(ds)
    return out


@pytest.mark.parametrize("tag", ["standard", "siemens", "ge", "philips"])
def test_split_by_b_value(tag: str) -> None:
    datasets = _dwi([0, 1000], tag=tag)
    random.Random(1).shuffle(datasets)
    groups = split_by_b_value(datasets)
    assert list(groups) == [0.0, 1000.0]
    for b, items in groups.items():
        assert len(items) == 3
        assert all(b_value(ds) == b for ds in items)  # type: ignore[arg-type]
    assert volume_from_datasets(groups[1000.0]).shape == (3, 6, 5)


def test_siemens_b_value_survives_implicit_vr_round_trip() -> None:
    ds = _dwi([800], n=1, tag="siemens")[0]
    buffer = BytesIO()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(buffer, enforce_file_format=True)
    assert b_value(pydicom.dcmread(BytesIO(buffer.getvalue()))) == 800.0


def test_split_enhanced_mr_by_per_frame_diffusion_sequence() -> None:
    slices = make_slices(numbered(3))
    order = [0, 1, 2, 0, 1, 2]  # frames 1-3 at b=0, frames 4-6 at b=1000
    enhanced = make_enhanced(slices, order)
    enhanced.SOPClassUID = EnhancedMRImageStorage
    for frame, b in zip(enhanced.PerFrameFunctionalGroupsSequence, [0, 0, 0, 1000, 1000, 1000], strict=True):
        diffusion = Dataset()
        diffusion.DiffusionBValue = b
        diffusion.DiffusionDirectionality = "ISOTROPIC" if b else "NONE"
        frame.MRDiffusionSequence = [diffusion]

    groups = split_by_b_value([enhanced])
    assert list(groups) == [0.0, 1000.0]
    selection = groups[1000.0][0]
    assert isinstance(selection, FrameSelection) and selection.frame_numbers == (4, 5, 6)
    vol = volume_from_datasets(groups[1000.0])
    assert vol.frame_numbers == (4, 5, 6)
    assert select_b_value([enhanced]) == groups[1000.0]


def test_select_b_value_picks_the_b1000_trace_images() -> None:
    series_uid = generate_uid()
    datasets = _dwi([0, 500], series_uid=series_uid)
    trace_uids = set()
    for direction in range(3):
        for ds in _dwi([1000], series_uid=series_uid):
            ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
            ds.DiffusionGradientOrientation = [float(direction == i) for i in range(3)]
            datasets.append(ds)
    for ds in _dwi([1000], series_uid=series_uid):
        ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"]
        trace_uids.add(ds.SOPInstanceUID)
        datasets.append(ds)
    random.Random(5).shuffle(datasets)

    chosen = select_b_value(datasets, target=1000)
    assert {ds.SOPInstanceUID for ds in chosen} == trace_uids  # type: ignore[union-attr]
    assert volume_from_datasets(chosen).shape == (3, 6, 5)
    assert {ds.DiffusionBValue for ds in select_b_value(datasets, target=400)} == {500}  # type: ignore[union-attr]


def test_select_b_value_without_trace_images_explains() -> None:
    series_uid = generate_uid()
    datasets = _dwi([0], series_uid=series_uid) + _dwi([1000], series_uid=series_uid)
    datasets += _dwi([1000], series_uid=series_uid)  # a second direction, nothing marked trace
    with pytest.raises(NoMatchingBValueError, match="trace"):
        select_b_value(datasets)


def test_no_matching_b_value_lists_the_b_values_found() -> None:
    with pytest.raises(NoMatchingBValueError, match=r"b = 0, 50") as info:
        select_b_value(_dwi([0, 50]), target=1000)
    assert isinstance(info.value, InferenceError)
    with pytest.raises(NoMatchingBValueError, match="diffusion"):
        split_by_b_value(make_slices(numbered(2)))


# --------------------------------------------------------------------------- resampling and channels


def _random_volume(seed: int = 0, **kwargs: object) -> Volume:
    pixels = np.random.default_rng(seed).integers(0, 1000, size=(4, 6, 8)).astype(np.int16)
    return volume_from_datasets(make_slices(pixels, for_uid="1.2.3", **kwargs))  # type: ignore[arg-type]


def test_resample_onto_itself_is_identity() -> None:
    vol = _random_volume()
    same = resample_to(vol, vol)
    np.testing.assert_allclose(same.array, vol.array, atol=1e-4)
    assert same.same_grid(vol) and same.sop_uids == vol.sop_uids


def test_resample_onto_a_shifted_grid_moves_content_by_whole_voxels() -> None:
    moving = _random_volume(spacing=(0.5, 1.0, 2.0))
    reference = _random_volume(1, origin=(2 * 0.5, 0, 2.0), spacing=(0.5, 1.0, 2.0))  # 2 columns right, 1 slice up
    out = resample_to(moving, reference, default_value=-1.0)
    assert out.sop_uids == reference.sop_uids and out.series_uid == reference.series_uid
    np.testing.assert_allclose(out.array[:-1, :, :-2], moving.array[1:, :, 2:], atol=1e-3)
    assert np.all(out.array[:, :, -2:] == -1.0) and np.all(out.array[-1] == -1.0)


def test_resample_onto_a_flipped_grid_and_nearest_keeps_labels() -> None:
    moving = _random_volume()  # x index i at LPS x = i mm
    flipped = Volume(  # x index i at LPS x = 7 - i mm
        array=np.zeros(moving.shape, np.float32),
        origin=np.array([7.0, 0.0, 0.0]),
        spacing=moving.spacing,
        direction=np.diag([-1.0, 1.0, 1.0]),
        frame_of_reference_uid="1.2.3",
    )
    out = resample_to(moving, flipped)
    np.testing.assert_allclose(out.array, moving.array[:, :, ::-1], atol=1e-3)

    labels = moving.with_array((moving.array > 500).astype(np.uint8))
    moved = resample_to(labels, flipped, interpolation="nearest")
    assert moved.array.dtype == np.uint8
    np.testing.assert_array_equal(moved.array, labels.array[:, :, ::-1])
    with pytest.raises(ValueError, match="linear, nearest"):
        resample_to(labels, flipped, interpolation="cubic")


def test_resample_refuses_different_frames_of_reference() -> None:
    a = _random_volume()
    b = volume_from_datasets(make_slices(numbered(2), for_uid="9.9.9"))
    with pytest.raises(GeometryError, match="frame of reference"):
        resample_to(a, b)
    assert resample_to(a, b, check_frame_of_reference=False).shape == b.shape


def test_stack_channels_in_order_and_on_one_grid() -> None:
    dwi = _random_volume(0)
    adc = _random_volume(1)
    flair = _random_volume(2, origin=(0.3, 0, 0))
    stacked = stack_channels(dwi, [adc, resample_to(flair, dwi)])
    assert stacked.shape == (3, 4, 6, 8)
    np.testing.assert_array_equal(stacked[0], dwi.array)
    np.testing.assert_array_equal(stacked[1], adc.array)
    with pytest.raises(GeometryError, match="resample_to"):
        stack_channels(dwi, [flair])


def test_multiframe_without_functional_groups_is_refused() -> None:
    ds = pydicom_file("emri_small.dcm")  # 10 frames, functional groups stripped
    with pytest.raises(GeometryError, match="Per-frame Functional Groups"):
        volume_from_datasets([ds])
    with pytest.raises(ValueError, match="1-based"):
        FrameSelection(ds, (0, 1))
