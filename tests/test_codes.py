"""The one table of coded concepts (inference.codes) against its sources, and every shipped package against it.

pydicom ships DICOM PS3.16's context groups (CIDs) with each concept's code and
meaning; an entry that names a DICOM CID must be a member of that CID there,
with the same code and meaning. An entry outside DICOM says which terminology it
comes from.
"""

from __future__ import annotations

import re
from pathlib import Path

import pydicom.sr._concepts_dict as dicom_concepts
import pytest

from inference.codes import CODES
from inference.manifest import Code, ModelPackage

ROOT = Path(__file__).resolve().parent.parent


def _in_dicom(scheme: str, value: str) -> list[tuple[str, set[int]]]:
    """(meaning, CIDs) of every pydicom entry with this code."""
    table = dicom_concepts.concepts.get(scheme, {})
    return [
        (meaning, set(cids)) for entry in table.values() for code, (meaning, cids) in entry.items() if code == value
    ]


@pytest.mark.parametrize("key", sorted(CODES))
def test_each_code_matches_its_source(key: str) -> None:
    entry = CODES[key]
    cids = {int(n) for n in re.findall(r"CID (\d+)", entry.source)}
    if "DICOM" in entry.source and "no DICOM CID" not in entry.source:
        found = _in_dicom(entry.scheme, entry.value)
        assert found, f"{key}: {entry.scheme} {entry.value} is not in DICOM's tables"
        assert any(meaning.lower() == entry.meaning.lower() for meaning, _ in found), (key, found)
        member_of = set().union(*(c for _, c in found))
        assert cids <= member_of, f"{key}: DICOM lists {entry.value} in CIDs {sorted(member_of)}, not all of {cids}"
    elif entry.scheme == "UMLS":
        assert re.fullmatch(r"C\d{7}", entry.value) and "UMLS" in entry.source
    else:
        assert entry.scheme == "SCT" and re.fullmatch(r"\d{6,18}", entry.value) and "SNOMED CT" in entry.source


def test_the_dentate_nucleus_is_not_called_cerebellum() -> None:
    assert CODES["dentate_nucleus"].meaning == "Dentate nucleus"
    assert CODES["dentate_nucleus"].value != CODES["cerebellum"].value


@pytest.mark.parametrize("name", ["stroke", "dentate", "kidney"])
def test_shipped_packages_use_only_codes_from_the_table(name: str) -> None:
    manifest = ModelPackage(ROOT / "models" / name).manifest
    table = {(e.scheme, e.value): e.meaning for e in CODES.values()}
    used: list[Code] = []
    for seg in manifest.output_segments:
        used += [seg.category, seg.type, *(c for c in (seg.anatomy, seg.modifier) if c is not None)]
    for label in manifest.labels.values():
        used += [label.category, label.type]
    for code in used:
        assert table.get((code.scheme, code.value)) == code.meaning, f"{name}: {code} is not in inference.codes"


def test_a_package_may_name_a_concept_by_key_and_an_unknown_key_is_refused() -> None:
    assert Code.model_validate("kidney") == Code(value="64033007", meaning="Kidney", scheme="SCT")
    with pytest.raises(ValueError, match="unknown concept 'kidny'"):
        Code.model_validate("kidny")
