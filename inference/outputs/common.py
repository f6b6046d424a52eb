"""What every result object shares: who made it, which study it joins, its UIDs.

Result instances join the source study: patient and study attributes are copied
from a source instance (with its Specific Character Set, so that names in any
language survive), Manufacturer is ``pacs-node`` (what the node's loop guard
recognises), and every UID is derived deterministically from the set of input
SOP Instance UIDs, the pipeline and the model version: re-processing the same
input yields the same UIDs (a re-send replaces instead of duplicating), while a
late instance or a new model version yields new ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom import Dataset

#: Manufacturer of every object the node writes; the loop guard matches it.
MANUFACTURER = "pacs-node"
DEMO_WARNING = "DEMO MODEL - NOT FOR CLINICAL USE"

#: Patient and study attributes copied from the source into every result.
STUDY_ATTRIBUTES = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


def derived_uid(*parts: str) -> str:
    """A UID under the 2.25 root (PS3.5 B.2) from a SHA-256 of ``parts``.

    The same parts always give the same UID (at most 2.25. + 39 digits).
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


@dataclass(frozen=True)
class ResultIdentity:
    """Deterministic identity of one job's results.

    Args:
        input_sop_uids: every input SOP Instance UID the job read (any order).
        pipeline: the pipeline name.
        model_name: the model's name.
        model_version: the model's version.
    """

    input_sop_uids: tuple[str, ...]
    pipeline: str
    model_name: str
    model_version: str

    @classmethod
    def of(cls, input_sop_uids: Iterable[str], pipeline: str, model_name: str, model_version: str) -> ResultIdentity:
        """Build from any iterable of input UIDs (sorted and de-duplicated)."""
        return cls(tuple(sorted(set(input_sop_uids))), pipeline, model_name, model_version)

    def variant(self, name: str) -> ResultIdentity:
        """The identity of a second object of the same kind (e.g. a LABELMAP SEG beside the BINARY one)."""
        return ResultIdentity(self.input_sop_uids, f"{self.pipeline}#{name}", self.model_name, self.model_version)

    @property
    def key(self) -> str:
        """A stable text key of the inputs, pipeline and model version."""
        inputs = hashlib.sha256("\n".join(self.input_sop_uids).encode()).hexdigest()
        return f"{self.pipeline}|{self.model_name}|{self.model_version}|{inputs}"

    def series_uid(self, kind: str) -> str:
        """Series Instance UID of the ``kind`` output (``SEG``, ``SR``, ``SC``, ...)."""
        return derived_uid(self.key, kind, "series")

    def instance_uid(self, kind: str, index: int = 0) -> str:
        """SOP Instance UID of the ``index``-th ``kind`` instance."""
        return derived_uid(self.key, kind, "instance", str(index))


def copy_study_attributes(source: Dataset, target: Dataset) -> None:
    """Copy patient and study attributes (and the character set) from ``source``."""
    for keyword in STUDY_ATTRIBUTES:
        if keyword in source:
            target[keyword] = source[keyword]
        elif keyword == "ReferringPhysicianName" and keyword not in target:
            target.ReferringPhysicianName = ""


def software_versions(model_name: str, model_version: str, node_version: str) -> list[str]:
    """Software Versions (0018,1020): the node first (the loop guard reads it), then the model."""
    return [f"{MANUFACTURER} {node_version}", f"{model_name} {model_version}"]
