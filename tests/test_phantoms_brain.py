"""Brain phantoms: reproducibility, geometry, lesion/dentate truth, vendor headers, DICOM round trip."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread

from inference.volume import Volume, b_value, select_b_value, volume_from_datasets
from pacs_lab.phantoms import brain
from pacs_lab.phantoms.brain import (
    QsmCase,
    StrokeCase,
    Tissue,
    make_qsm_case,
    make_stroke_case,
    stroke_lesion_volumes,
)

STROKE_SEEDS = {"siemens": 1, "ge": 2, "philips": 6}  # seeds whose lesions total > 10 mL


@pytest.fixture(scope="module")
def stroke_cases() -> dict[str, StrokeCase]:
    return {vendor: make_stroke_case(seed, vendor=vendor) for vendor, seed in STROKE_SEEDS.items()}


@pytest.fixture(scope="module")
def qsm_cases() -> dict[str, QsmCase]:
    return {
        "siemens": make_qsm_case(0, vendor="siemens"),
        "ge": make_qsm_case(1, vendor="ge"),
        "philips": make_qsm_case(2, vendor="philips"),
    }


def _roundtrip(datasets: list[Dataset]) -> list[Dataset]:
    out: list[Dataset] = []
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        out.append(dcmread(buffer))
    return out


def _dwi_volumes(case: StrokeCase) -> tuple[Volume, Volume, Volume]:
    b0 = volume_from_datasets(select_b_value(case.dwi, 0.0))
    b1000 = volume_from_datasets(select_b_value(case.dwi, 1000.0))
    adc = volume_from_datasets(case.adc)
    return b0, b1000, adc


# --------------------------------------------------------------------------- reproducibility


def test_same_seed_same_bytes_and_uids() -> None:
    a, b = make_stroke_case(7, vendor="ge"), make_stroke_case(7, vendor="ge")
    for name in ("dwi", "adc", "flair"):
        sa, sb = getattr(a, name), getattr(b, name)
        assert [d.SOPInstanceUID for d in sa] == [d.SOPInstanceUID for d in sb]
        assert [d.PixelData for d in sa] == [d.PixelData for d in sb]
    assert np.array_equal(a.labels.array, b.labels.array)
    assert a.lesion_volumes_ml == b.lesion_volumes_ml
    qa, qb = make_qsm_case(7), make_qsm_case(7)
    assert [d.SOPInstanceUID for d in qa.qsm] == [d.SOPInstanceUID for d in qb.qsm]
    assert [d.PixelData for d in qa.qsm] == [d.PixelData for d in qb.qsm]
    assert np.array_equal(qa.labels.array, qb.labels.array)


def test_different_seed_differs() -> None:
    a, b = make_stroke_case(7, vendor="ge"), make_stroke_case(8, vendor="ge")
    assert a.dwi[0].StudyInstanceUID != b.dwi[0].StudyInstanceUID
    assert a.dwi[0].SOPInstanceUID != b.dwi[0].SOPInstanceUID
    assert b"".join(d.PixelData for d in a.dwi) != b"".join(d.PixelData for d in b.dwi)
    qa, qb = make_qsm_case(7), make_qsm_case(8)
    assert qa.qsm[0].SeriesInstanceUID != qb.qsm[0].SeriesInstanceUID
    assert b"".join(d.PixelData for d in qa.qsm) != b"".join(d.PixelData for d in qb.qsm)


def test_vendor_override_keeps_anatomy_and_bad_vendor_is_refused() -> None:
    assert stroke_lesion_volumes(3) == stroke_lesion_volumes(3, vendor="philips")
    with pytest.raises(ValueError, match="vendor"):
        make_stroke_case(1, vendor="toshiba")


# --------------------------------------------------------------------------- stroke


@pytest.mark.parametrize("vendor", sorted(STROKE_SEEDS))
def test_stroke_geometry(stroke_cases: dict[str, StrokeCase], vendor: str) -> None:
    case = stroke_cases[vendor]
    b0, b1000, adc = _dwi_volumes(case)
    flair = volume_from_datasets(case.flair)
    assert len(case.dwi) == 2 * b0.shape[0]
    assert b0.same_grid(b1000) and adc.same_grid(b1000)
    assert case.labels.same_grid(b1000) and case.labels.array.dtype == np.uint8
    assert case.tissue is not None and case.tissue.same_grid(b1000)
    assert case.labels.series_uid == case.dwi[0].SeriesInstanceUID
    assert not flair.same_grid(b1000, tolerance_mm=1.0)
    assert abs(float(flair.direction[:, 2] @ b1000.direction[:, 2])) < 0.999  # another orientation
    assert flair.spacing[2] != pytest.approx(b1000.spacing[2]) or flair.spacing[0] != pytest.approx(b1000.spacing[0])
    assert case.flair_labels is not None and case.flair_labels.same_grid(flair)
    uids = {(d.StudyInstanceUID, d.FrameOfReferenceUID) for d in (*case.dwi, *case.adc, *case.flair)}
    assert len(uids) == 1
    series = {d.SeriesInstanceUID for d in (*case.dwi, *case.adc, *case.flair)}
    assert len(series) == 3
    assert b1000.frame_of_reference_uid == flair.frame_of_reference_uid
    # in-plane 1.5-2 mm, slices 4-5 mm (+ gap) on the DWI
    assert 1.5 <= b1000.spacing[0] <= 2.0 and 4.0 <= b1000.spacing[2] <= 6.0


@pytest.mark.parametrize("vendor", sorted(STROKE_SEEDS))
def test_stroke_lesion_contrast(stroke_cases: dict[str, StrokeCase], vendor: str) -> None:
    case = stroke_cases[vendor]
    _b0, b1000, adc = _dwi_volumes(case)
    assert case.tissue is not None
    lesion = case.labels.array == 1
    parenchyma = np.isin(case.tissue.array, Tissue.CEREBRUM) & ~lesion
    assert lesion.sum() > 0
    assert b1000.array[lesion].mean() > 1.5 * b1000.array[parenchyma].mean()
    assert adc.array[lesion].mean() < 0.7 * adc.array[parenchyma].mean()
    assert 300 < np.median(adc.array[lesion]) < 550 and 650 < np.median(adc.array[parenchyma]) < 950
    flair = volume_from_datasets(case.flair)
    assert case.flair_labels is not None
    f_lesion = case.flair_labels.array == 1
    assert f_lesion.sum() > 0
    f_brain = (flair.array > 250) & ~f_lesion
    assert flair.array[f_lesion].mean() > 1.15 * np.median(flair.array[f_brain])
    # truth volume: voxel count on the DWI grid close to the continuous volumes
    counted = lesion.sum() * case.labels.voxel_volume_ml
    assert counted == pytest.approx(sum(case.lesion_volumes_ml), rel=0.35)


def test_lesion_volumes_span_the_range() -> None:
    volumes = [stroke_lesion_volumes(seed) for seed in range(20)]
    flat = [v for vs in volumes for v in vs]
    assert all(1 <= len(vs) <= 5 for vs in volumes)
    assert any(len(vs) == 1 for vs in volumes) and any(len(vs) > 1 for vs in volumes)
    assert min(flat) < 1.0 and max(flat) > 10.0
    assert all(0.05 < v < 160 for v in flat)
    assert make_stroke_case(3).lesion_volumes_ml == volumes[3]


def test_lesions_in_both_hemispheres(stroke_cases: dict[str, StrokeCase]) -> None:
    sides: set[int] = set()
    for case in stroke_cases.values():
        z, y, x = np.nonzero(case.labels.array)
        sides |= set(np.sign(case.labels.index_to_lps(np.stack([x, y, z], axis=1))[:, 0]).astype(int).tolist())
    for seed in range(20):  # the lesion model alone, cheaply
        _rng, _vendor, _head, lesions, _volumes = brain._stroke_model(seed, None)
        sides |= {int(lesion.side) for lesion in lesions}
    assert {-1, 1} <= sides


@pytest.mark.parametrize(
    ("vendor", "names"),
    [
        ("siemens", ("ep2d_diff_3scan_trace_p2", "ep2d_diff_3scan_trace_p2_ADC", "t2_tirm_tra_dark-fluid", "SIEMENS")),
        ("ge", ("DWI", "Apparent Diffusion Coefficient (mm2/s)", "Ax T2 FLAIR", "GE MEDICAL SYSTEMS")),
        ("philips", ("DWI_SENSE", "dADC", "sT2W_FLAIR", "Philips Medical Systems")),
    ],
)
def test_stroke_headers(stroke_cases: dict[str, StrokeCase], vendor: str, names: tuple[str, ...]) -> None:
    case = stroke_cases[vendor]
    seed = STROKE_SEEDS[vendor]
    dwi, adc, flair, manufacturer = names
    assert {d.SeriesDescription for d in case.dwi} == {dwi}
    assert {d.SeriesDescription for d in case.adc} == {adc}
    assert {d.SeriesDescription for d in case.flair} == {flair}
    assert {d.Manufacturer for d in (*case.dwi, *case.adc, *case.flair)} == {manufacturer}
    assert str(case.dwi[0].PatientName) == f"PHANTOM^STROKE^{seed}"
    assert case.dwi[0].StudyInstanceUID.startswith("1.2.826.0.1.3680043.10.1453.")
    assert list(case.adc[0].ImageType[:3]) == ["DERIVED", "PRIMARY", "ADC"]
    assert sorted({float(d.DiffusionBValue) for d in case.dwi}) == [0.0, 1000.0]
    for ds in _roundtrip([case.dwi[0], case.dwi[-1]]):
        expected = float(ds.DiffusionBValue)
        if vendor == "siemens":
            assert float(ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0C].value) == expected
        elif vendor == "ge":
            assert int(ds.private_block(0x0043, "GEMS_PARM_01")[0x39].value[0]) == expected
        else:
            assert float(ds.private_block(0x2001, "Philips Imaging DD 001")[0x03].value) == expected
            continue  # volume.b_value does not read the Philips private tag; the standard one is there
        del ds.DiffusionBValue  # the private tag alone still gives the b-value
        assert b_value(ds) == expected


@pytest.mark.parametrize("vendor", ["siemens", "ge"])
def test_private_b_values_alone_split_the_series(stroke_cases: dict[str, StrokeCase], vendor: str) -> None:
    datasets = _roundtrip(stroke_cases[vendor].dwi)
    for ds in datasets:
        del ds.DiffusionBValue
    b1000 = volume_from_datasets(select_b_value(datasets, 1000.0))
    assert b1000.same_grid(stroke_cases[vendor].labels)


def test_stroke_dicom_roundtrip_and_write(stroke_cases: dict[str, StrokeCase], tmp_path: Path) -> None:
    case = stroke_cases["siemens"]
    for name in ("dwi", "adc", "flair"):
        original = getattr(case, name)
        back = _roundtrip(original)
        assert [d.PixelData for d in back] == [d.PixelData for d in original]
        for a, b in zip(original, back, strict=True):
            for keyword in ("SOPInstanceUID", "SeriesDescription", "ImagePositionPatient", "ImageOrientationPatient"):
                assert a.get(keyword) == b.get(keyword)
        if name != "dwi":
            va, vb = volume_from_datasets(original), volume_from_datasets(back)
            assert np.array_equal(va.array, vb.array) and va.same_grid(vb)
    paths = case.write(tmp_path)
    assert set(paths) == {"dwi", "adc", "flair"}
    assert len(paths["dwi"]) == len(case.dwi) and all(p.exists() for p in paths["dwi"])
    assert dcmread(paths["adc"][0]).SOPInstanceUID == case.adc[0].SOPInstanceUID


# --------------------------------------------------------------------------- QSM


@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips"])
def test_qsm_dentate_truth_and_laterality(qsm_cases: dict[str, QsmCase], vendor: str) -> None:
    case = qsm_cases[vendor]
    qsm = volume_from_datasets(case.qsm)
    assert case.labels.same_grid(qsm) and case.labels.array.dtype == np.uint8
    assert case.labels.series_uid == case.qsm[0].SeriesInstanceUID
    centroids = {}
    for label in (1, 2):
        z, y, x = np.nonzero(case.labels.array == label)
        assert len(x) > 30
        centroids[label] = case.labels.index_to_lps(np.array([x.mean(), y.mean(), z.mean()]))
        assert qsm.array[case.labels.array == label].mean() > 70  # paramagnetic
    assert centroids[1][0] > 5 and centroids[2][0] < -5  # 1 = left = patient +x
    assert centroids[1][1] > 20 and centroids[1][2] < centroids[1][1]  # posterior, inferior (posterior fossa)
    assert case.tissue is not None
    distractors = np.isin(case.tissue.array, (Tissue.RN, Tissue.SN, Tissue.GP))
    if distractors.sum() > 20:
        assert qsm.array[distractors].mean() > 70
        assert not case.labels.array[distractors].any()
    background = (case.tissue.array == Tissue.WM) | (case.tissue.array == Tissue.CB_WM)
    assert qsm.array[background].mean() < 0


def test_qsm_storage_headers_and_coverage(qsm_cases: dict[str, QsmCase]) -> None:
    names = {"siemens": "QSM", "ge": "QSM_SWAN", "philips": "QSM_Philips"}
    for vendor, case in qsm_cases.items():
        ds = case.qsm[0]
        assert ds.SeriesDescription == names[vendor]
        assert ds.PixelRepresentation == 1 and float(ds.RescaleSlope) == pytest.approx(0.1)
        assert str(ds.PatientName) == f"PHANTOM^QSM^{case.seed}"
        back = _roundtrip(case.qsm)
        a, b = volume_from_datasets(case.qsm), volume_from_datasets(back)
        assert np.array_equal(a.array, b.array)
        assert -200 < a.array.min() < 0 < 100 < a.array.max() < 400
    coverages = {case.coverage for case in qsm_cases.values()}
    assert coverages == {"whole-brain", "posterior-fossa"}
    whole = next(c for c in qsm_cases.values() if c.coverage == "whole-brain")
    assert whole.tissue is not None
    for code in (Tissue.RN, Tissue.SN, Tissue.GP):  # distractors in the field of view
        assert (whole.tissue.array == code).sum() > 5
