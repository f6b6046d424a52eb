"""The embedded default routes send real-world series names of every vendor to the right
pipeline role, and nothing else: localizers, derived maps, screenshots, other phases."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom import Dataset

from pacs_lab.phantoms.abdomen import make_ct_case, make_mr_case
from pacs_lab.phantoms.brain import VENDORS, make_qsm_case, make_stroke_case
from pacs_node.common.header import header_from_dataset
from pacs_node.config import load_settings
from pacs_node.config.rules import CompiledRules, compile_settings


@pytest.fixture(scope="module")
def rules() -> CompiledRules:
    return compile_settings(load_settings(None, environ={}))


def routed(rules: CompiledRules, ds: Dataset | dict[str, Any]) -> dict[str, list[str]]:
    header = header_from_dataset(ds) if isinstance(ds, Dataset) else ds
    return {m.route.name: list(m.roles) for m in rules.evaluate(header).matches}


@pytest.mark.parametrize("vendor", VENDORS)
def test_brain_series_of_each_vendor(rules: CompiledRules, vendor: str) -> None:
    stroke = make_stroke_case(3, vendor=vendor)
    assert routed(rules, stroke.dwi[0]) == {"stroke-mr": ["dwi"]}, stroke.dwi[0].SeriesDescription
    assert routed(rules, stroke.adc[0]) == {"stroke-mr": ["adc"]}, stroke.adc[0].SeriesDescription
    assert routed(rules, stroke.flair[0]) == {"stroke-mr": ["flair"]}, stroke.flair[0].SeriesDescription
    qsm = make_qsm_case(3, vendor=vendor)
    assert routed(rules, qsm.qsm[0]) == {"dentate-qsm": ["qsm"]}, qsm.qsm[0].SeriesDescription


@pytest.mark.parametrize("vendor", VENDORS)
def test_abdomen_series_of_each_vendor(rules: CompiledRules, vendor: str) -> None:
    ct = make_ct_case(3, vendor=vendor)
    assert routed(rules, ct.series[0]) == {"kidney-ct-mr": ["image"]}, ct.series[0].SeriesDescription
    for orientation in ("axial", "coronal"):
        mr = make_mr_case(3, vendor=vendor, orientation=orientation)
        assert routed(rules, mr.series[0]) == {"kidney-ct-mr": ["image"]}, mr.series[0].SeriesDescription


def _mr(description: str, image_type: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "Modality": "MR",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4",
        "SeriesDescription": description,
        "ImageType": image_type,
        "SliceThickness": 5.0,
        **extra,
    }


@pytest.mark.parametrize(
    "header",
    [
        _mr("localizer", ["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        _mr("AAHead_Scout", ["ORIGINAL", "PRIMARY", "M"]),
        _mr("ep2d_diff_3scan_trace_p2_FA", ["DERIVED", "PRIMARY", "FA"]),
        _mr("ep2d_diff_3scan_trace_p2_EXP", ["DERIVED", "PRIMARY", "EXP"]),
        _mr("SWI_Images", ["DERIVED", "PRIMARY", "SWI"]),
        _mr("QSM_Mag", ["ORIGINAL", "PRIMARY", "M"]),
        _mr("t1_mprage_sag", ["ORIGINAL", "PRIMARY", "M"]),
        {
            "Modality": "CT",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "SeriesDescription": "Arterial Phase 1.5",
            "SliceThickness": 1.5,
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        },
        {
            "Modality": "CT",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7",
            "SeriesDescription": "Dose Report PV",
            "ImageType": ["DERIVED", "SECONDARY"],
        },
        {
            "Modality": "SEG",
            "SOPClassUID": "1.2.840.10008.5.1.4.1.1.66.4",
            "SeriesDescription": "DWI lesion",
            "Manufacturer": "pacs-node",
        },
    ],
    ids=lambda h: str(h["SeriesDescription"]),
)
def test_what_is_not_routed(rules: CompiledRules, header: dict[str, Any]) -> None:
    assert routed(rules, header) == {}
