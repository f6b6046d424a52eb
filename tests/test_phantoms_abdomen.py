"""Abdomen phantoms: reproducibility, geometry, intensities, laterality and ground truth."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
import pytest
from pydicom import dcmread
from scipy import ndimage

from inference.volume import Volume, volume_from_datasets
from pacs_lab.phantoms.abdomen import (
    CT_HU,
    LEFT_KIDNEY,
    RIGHT_KIDNEY,
    TISSUES,
    AbdomenCase,
    make_ct_case,
    make_mr_case,
)

_CODE = {name: value for value, name in TISSUES.items()}


@cache
def ct(seed: int, vendor: str | None = None) -> AbdomenCase:
    return make_ct_case(seed, vendor=vendor)


@cache
def mr(seed: int, vendor: str | None = None, orientation: str | None = None) -> AbdomenCase:
    return make_mr_case(seed, vendor=vendor, orientation=orientation)


@cache
def image(case: AbdomenCase) -> Volume:
    return volume_from_datasets(case.series)


def _bytes(case: AbdomenCase) -> list[bytes]:
    out = []
    for ds in case.series:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def _eroded(case: AbdomenCase, tissue: str) -> np.ndarray:
    assert case.tissues is not None
    mask = case.tissues.array == _CODE[tissue]
    inner = ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3), dtype=bool))
    return inner if inner.sum() >= 30 else mask


def _centroid_lps(vol: Volume, mask: np.ndarray) -> np.ndarray:
    zyx = np.argwhere(mask).mean(axis=0)
    return vol.index_to_lps(zyx[::-1])


ALL_CASES = [
    pytest.param(lambda: ct(0), id="ct0"),
    pytest.param(lambda: ct(2), id="ct2"),
    pytest.param(lambda: mr(0), id="mr0-cor"),
    pytest.param(lambda: mr(2), id="mr2-ax"),
    pytest.param(lambda: mr(1, orientation="axial"), id="mr1-ax-forced"),
]


def test_same_seed_same_bytes_and_uids_other_seed_differs() -> None:
    a, b = make_ct_case(11), make_ct_case(11)
    assert _bytes(a) == _bytes(b)
    assert [ds.SOPInstanceUID for ds in a.series] == [ds.SOPInstanceUID for ds in b.series]
    assert np.array_equal(a.labels.array, b.labels.array)
    c = make_ct_case(12)
    assert c.series[0].StudyInstanceUID != a.series[0].StudyInstanceUID
    assert c.series[0].SeriesInstanceUID != a.series[0].SeriesInstanceUID
    assert _bytes(c) != _bytes(a)
    m1, m2 = make_mr_case(11), make_mr_case(11)
    assert _bytes(m1) == _bytes(m2)
    assert m1.series[0].StudyInstanceUID != a.series[0].StudyInstanceUID  # CT and MR of one seed: other studies


def test_uids_and_patient_consistent_within_a_case() -> None:
    case = ct(0)
    assert len({ds.StudyInstanceUID for ds in case.series}) == 1
    assert len({ds.FrameOfReferenceUID for ds in case.series}) == 1
    assert len({ds.SeriesInstanceUID for ds in case.series}) == 1
    assert len({ds.SOPInstanceUID for ds in case.series}) == len(case.series)
    for ds in case.series:
        assert str(ds.SOPInstanceUID).startswith("1.2.826.0.1.3680043.10.1453.")
        assert str(ds.PatientName) == "PHANTOM^ABDOMEN^0"
    assert case.series[0].FrameOfReferenceUID != case.series[0].StudyInstanceUID


@pytest.mark.parametrize("make", ALL_CASES)
def test_volume_and_labels_share_the_grid(make) -> None:  # type: ignore[no-untyped-def]
    case = make()
    vol = image(case)
    maps = [case.labels, case.parenchyma, case.tissues] + ([case.tumour_mask] if case.tumour_mask else [])
    for lab in maps:
        assert lab is not None
        assert lab.shape == vol.shape
        assert lab.same_grid(vol)
        assert lab.sop_uids == vol.sop_uids
        assert lab.series_uid == vol.series_uid
    assert set(np.unique(case.labels.array)) <= {0, RIGHT_KIDNEY, LEFT_KIDNEY}


def test_ct_geometry_and_headers() -> None:
    for seed in (0, 2, 3):
        case = ct(seed)
        vol = image(case)
        ds = case.series[0]
        assert ds.Modality == "CT"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.ContrastBolusAgent
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        assert ds.PixelRepresentation == 1
        assert (ds.Rows, ds.Columns) == (256, 256)
        assert 1.4 <= vol.spacing[0] <= 1.6 and 2.5 <= vol.spacing[2] <= 5.0
        assert 40 <= vol.shape[0] <= 64


def test_ct_hu_inside_organs() -> None:
    for seed in (0, 1, 2):
        case = ct(seed)
        vol = image(case)
        names = ["liver", "spleen", "cortex", "medulla", "sinus_fat", "fat", "muscle", "bone", "aorta"]
        if case.tumour:
            names.append("tumour")
        for name in names:
            mask = _eroded(case, name)
            assert mask.sum() > 20, name
            mean = float(vol.array[mask].mean())
            assert abs(mean - CT_HU[name]) <= 30, (seed, name, mean)
        noise = float(vol.array[_eroded(case, "liver")].std())
        assert 8 <= noise <= 25


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mr_contrast_order(seed: int) -> None:
    case = mr(seed)
    vol = image(case)
    names = ["collecting_system", "cortex", "medulla", "spleen", "liver", "muscle", "fat", "sinus_fat", "perirenal_fat"]
    mean = {name: float(vol.array[_eroded(case, name)].mean()) for name in names}
    assert mean["collecting_system"] > mean["cortex"] > mean["spleen"] > mean["liver"] > mean["muscle"] > mean["fat"]
    assert mean["medulla"] > mean["liver"]
    assert mean["sinus_fat"] < mean["liver"]
    assert mean["perirenal_fat"] < mean["cortex"] / 3


def test_mr_headers_and_orientation() -> None:
    cor, ax, forced = mr(0), mr(2), mr(1, orientation="axial")
    assert cor.orientation == "coronal" and ax.orientation == "axial" and forced.orientation == "axial"
    assert mr(1).orientation == "coronal"
    assert [float(v) for v in cor.series[0].ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
    assert [float(v) for v in ax.series[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    for case in (cor, ax):
        ds = case.series[0]
        assert ds.Modality == "MR" and ds.PixelRepresentation == 0
        assert "RescaleIntercept" not in ds
        vol = image(case)
        assert 1.2 <= vol.spacing[0] <= 1.6 and 4.0 <= vol.spacing[2] <= 6.0
    seeded = {mr(s).orientation for s in range(4)}
    assert seeded == {"axial", "coronal"}


@pytest.mark.parametrize("make", ALL_CASES)
def test_laterality_left_kidney_at_patient_left(make) -> None:  # type: ignore[no-untyped-def]
    case = make()
    left = _centroid_lps(case.labels, case.labels.array == LEFT_KIDNEY)
    right = _centroid_lps(case.labels, case.labels.array == RIGHT_KIDNEY)
    assert left[0] > 30 and right[0] < -30
    assert left[1] > 0 and right[1] > 0  # posterior (retroperitoneal) half of the body
    if not case.tumour:
        assert right[2] < left[2]  # right kidney lower


@pytest.mark.parametrize("make", ALL_CASES)
def test_parenchyma_inside_kidney_and_sinus_excluded(make) -> None:  # type: ignore[no-untyped-def]
    case = make()
    assert case.parenchyma is not None and case.tissues is not None
    kidney = case.labels.array > 0
    par = case.parenchyma.array > 0
    assert not np.any(par & ~kidney)
    sinus = np.isin(case.tissues.array, [_CODE["sinus_fat"], _CODE["collecting_system"]]) & kidney
    assert sinus.sum() > 50
    assert not np.any(par & sinus)
    assert np.all(np.isin(case.tissues.array[par], [_CODE["cortex"], _CODE["medulla"]]))
    for lab in (RIGHT_KIDNEY, LEFT_KIDNEY):
        k = case.labels.array == lab
        assert 0.6 < (par & k).sum() / k.sum() < 0.95


def test_tumours_in_some_cases_inside_a_kidney() -> None:
    cases = [ct(s) for s in range(4)] + [mr(s) for s in range(4)]
    flags = [c.tumour for c in cases]
    assert any(flags) and not all(flags)
    for case in cases:
        assert case.tissues is not None
        if not case.tumour:
            assert case.tumour_mask is None and case.tumour_side == 0
            assert not np.any(case.tissues.array == _CODE["tumour"])
            continue
        assert case.tumour_mask is not None
        tum = case.tumour_mask.array > 0
        assert tum.sum() > 0
        assert case.tumour_side in (RIGHT_KIDNEY, LEFT_KIDNEY)
        assert np.all(case.labels.array[tum] == case.tumour_side)
        assert case.parenchyma is not None and not np.any(case.parenchyma.array[tum])
        ml = tum.sum() * case.tumour_mask.voxel_volume_ml
        diameter_cm = 2 * (3 * ml / (4 * np.pi)) ** (1 / 3)
        assert 0.6 <= diameter_cm <= 7.0


@pytest.mark.parametrize("make", ALL_CASES)
def test_kidney_volumes_plausible_and_fully_covered(make) -> None:  # type: ignore[no-untyped-def]
    case = make()
    tum = case.tumour_mask.array > 0 if case.tumour_mask is not None else np.zeros(case.labels.shape, dtype=bool)
    for lab in (RIGHT_KIDNEY, LEFT_KIDNEY):
        whole = case.labels.array == lab
        ml = whole.sum() * case.labels.voxel_volume_ml
        if lab == case.tumour_side:  # a large tumour replaces part of its kidney
            tumour_ml = tum.sum() * case.labels.voxel_volume_ml
            assert 100 <= ml <= 250 + tumour_ml, (lab, ml)
            assert (whole & ~tum).sum() * case.labels.voxel_volume_ml >= 40
        else:
            assert 100 <= ml <= 250, (lab, ml)
    kidney = case.labels.array > 0
    assert not kidney[0].any() and not kidney[-1].any()
    assert not kidney[:, 0].any() and not kidney[:, -1].any()
    assert not kidney[:, :, 0].any() and not kidney[:, :, -1].any()


def test_dicom_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    case = mr(0)
    paths = case.write(tmp_path / "series")
    assert len(paths) == len(case.series)
    read = [dcmread(p) for p in paths]
    back = volume_from_datasets(read)
    vol = image(case)
    assert back.same_grid(vol)
    assert np.array_equal(back.array, vol.array)
    assert read[0].SeriesDescription == case.series[0].SeriesDescription
    assert str(read[0].PatientName) == "PHANTOM^ABDOMEN^0"
    ct_paths = ct(2).write(tmp_path / "ct")
    ct_back = volume_from_datasets([dcmread(p) for p in ct_paths])
    assert np.array_equal(ct_back.array, image(ct(2)).array)
    assert ct_back.array.min() >= -1024


@pytest.mark.parametrize(
    ("vendor", "manufacturer", "ct_name", "mr_name"),
    [
        ("siemens", "SIEMENS", "Abdomen {t:.1f} B30f PV", "t2_haste_fs_tra"),
        ("ge", "GE MEDICAL SYSTEMS", "PORTAL VENOUS {t:g}mm", "Ax T2 SSFSE FS"),
        ("philips", "Philips", "Venous Phase {t:g} Br40", "T2W_SPAIR"),
    ],
)
def test_vendor_series_names(vendor: str, manufacturer: str, ct_name: str, mr_name: str) -> None:
    c = ct(5, vendor)
    ds = c.series[0]
    assert c.vendor == vendor
    assert ds.Manufacturer == manufacturer
    assert ds.SeriesDescription == ct_name.format(t=float(ds.SliceThickness))
    m = mr(5, vendor, "axial")
    assert m.series[0].SeriesDescription == mr_name
    assert str(m.series[0].Manufacturer).startswith(manufacturer)


def test_unknown_vendor_or_orientation_refused() -> None:
    with pytest.raises(ValueError, match="vendor"):
        make_ct_case(0, vendor="toshiba")
    with pytest.raises(ValueError, match="orientation"):
        make_mr_case(0, orientation="sagittal")
