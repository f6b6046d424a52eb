"""The coded concepts the node writes into SEG and SR, in one table, each with its source.

A model package names a concept either inline (``{value, meaning, scheme}``) or by a
key of :data:`CODES` (``type: dentate_nucleus``). Every concept here says where it
comes from: a DICOM context group (PS3.16 CID, which pydicom ships and
``tests/test_codes.py`` checks each SNOMED CT entry against) or, where DICOM has
no concept, the terminology it was taken from.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CODES", "CodeEntry"]


@dataclass(frozen=True)
class CodeEntry:
    """One concept: scheme, value, meaning, and where the code comes from."""

    value: str
    meaning: str
    scheme: str
    source: str


CODES: dict[str, CodeEntry] = {
    # segmented property categories (CID 7150)
    "anatomical_structure": CodeEntry("91723000", "Anatomical Structure", "SCT", "DICOM CID 7150"),
    "morphologically_abnormal_structure": CodeEntry(
        "49755003", "Morphologically Abnormal Structure", "SCT", "DICOM CID 7150"
    ),
    # anatomy (CID 7151 segmentation property types, CID 4 anatomic regions, CID 7153 CNS)
    "brain": CodeEntry("12738006", "Brain", "SCT", "DICOM CID 4, CID 7153"),
    "cerebral_hemisphere": CodeEntry("372073000", "Cerebral hemisphere", "SCT", "DICOM CID 7153"),
    "cerebellum": CodeEntry("113305005", "Cerebellum", "SCT", "DICOM CID 7140, CID 7153"),
    "kidney": CodeEntry("64033007", "Kidney", "SCT", "DICOM CID 7151"),
    "parenchyma": CodeEntry("91772007", "Parenchyma", "SCT", "DICOM CID 5"),
    # the dentate nucleus is in no DICOM context group; UMLS names it (Dentate nucleus, C0086120)
    "dentate_nucleus": CodeEntry("C0086120", "Dentate nucleus", "UMLS", "UMLS Metathesaurus (no DICOM CID)"),
    # findings
    # SNOMED CT's morphologic abnormality; DICOM's context groups have no infarct of the brain
    "infarct": CodeEntry("55641003", "Infarct", "SCT", "SNOMED CT (no DICOM CID)"),
    "neoplasm": CodeEntry("108369006", "Neoplasm", "SCT", "DICOM CID 7151"),
    # laterality (CID 244)
    "left": CodeEntry("7771000", "Left", "SCT", "DICOM CID 244"),
    "right": CodeEntry("24028007", "Right", "SCT", "DICOM CID 244"),
    "right_and_left": CodeEntry("51440002", "Bilateral", "SCT", "DICOM CID 244"),
    # SR measurements and evaluations (inference.outputs.sr)
    "volume": CodeEntry("118565006", "Volume", "SCT", "DICOM CID 7469, CID 7472"),
    "number_of_lesions": CodeEntry("246206008", "Number of lesions", "SCT", "SNOMED CT (no DICOM CID)"),
    "certainty_of_finding": CodeEntry("111012", "Certainty of Finding", "DCM", "DICOM CID 6048 (concept name)"),
    "finding": CodeEntry("121071", "Finding", "DCM", "DICOM CID 7002"),
    "absent": CodeEntry("272519000", "Absent", "SCT", "DICOM CID 240"),
    "quality_finding": CodeEntry("111052", "Quality Finding", "DCM", "DICOM PS3.16 (DCM)"),
    "qc_met": CodeEntry("111237", "Usable - Meets the quality control standard", "DCM", "DICOM CID 6044"),
    "qc_not_met": CodeEntry("111236", "Usable - Does not meet the quality control standard", "DCM", "DICOM CID 6044"),
}
