"""The TID 1500 measurement report: a Comprehensive 3D SR referencing the SEG.

One Volumetric ROI group (TID 1411) per output segment, in segment-number order,
each referencing its SEG segment and the source series it was segmented on. A
group carries:

* a tracking identifier (the segment name) with a deterministic Tracking UID,
* the finding category and type (the segment's segmented property category/type),
* finding sites: the segment's anatomy (a kidney for renal parenchyma, the brain
  for a stroke lesion) with its laterality, or the structure itself with its side;
  for lesions the side is where the lesions are (left, right, or right and left),
* the algorithm identification (name, version, family "Artificial Intelligence"),
* measurements, every one measured on the referenced segment's own voxels
  (:func:`inference.segments.measure_segments`): Volume in mL (SCT 118565006),
  the mean of each input role named in ``measure_mean_of`` (derivation SCT
  "Mean"), the Number of lesions (SCT 246206008) for ``count_components``
  segments, and the network's mean confidence inside the segment (DCM 111012
  "Certainty of Finding", in %),
* qualitative evaluations: "Finding: Absent" (DCM 121071 / SCT 272519000) for a
  lesion segment with nothing found, and, where the model card gives a plausible
  volume range, the QC verdict (DCM 111052 "Quality Finding": DCM 111237 "Usable -
  Meets the quality control standard" or 111236 "Usable - Does not meet ...").

For ``count_components`` segments every lesion also gets a group of its own
("<segment> lesion k, slices a-b", its volume, its side), located by its
centroid as an SCOORD3D POINT in the frame of reference of the source series.
Those groups reference no segment, so the first group that references a segment
is always the whole segment (what :func:`volumes_from_sr` reads). Segments without
voxels still get their group, with volume 0.

Demo models say so in the algorithm name, a comment in the report and the
Series Description.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SegmentationStorage,
)

from inference.codes import CODES
from inference.errors import InferenceError
from inference.manifest import Code, Manifest, SegmentSpec
from inference.outputs.common import (
    DEMO_WARNING,
    MANUFACTURER,
    ResultIdentity,
    copy_study_attributes,
    derived_uid,
    software_versions,
)
from inference.outputs.seg import LATERALITY_CODES
from inference.segments import Segment

__all__ = ["DEVICE_NAME", "ReportError", "build_sr", "volumes_from_sr"]

logger = logging.getLogger(__name__)


def _table(key: str) -> hd.sr.CodedConcept:
    """A concept of :data:`inference.codes.CODES` (the one table of the codes the node writes)."""
    entry = CODES[key]
    return hd.sr.CodedConcept(entry.value, entry.scheme, entry.meaning)


#: Device Observer Name of every report the node writes.
DEVICE_NAME = MANUFACTURER

_VOLUME = _table("volume")
_MEAN = hd.sr.CodedConcept("373098007", "SCT", "Mean")
_NUMBER_OF_LESIONS = _table("number_of_lesions")
_ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_LESIONS = hd.sr.CodedConcept("{lesions}", "UCUM", "lesions")
_AI = hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence")
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
_ANATOMICAL_STRUCTURE = "91723000"
_CERTAINTY = _table("certainty_of_finding")
_PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
_FINDING = _table("finding")
_ABSENT = _table("absent")
_QUALITY_FINDING = _table("quality_finding")
_QC_MET = _table("qc_met")
_QC_NOT_MET = _table("qc_not_met")
#: Segmentation Storage and Label Map Segmentation Storage (binary/fractional and label map SEGs)
_SEG_CLASSES = (SegmentationStorage, "1.2.840.10008.5.1.4.1.1.66.7")
#: CID 100 Quantitative Diagnostic Imaging Procedures, by source modality.
_PROCEDURES = {
    "CT": hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": hd.sr.CodedConcept("25056-3", "LN", "MRI unspecified body region"),
}
_IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")
#: Concept names of means of inputs the node knows (CID 7469); others are named "Mean".
_MEAN_CONCEPTS = {
    "qsm": hd.sr.CodedConcept("126396", "DCM", "Magnetic Susceptibility"),
    "adc": hd.sr.CodedConcept("113041", "DCM", "Apparent Diffusion Coefficient"),
}
_UNIT_MEANINGS = {
    "1": "no units",
    "[ppb]": "parts per billion",
    "[ppm]": "parts per million",
    "um2/s": "um2/s",
    "mm2/s": "mm2/s",
    "10-6.mm2/s": "10^-6 mm2/s",
    "[hnsf'U]": "Hounsfield unit",
    "%": "percent",
}
#: mL per unit of a volume measurement read back by :func:`volumes_from_sr`.
_ML_PER = {"ml": 1.0, "mL": 1.0, "cm3": 1.0, "mm3": 1e-3, "l": 1e3, "L": 1e3}


class ReportError(InferenceError, ValueError):
    """The SEG, sources or metrics handed to the SR builder do not fit together."""


def _concept(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _unit(code: str | None) -> hd.sr.CodedConcept:
    code = code or "1"
    return hd.sr.CodedConcept(code, "UCUM", _UNIT_MEANINGS.get(code, code))


def _procedure(sources: Sequence[Dataset]) -> hd.sr.CodedConcept:
    modalities = {str(ds.get("Modality", "")) for ds in sources}
    if len(modalities) == 1:
        return _PROCEDURES.get(modalities.pop(), _IMAGING_PROCEDURE)
    return _IMAGING_PROCEDURE


def _side(side: str | None) -> hd.sr.CodedConcept | None:
    if side in ("left", "right"):
        return _concept(LATERALITY_CODES[side])
    if side == "both":
        return _concept(Code.model_validate("right_and_left"))
    return None


def _laterality(spec: SegmentSpec) -> hd.sr.CodedConcept | None:
    if spec.laterality is not None:
        return _concept(LATERALITY_CODES[spec.laterality])
    lateral = {c.value for c in LATERALITY_CODES.values()}
    if spec.modifier is not None and spec.modifier.scheme == "SCT" and spec.modifier.value in lateral:
        return _concept(spec.modifier)
    return None


def _lesion_side(lesions: Sequence[Mapping[str, Any]]) -> str | None:
    sides = {str(lesion["side"]) for lesion in lesions if lesion.get("side")}
    return "both" if len(sides) > 1 else (sides.pop() if sides else None)


def _finding_sites(spec: SegmentSpec, entry: Mapping[str, Any]) -> list[hd.sr.FindingSite] | None:
    laterality = _laterality(spec)
    if laterality is None and spec.count_components:
        laterality = _side(_lesion_side(entry.get("lesions") or []))
    if spec.anatomy is not None:
        return [hd.sr.FindingSite(anatomic_location=_concept(spec.anatomy), laterality=laterality)]
    if laterality is None and spec.category.value != _ANATOMICAL_STRUCTURE:
        return None
    return [hd.sr.FindingSite(anatomic_location=_concept(spec.type), laterality=laterality)]


def _source_series_uid(seg: Dataset, sources: Sequence[Dataset]) -> str:
    if "ReferencedSeriesSequence" in seg and len(seg.ReferencedSeriesSequence) > 0:
        return str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    return str(sources[0].SeriesInstanceUID)


def _numbered(manifest: Manifest, segments: Sequence[Segment] | None) -> list[tuple[int, SegmentSpec]]:
    if segments is None:
        return list(enumerate(manifest.output_segments, start=1))
    return [(seg.number, seg.spec) for seg in segments]


def _check_inputs(
    seg: Dataset,
    sources: Sequence[Dataset],
    metrics: Mapping[str, Any],
    manifest: Manifest,
    numbered: Sequence[tuple[int, SegmentSpec]],
) -> None:
    if not sources:
        raise ReportError("build_sr needs the source images the segmentation was made on; none were given")
    if seg.get("SOPClassUID") not in _SEG_CLASSES:
        raise ReportError(
            f"build_sr needs a DICOM SEG (SOP Class {' or '.join(_SEG_CLASSES)}); "
            f"got SOP Class {seg.get('SOPClassUID')!r}"
        )
    study = sources[0].StudyInstanceUID
    if seg.StudyInstanceUID != study:
        raise ReportError(
            f"SEG {seg.SOPInstanceUID} belongs to study {seg.StudyInstanceUID}, the sources to {study}; "
            "an SR can only report on a SEG of the same study"
        )
    present = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.get("SegmentSequence", [])}
    missing = [f"{spec.name} (segment {n})" for n, spec in numbered if n not in present]
    if missing:
        raise ReportError(
            f"SEG {seg.SOPInstanceUID} has no segment for {', '.join(missing)}; the SEG must list every "
            f"output segment of model {manifest.name} (empty ones included), numbered 1..N"
        )
    segments = metrics.get("segments")
    if not isinstance(segments, Mapping):
        raise ReportError("metrics has no 'segments' mapping; pass the metrics of inference.segments.measure_segments")
    absent = [spec.name for n, spec in numbered if str(n) not in segments]
    if absent:
        raise ReportError(f"metrics has no entry for segment(s) {', '.join(absent)} of model {manifest.name}")


def _lo_text(text: str) -> str:
    """A tracking identifier fits a UT, but keep it short enough for every viewer's list (64 characters)."""
    return text if len(text) <= 64 else text[:61].rstrip() + "..."


def _series_description(pipeline: str, demo: bool) -> str:
    base = f"AI {pipeline} SR"
    if demo and len(base) + 3 + len(DEMO_WARNING) <= 64:
        return f"{base} - {DEMO_WARNING}"
    return base[:64]


def build_sr(
    seg: Dataset,
    sources: Sequence[Dataset],
    metrics: Mapping[str, Any],
    manifest: Manifest,
    identity: ResultIdentity,
    *,
    pipeline: str,
    node_version: str,
    series_number: int = 9002,
    segments: Sequence[Segment] | None = None,
) -> Dataset:
    """Build the TID 1500 measurement report of one job.

    Args:
        seg: the job's DICOM SEG (segments 1..N in ascending label value, every
            manifest label present, empty ones included).
        sources: the source images the SEG was made on (they join the evidence
            and give patient and study attributes, character set included).
        metrics: :func:`inference.segments.measure_segments` output (``segments`` keyed by segment number
            as text, ``qc`` for the whole result).
        manifest: the model's manifest (label codes, laterality, means, counts).
        identity: the job's result identity (SR UIDs, tracking UIDs).
        pipeline: the pipeline name (Series Description ``AI <pipeline> SR``).
        node_version: the node's version (Software Versions).
        series_number: Series Number of the SR series.
        segments: the segments the SEG carries (numbers and definitions; the outputs may leave
            unvalidated ones out); default: the manifest's output segments numbered 1..N.

    Returns:
        A Comprehensive 3D SR dataset (a :class:`highdicom.sr.Comprehensive3DSR`).

    Raises:
        ReportError: ``seg`` is not a SEG, belongs to another study or lacks a
            label's segment, ``sources`` is empty, or ``metrics`` lacks a label.
    """
    numbered = _numbered(manifest, segments)
    _check_inputs(seg, sources, metrics, manifest, numbered)
    demo = manifest.demo
    source_series = hd.sr.SourceSeriesForSegmentation(_source_series_uid(seg, sources))
    algorithm_name = f"{manifest.name} ({DEMO_WARNING})" if demo else manifest.name
    parameters = [f"pipeline: {pipeline}", f"node: {MANUFACTURER} {node_version}"]

    def algorithm(*params: str) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=algorithm_name, version=manifest.version, family=_AI, parameters=list(params) or None
        )

    def referenced_segment(number: int) -> hd.sr.ReferencedSegment:
        return hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number,
            source_series=source_series,
        )

    frame_of_reference = str(seg.get("FrameOfReferenceUID", "") or sources[0].get("FrameOfReferenceUID", ""))
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    for number, spec in numbered:
        entry = metrics["segments"][str(number)]
        sites = _finding_sites(spec, entry)
        measurements = [
            hd.sr.Measurement(name=_VOLUME, value=float(entry["volume_ml"]), unit=_ML, algorithm_id=algorithm())
        ]
        for role in spec.measure_mean_of:
            mean = (entry.get("mean") or {}).get(role)
            if mean is None:
                logger.debug("segment %s: no mean of %s (empty segment or input absent)", spec.name, role)
                continue
            measurements.append(
                hd.sr.Measurement(
                    name=_MEAN_CONCEPTS.get(role.lower(), _MEAN),
                    value=float(mean),
                    unit=_unit(entry.get("mean_unit") or spec.mean_unit),
                    derivation=_MEAN,
                    algorithm_id=algorithm(f"mean of input: {role}"),
                )
            )
        lesions: list[Mapping[str, Any]] = []
        evaluations: list[hd.sr.QualitativeEvaluation] = []
        if spec.count_components:
            lesions = list(entry.get("lesions") or [])
            count = int(entry.get("count", len(lesions)))
            measurements.append(
                hd.sr.Measurement(name=_NUMBER_OF_LESIONS, value=count, unit=_LESIONS, algorithm_id=algorithm())
            )
            if count == 0:
                evaluations.append(hd.sr.QualitativeEvaluation(name=_FINDING, value=_ABSENT))
        if entry.get("confidence") is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=_CERTAINTY,
                    value=round(float(entry["confidence"]) * 100.0, 2),
                    unit=_PERCENT,
                    algorithm_id=algorithm("mean probability of the predicted class inside the segment"),
                )
            )
        if spec.plausible_ml is not None:
            plausible = bool((entry.get("qc") or {}).get("plausible", True))
            evaluations.append(
                hd.sr.QualitativeEvaluation(name=_QUALITY_FINDING, value=_QC_MET if plausible else _QC_NOT_MET)
            )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(identity.key, "SR", "tracking", "segment", str(number)), identifier=spec.name
                ),
                referenced_segment=referenced_segment(number),
                finding_category=_concept(spec.category),
                finding_type=_concept(spec.type),
                finding_sites=sites,
                algorithm_id=algorithm(*parameters),
                measurements=measurements,
                qualitative_evaluations=evaluations or None,
            )
        )
        for k, lesion in enumerate(lesions, start=1):
            first, last = (int(v) for v in lesion["slices"])
            lesion_sites = None
            if spec.anatomy is not None:
                lesion_sites = [
                    hd.sr.FindingSite(anatomic_location=_concept(spec.anatomy), laterality=_side(lesion.get("side")))
                ]
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=derived_uid(identity.key, "SR", "tracking", "segment", str(number), "lesion", str(k)),
                        identifier=_lo_text(f"{spec.name} lesion {k}, slices {first}-{last}"),
                    ),
                    referenced_volume_surface=hd.sr.VolumeSurface(
                        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                        graphic_data=np.asarray([lesion["centroid_lps"]], dtype=np.float64),
                        frame_of_reference_uid=frame_of_reference,
                        source_series=source_series,
                    ),
                    finding_category=_concept(spec.category),
                    finding_type=_concept(spec.type),
                    finding_sites=lesion_sites,
                    algorithm_id=algorithm(*parameters),
                    measurements=[
                        hd.sr.Measurement(
                            name=_VOLUME, value=float(lesion["volume_ml"]), unit=_ML, algorithm_id=algorithm()
                        )
                    ],
                )
            )

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        # the device is the node running this model: stable across studies
        uid=derived_uid(MANUFACTURER, "device", identity.pipeline, identity.model_name, identity.model_version),
        name=DEVICE_NAME,
        manufacturer_name=MANUFACTURER,
        model_name=f"{manifest.name} {manifest.version}",
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=_procedure(sources),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    comments = []
    if demo:
        comments.append(f"{DEMO_WARNING}: measurements by demo model {manifest.name} {manifest.version}")
    qc = metrics.get("qc") or {}
    if qc.get("flagged"):
        comments.append("QC: implausible result, check before use: " + "; ".join(str(r) for r in qc.get("reasons", [])))
    if comments:
        # TID 1500 row "Qualitative Evaluations": free-text evaluations of the report
        container = hd.sr.ContainerContentItem(
            name=_QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        container.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.TextContentItem(
                    name=_COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
                )
                for text in comments
            ]
        )
        report[0].ContentSequence.append(container)

    reference = sources[0]
    evidence: list[Dataset] = [seg]
    seen = {str(seg.SOPInstanceUID)}
    for ds in sources:
        if str(ds.SOPInstanceUID) not in seen:
            seen.add(str(ds.SOPInstanceUID))
            evidence.append(ds)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=identity.series_uid("SR"),
        series_number=series_number,
        sop_instance_uid=identity.instance_uid("SR"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        series_description=_series_description(pipeline, demo),
        manufacturer_model_name=f"{manifest.name} {manifest.version}"[:64],
        # copied verbatim below (highdicom refuses a valid "\\ISO 2022 IR 87" form)
        specific_character_set=None,
    )
    copy_study_attributes(reference, sr)
    sr.add_new(0x00181020, "LO", software_versions(manifest.name, manifest.version, node_version))  # Software Versions
    logger.info(
        "SR %s built for model %s %s: %d measurement groups",
        sr.SOPInstanceUID,
        manifest.name,
        manifest.version,
        len(groups),
    )
    return sr


def volumes_from_sr(sr: Dataset) -> dict[int, float]:
    """Segment number -> volume in mL, read from a TID 1500 report.

    The first Volumetric ROI group that references a segment counts (in the
    node's reports, the whole segment; per-lesion groups follow it).

    Raises:
        ReportError: ``sr`` is not a TID 1500 Comprehensive (3D) or Enhanced SR.
    """
    if isinstance(sr, hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR):
        document = sr
    else:
        classes: dict[str, type[hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR]] = {
            Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
            ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
            EnhancedSRStorage: hd.sr.EnhancedSR,
        }
        cls = classes.get(str(sr.get("SOPClassUID", "")))
        if cls is None:
            raise ReportError(f"not an Enhanced or Comprehensive (3D) SR: SOP Class {sr.get('SOPClassUID')!r}")
        try:
            document = cast(Any, cls).from_dataset(sr)
        except (ValueError, AttributeError) as exc:
            raise ReportError(f"SR {sr.get('SOPInstanceUID')} cannot be read: {exc}") from exc
    content = document.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ReportError(f"SR {sr.get('SOPInstanceUID')} is not a TID 1500 measurement report")
    volumes: dict[int, float] = {}
    for group in content.get_volumetric_roi_measurement_groups():
        segment = group.referenced_segment
        if segment is None:
            continue
        number = int(segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber)
        if number in volumes:
            continue
        for measurement in group.get_measurements(name=_VOLUME):
            factor = _ML_PER.get(measurement.unit.value)
            if factor is not None:
                volumes[number] = float(measurement.value) * factor
                break
    return volumes
