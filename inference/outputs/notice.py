"""The "not processed" notice: a short SR telling the reader the AI did not run, and why.

It joins the source study (patient and study attributes with the source's
character set), says ``AI <pipeline> was not run on this study: <reason>`` in a
text content item, names the node as the device observer, and lists the images
it is about as evidence. Its UIDs derive from the caller's identity key, so a
repeated notice for the same input replaces the earlier one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from inference.outputs.common import MANUFACTURER, copy_study_attributes, derived_uid
from inference.outputs.sr import DEVICE_NAME, ReportError

__all__ = ["build_not_processed_notice", "notice_text"]

logger = logging.getLogger(__name__)

_TITLE = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report")
_COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
_KIND = "NOTICE"


def notice_text(pipeline: str, reason: str) -> str:
    """The sentence the notice carries."""
    return f"AI {pipeline} was not run on this study: {reason}"


def build_not_processed_notice(
    sources: Sequence[Dataset],
    reason: str,
    *,
    pipeline: str,
    node_version: str,
    identity_key: str,
    series_number: int = 9004,
) -> Dataset:
    """A Comprehensive SR saying that pipeline ``pipeline`` did not run on the study of ``sources``.

    Args:
        sources: images of the study the notice is about (the first gives patient
            and study attributes; all are listed as evidence).
        reason: why the AI did not run, in words a reader understands.
        pipeline: the pipeline name (Series Description ``AI <pipeline> NOT PROCESSED``).
        node_version: the node's version (Software Versions).
        identity_key: a stable key of the job's input; the UIDs derive from it.
        series_number: Series Number of the notice series.

    Returns:
        A :class:`highdicom.sr.ComprehensiveSR` dataset.

    Raises:
        ReportError: ``sources`` is empty, or ``reason`` is blank.
    """
    if not sources:
        raise ReportError("a not-processed notice needs at least one source image of the study it is about")
    if not reason.strip():
        raise ReportError("a not-processed notice needs a reason")
    reference = sources[0]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid(MANUFACTURER, "device", pipeline), name=DEVICE_NAME, manufacturer_name=MANUFACTURER
    )
    root = hd.sr.ContainerContentItem(name=_TITLE, is_content_continuous=False)
    root.ContentSequence = hd.sr.ContentSequence(
        [
            *hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device),
            hd.sr.TextContentItem(
                name=_COMMENT,
                value=notice_text(pipeline, reason),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
        ]
    )
    evidence: list[Dataset] = []
    seen: set[str] = set()
    for ds in sources:
        if str(ds.SOPInstanceUID) not in seen:
            seen.add(str(ds.SOPInstanceUID))
            evidence.append(ds)
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=root,
        series_instance_uid=derived_uid(identity_key, _KIND, "series"),
        series_number=series_number,
        sop_instance_uid=derived_uid(identity_key, _KIND, "instance", "0"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"AI {pipeline} NOT PROCESSED"[:64],
        # copied verbatim below (highdicom refuses a valid "\\ISO 2022 IR 87" form)
        specific_character_set=None,
    )
    copy_study_attributes(reference, sr)
    sr.add_new(0x00181020, "LO", f"{MANUFACTURER} {node_version}")  # Software Versions
    logger.info("not-processed notice %s for pipeline %s built", sr.SOPInstanceUID, pipeline)
    return sr
