"""QIDO-RS (PS3.18 10.6): studies, series and instances answered from the SQL
index, over received instances and the node's own results.

:func:`parse_query` validates the query string into a :class:`Query` (plain
data, unit-testable); :class:`Qido` runs it against the database. Matching
keys evaluated in SQL: PatientName (wildcards, case-insensitive), PatientID,
AccessionNumber, StudyDescription (wildcards), StudyDate (ranges),
StudyInstanceUID, ModalitiesInStudy, Modality, SeriesInstanceUID,
SOPInstanceUID, SOPClassUID (UID lists). Other attributes are not matched: they
are returned when present and named in a ``299`` Warning header, as PS3.18
asks. ``includefield`` adds attributes from the header summary kept with each
series (``Series.header``) or, at instance level, from the file itself.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Integer, Select, and_, exists, func, literal, or_, select, union_all
from sqlalchemy.orm import Session

from pacs_node.errors import PacsNodeError
from pacs_node.query import like_pattern
from pacs_node.query.base import MAX_OFFSET, FilterError, parse_count
from pacs_node.web.catalog import (
    OUTPUT_MODALITY,
    kinds_for_modalities,
    live_output,
    live_output_series,
    output_modality_expr,
)
from pacs_node.web.dicomjson import (
    MetadataCache,
    UnknownAttribute,
    attribute_tag,
    attributes,
    from_header,
    keyword,
    tag_key,
)
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Instance, Output, Series, Study

logger = logging.getLogger(__name__)

MAX_RESULTS = 1000
"""Most results one query returns; more are paged with limit/offset (a Warning says so)."""

STUDY_KEYS = frozenset(
    {
        "PatientName",
        "PatientID",
        "AccessionNumber",
        "StudyDate",
        "StudyInstanceUID",
        "ModalitiesInStudy",
        "StudyDescription",
    }
)
SERIES_KEYS = frozenset({"Modality", "SeriesInstanceUID"})
INSTANCE_KEYS = frozenset({"SOPInstanceUID", "SOPClassUID"})
_UID_KEYS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"})
_WILDCARD_KEYS = frozenset({"PatientName", "PatientID", "AccessionNumber", "StudyDescription"})
_LEVEL_KEYS = {
    "study": STUDY_KEYS,
    "series": STUDY_KEYS | SERIES_KEYS,
    "instance": STUDY_KEYS | SERIES_KEYS | INSTANCE_KEYS,
}

#: Attributes of the Patient, General Study and Patient Study modules (includefield=all at study level).
STUDY_LEVEL_KEYWORDS = frozenset(
    {
        "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
        "OtherPatientIDs", "OtherPatientNames", "EthnicGroup", "PatientComments", "PatientAge", "PatientSize",
        "PatientWeight", "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
        "AccessionNumber", "StudyDescription", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
        "AdmittingDiagnosesDescription", "TimezoneOffsetFromUTC", "SpecificCharacterSet",
        "IssuerOfAccessionNumberSequence",
    }
)  # fmt: skip

#: Attributes that differ between the instances of a series; a series-level answer leaves them out.
INSTANCE_LEVEL_KEYWORDS = frozenset(
    {
        "SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation", "InstanceCreationDate",
        "InstanceCreationTime", "ContentDate", "ContentTime", "AcquisitionDate", "AcquisitionTime",
        "AcquisitionDateTime", "AcquisitionNumber", "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation",
        "LargestImagePixelValue", "SmallestImagePixelValue", "TriggerTime", "ImagesInAcquisition",
        "TemporalPositionIdentifier",
        "NumberOfFrames", "FrameTime", "MediaStorageSOPInstanceUID", "ImageComments", "DiffusionBValue",
    }
)  # fmt: skip

STUDY_TAGS = (
    0x00080005, 0x00080020, 0x00080030, 0x00080050, 0x00080056, 0x00080061, 0x00080090, 0x00081030,
    0x00081190, 0x00100010, 0x00100020, 0x00100030, 0x00100040, 0x0020000D, 0x00200010, 0x00201206, 0x00201208,
)  # fmt: skip
SERIES_TAGS = (0x00080005, 0x00080021, 0x00080031, 0x00080060, 0x0008103E, 0x00081190, 0x0020000D, 0x0020000E,
               0x00200011, 0x00201209, 0x00400244, 0x00400245)  # fmt: skip
INSTANCE_TAGS = (0x00080005, 0x00080016, 0x00080018, 0x00080056, 0x00080060, 0x00081190, 0x0020000D, 0x0020000E,
                 0x00200013, 0x00280008, 0x00280010, 0x00280011, 0x00280100)  # fmt: skip
_DATE_RE = re.compile(r"^\d{8}$")


class QueryError(PacsNodeError):
    """The query string cannot be understood (HTTP 400); the message says why."""


@dataclass(frozen=True)
class Query:
    """A validated QIDO-RS query."""

    level: str
    match: dict[str, tuple[str, ...]] = field(default_factory=dict)
    include: frozenset[int] = frozenset()
    include_all: bool = False
    limit: int = MAX_RESULTS
    offset: int = 0
    fuzzy: bool = False
    warnings: tuple[str, ...] = ()


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in re.split(r"[,\\]", value) if v.strip()]


def _check_date(value: str) -> None:
    for part in value.split("-"):
        if part and not _DATE_RE.match(part):
            raise QueryError(
                f"StudyDate {value!r}: dates are YYYYMMDD, ranges YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-"
            )
    if value.count("-") > 1:
        raise QueryError(f"StudyDate {value!r}: at most one '-' in a range")


def parse_query(
    level: str,
    params: Sequence[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    max_results: int = MAX_RESULTS,
) -> Query:
    """Validate QIDO-RS query parameters for ``level`` (study, series, instance).

    Raises:
        QueryError: a bad limit/offset/date, or a name that is not a DICOM attribute.
    """
    match: dict[str, list[str]] = {}
    include: set[int] = set()
    include_all = False
    limit = max_results
    offset = 0
    fuzzy = False
    warnings: list[str] = []
    ignored: list[str] = []
    supported = _LEVEL_KEYS[level]
    for name, value in params:
        lname = name.lower()
        if lname in ("limit", "offset"):
            try:
                number = parse_count(value, lname, default=max_results if lname == "limit" else 0, maximum=MAX_OFFSET)
            except FilterError as exc:
                raise QueryError(str(exc)) from exc
            if lname == "offset":
                offset = number
                continue
            limit = number
            if limit > max_results:
                warnings.append(f"limit {limit} is above the maximum of {max_results}; at most {max_results} results")
                limit = max_results
            continue
        if lname == "fuzzymatching":
            fuzzy = value.strip().lower() == "true"
            continue
        if lname == "includefield":
            for item in _split_list(value.replace("\\", ",")):
                if item.lower() == "all":
                    include_all = True
                    continue
                try:
                    include.add(attribute_tag(item))
                except UnknownAttribute as exc:
                    raise QueryError(f"includefield: {exc}") from exc
            continue
        if "." in name:
            ignored.append(name)
            continue
        try:
            tag = attribute_tag(name)
        except UnknownAttribute as exc:
            raise QueryError(f"query key {exc}") from exc
        kw = keyword(tag) or tag_key(tag)
        include.add(tag)
        if value == "":
            continue  # universal matching: return the attribute
        if kw not in supported:
            ignored.append(kw)
            continue
        if kw == "StudyDate":
            _check_date(value)
        values = _split_list(value) if kw in _UID_KEYS or kw == "ModalitiesInStudy" else [value]
        match.setdefault(kw, []).extend(values)
    if study_uid is not None:
        match["StudyInstanceUID"] = [study_uid]
    if series_uid is not None:
        match["SeriesInstanceUID"] = [series_uid]
    if ignored:
        warnings.append(
            "the following attributes are not supported as matching keys and were ignored: " + ", ".join(ignored)
        )
    return Query(
        level=level,
        match={k: tuple(v) for k, v in match.items()},
        include=frozenset(include),
        include_all=include_all,
        limit=limit,
        offset=offset,
        fuzzy=fuzzy,
        warnings=tuple(warnings),
    )


# -- SQL ---------------------------------------------------------------------------------------------------------------


def _text_match(col: Any, value: str, *, fold: bool = False, fuzzy: bool = False) -> ColumnElement[bool]:
    if fuzzy:
        value = f"*{value.strip('*')}*"
    if fold:
        col = func.lower(col)
        value = value.lower()
    if "*" in value or "?" in value:
        return col.like(like_pattern(value), escape="\\")  # type: ignore[no-any-return]
    return col == value  # type: ignore[no-any-return]


def _date_match(col: Any, value: str) -> ColumnElement[bool]:
    if "-" not in value:
        return col == value  # type: ignore[no-any-return]
    lo, _, hi = value.partition("-")
    conds = []
    if lo:
        conds.append(col >= lo)
    if hi:
        conds.append(col <= hi)
    return and_(*conds)


def study_conditions(q: Query) -> list[ColumnElement[bool]]:
    """SQL conditions on ``Study`` for the study-level keys of ``q``."""
    m = q.match
    conds: list[ColumnElement[bool]] = []
    for value in m.get("PatientName", ()):
        conds.append(_text_match(Study.patient_name, value, fold=True, fuzzy=q.fuzzy))
    for value in m.get("PatientID", ()):
        conds.append(_text_match(Study.patient_id, value))
    for value in m.get("AccessionNumber", ()):
        conds.append(_text_match(Study.accession_number, value))
    for value in m.get("StudyDescription", ()):
        conds.append(_text_match(Study.study_description, value, fold=True))
    for value in m.get("StudyDate", ()):
        conds.append(_date_match(Study.study_date, value))
    if "StudyInstanceUID" in m:
        conds.append(Study.study_uid.in_(m["StudyInstanceUID"]))
    if "ModalitiesInStudy" in m:
        mods = {v.upper() for v in m["ModalitiesInStudy"]}
        conds.append(
            or_(
                exists(
                    select(Series.id).where(
                        Series.study_id == Study.id, Series.purged_at.is_(None), Series.modality.in_(mods)
                    )
                ),
                exists(
                    select(Output.id).where(
                        Output.study_id == Study.id, live_output(), Output.kind.in_(kinds_for_modalities(mods))
                    )
                ),
            )
        )
    return conds


def _has_content() -> ColumnElement[bool]:
    return or_(
        exists(select(Series.id).where(Series.study_id == Study.id, Series.purged_at.is_(None))),
        exists(select(Output.id).where(Output.study_id == Study.id, live_output())),
    )


@dataclass
class QidoResult:
    """The matches (DICOM JSON objects) and Warning texts."""

    items: list[dict[str, Any]]
    warnings: list[str]


class Qido:
    """Runs :class:`Query` objects against the index.

    Args:
        db: the database.
        store: the file store (result headers and instance-level includefield are read from files).
        cache: metadata cache shared with WADO-RS.
    """

    def __init__(self, db: Database, store: FileStore, cache: MetadataCache) -> None:
        self.db = db
        self.store = store
        self.cache = cache

    def search(self, q: Query, root: str) -> QidoResult:
        """Run ``q``; ``root`` is the DICOMweb base URL for RetrieveURL."""
        with self.db.sessions() as session:
            if q.level == "study":
                items = self._studies(session, q, root)
            elif q.level == "series":
                items = self._series(session, q, root)
            else:
                items = self._instances(session, q, root)
        warnings = list(q.warnings)
        if len(items) == q.limit and q.limit == MAX_RESULTS:
            warnings.append(
                f"the number of results reached the maximum of {MAX_RESULTS}; "
                f"request more with offset={q.offset + q.limit}"
            )
        return QidoResult(items, warnings)

    # -- studies -----------------------------------------------------------------------------------------------------
    def _studies(self, session: Session, q: Query, root: str) -> list[dict[str, Any]]:
        stmt = select(Study).where(_has_content(), *study_conditions(q)).order_by(Study.id.desc())
        studies = list(session.scalars(stmt.offset(q.offset).limit(q.limit)))
        if not studies:
            return []
        ids = [s.id for s in studies]
        series_stats: dict[int, list[tuple[str | None, int, int]]] = {}
        for sid, modality, n_series, n_inst in session.execute(
            select(
                Series.study_id,
                Series.modality,
                func.count(Series.id),
                func.coalesce(func.sum(Series.instance_count), 0),
            )
            .where(Series.study_id.in_(ids), Series.purged_at.is_(None))
            .group_by(Series.study_id, Series.modality)
        ):
            series_stats.setdefault(sid, []).append((modality, int(n_series), int(n_inst)))
        modality_expr = output_modality_expr()
        for sid, modality, n_series, n_inst in session.execute(
            select(
                Output.study_id,
                modality_expr,
                func.count(func.distinct(Output.series_uid)),
                func.count(func.distinct(Output.sop_uid)),
            )
            .where(Output.study_id.in_(ids), live_output(), live_output_series())
            .group_by(Output.study_id, modality_expr)
        ):
            series_stats.setdefault(sid, []).append((modality, int(n_series), int(n_inst)))
        headers = self._study_headers(session, ids)
        return [self._study_json(s, series_stats.get(s.id, []), headers.get(s.id, {}), q, root) for s in studies]

    @staticmethod
    def _study_headers(session: Session, ids: list[int]) -> dict[int, dict[str, Any]]:
        first = select(func.min(Series.id)).where(Series.study_id.in_(ids)).group_by(Series.study_id)
        return {sid: dict(header or {}) for sid, header in session.execute(
            select(Series.study_id, Series.header).where(Series.id.in_(first))
        )}  # fmt: skip

    @staticmethod
    def _study_json(
        study: Study, stats: list[tuple[str | None, int, int]], header: dict[str, Any], q: Query, root: str
    ) -> dict[str, Any]:
        modalities = sorted({m for m, _, _ in stats if m})
        values: dict[str, Any] = {
            "SpecificCharacterSet": study.specific_character_set or header.get("SpecificCharacterSet"),
            "StudyDate": study.study_date,
            "StudyTime": header.get("StudyTime"),
            "AccessionNumber": study.accession_number,
            "InstanceAvailability": "ONLINE",
            "ModalitiesInStudy": modalities,
            "ReferringPhysicianName": header.get("ReferringPhysicianName"),
            "StudyDescription": study.study_description,
            "RetrieveURL": f"{root}/studies/{study.study_uid}",
            "PatientName": study.patient_name,
            "PatientID": study.patient_id,
            "PatientBirthDate": study.patient_birth_date,
            "PatientSex": study.patient_sex,
            "StudyInstanceUID": study.study_uid,
            "StudyID": header.get("StudyID"),
            "NumberOfStudyRelatedSeries": sum(n for _, n, _ in stats),
            "NumberOfStudyRelatedInstances": sum(n for _, _, n in stats),
        }
        out = attributes(values.items())
        extra = {k: v for k, v in header.items() if k in STUDY_LEVEL_KEYWORDS} if q.include_all else {}
        extra_json = from_header(header, q.include) if q.include else {}
        extra_json.update(from_header(extra))
        for key, attr in extra_json.items():
            out.setdefault(key, attr)
        return dict(sorted(out.items()))

    # -- series ------------------------------------------------------------------------------------------------------
    def _series(self, session: Session, q: Query, root: str) -> list[dict[str, Any]]:
        m = q.match
        s_conds: list[ColumnElement[bool]] = [Series.purged_at.is_(None), *study_conditions(q)]
        o_conds: list[ColumnElement[bool]] = [live_output(), live_output_series(), *study_conditions(q)]
        if "Modality" in m:
            mods = {v.upper() for v in m["Modality"]}
            s_conds.append(Series.modality.in_(mods))
            o_conds.append(Output.kind.in_(kinds_for_modalities(mods)))
        if "SeriesInstanceUID" in m:
            s_conds.append(Series.series_uid.in_(m["SeriesInstanceUID"]))
            o_conds.append(Output.series_uid.in_(m["SeriesInstanceUID"]))
        inputs = (
            select(
                literal(0, Integer).label("src"),
                Series.id.label("rid"),
                Series.study_id.label("study_id"),
                func.coalesce(Series.series_number, 0).label("num"),
            )
            .join(Study, Study.id == Series.study_id)
            .where(*s_conds)
        )
        outputs = (
            select(
                literal(1, Integer).label("src"),
                func.min(Output.id).label("rid"),
                Output.study_id.label("study_id"),
                literal(0, Integer).label("num"),
            )
            .join(Study, Study.id == Output.study_id)
            .where(*o_conds)
            .group_by(Output.series_uid, Output.study_id)
        )
        rows = self._page(session, union_all(inputs, outputs).subquery(), q, ("study_id", "src", "num", "rid"))
        series_ids = [rid for src, rid in rows if src == 0]
        output_ids = [rid for src, rid in rows if src == 1]
        series_rows = {s.id: s for s in session.scalars(select(Series).where(Series.id.in_(series_ids)))}
        study_uids = dict(session.execute(select(Study.id, Study.study_uid).where(
            Study.id.in_({s.study_id for s in series_rows.values()} | self._output_studies(session, output_ids))
        )).all())  # fmt: skip
        out_rows = {o.id: o for o in session.scalars(select(Output).where(Output.id.in_(output_ids)))}
        out_counts = self._output_series_counts(session, [o.series_uid for o in out_rows.values()])
        items = []
        for src, rid in rows:
            if src == 0:
                s = series_rows[rid]
                items.append(self._series_json(s, study_uids[s.study_id], q, root))
            else:
                o = out_rows[rid]
                item = self._output_series_json(o, study_uids[o.study_id], out_counts.get(o.series_uid, 1), q, root)
                if item is not None:
                    items.append(item)
        return items

    @staticmethod
    def _page(session: Session, sub: Any, q: Query, order: tuple[str, ...]) -> list[tuple[int, int]]:
        stmt: Select[Any] = select(sub.c.src, sub.c.rid).order_by(*(sub.c[c] for c in order))
        return [(int(a), int(b)) for a, b in session.execute(stmt.offset(q.offset).limit(q.limit))]

    @staticmethod
    def _output_studies(session: Session, output_ids: list[int]) -> set[int]:
        if not output_ids:
            return set()
        return set(session.scalars(select(Output.study_id).where(Output.id.in_(output_ids))))

    @staticmethod
    def _output_series_counts(session: Session, series_uids: list[str]) -> dict[str, int]:
        if not series_uids:
            return {}
        return {
            uid: int(n)
            for uid, n in session.execute(
                select(Output.series_uid, func.count(func.distinct(Output.sop_uid)))
                .where(Output.series_uid.in_(series_uids), live_output())
                .group_by(Output.series_uid)
            )
        }

    @staticmethod
    def _series_json(s: Series, study_uid: str, q: Query, root: str) -> dict[str, Any]:
        h = s.header or {}
        values: dict[str, Any] = {
            "SpecificCharacterSet": h.get("SpecificCharacterSet"),
            "SeriesDate": h.get("SeriesDate"),
            "SeriesTime": h.get("SeriesTime"),
            "Modality": s.modality,
            "SeriesDescription": s.series_description,
            "RetrieveURL": f"{root}/studies/{study_uid}/series/{s.series_uid}",
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": s.series_uid,
            "SeriesNumber": s.series_number,
            "NumberOfSeriesRelatedInstances": s.instance_count,
        }
        if "PerformedProcedureStepStartDate" in h:
            values["PerformedProcedureStepStartDate"] = h["PerformedProcedureStepStartDate"]
        if "PerformedProcedureStepStartTime" in h:
            values["PerformedProcedureStepStartTime"] = h["PerformedProcedureStepStartTime"]
        out = attributes(values.items())
        extra: dict[str, Any] = {}
        if q.include_all:
            extra.update(from_header({k: v for k, v in h.items() if k not in INSTANCE_LEVEL_KEYWORDS}))
        if q.include:
            extra.update(from_header(h, q.include))
        for key, attr in extra.items():
            out.setdefault(key, attr)
        return dict(sorted(out.items()))

    def _file_metadata(self, rel: str) -> dict[str, Any] | None:
        try:
            return self.cache.get_dict(self.store.path(rel), None)
        except (OSError, ValueError) as exc:
            logger.warning("result file %s is not readable (%s); left out of the query answer", rel, exc)
            return None

    def _output_series_json(self, o: Output, study_uid: str, count: int, q: Query, root: str) -> dict[str, Any] | None:
        meta = self._file_metadata(o.path)
        if meta is None:
            return None
        values: dict[str, Any] = {
            "Modality": OUTPUT_MODALITY.get(o.kind, "OT"),
            "RetrieveURL": f"{root}/studies/{study_uid}/series/{o.series_uid}",
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": o.series_uid,
            "NumberOfSeriesRelatedInstances": count,
        }
        out = attributes(values.items())
        wanted = set(SERIES_TAGS)
        if q.include:
            wanted |= set(q.include)
        for key, attr in meta.items():
            tag = int(key, 16)
            if key not in out and (tag in wanted or (q.include_all and keyword(tag) not in INSTANCE_LEVEL_KEYWORDS)):
                out[key] = attr
        return dict(sorted(out.items()))

    # -- instances ---------------------------------------------------------------------------------------------------
    def _instances(self, session: Session, q: Query, root: str) -> list[dict[str, Any]]:
        m = q.match
        i_conds: list[ColumnElement[bool]] = [Series.purged_at.is_(None), *study_conditions(q)]
        o_conds: list[ColumnElement[bool]] = [live_output(), *study_conditions(q)]
        if "Modality" in m:
            mods = {v.upper() for v in m["Modality"]}
            i_conds.append(Series.modality.in_(mods))
            o_conds.append(Output.kind.in_(kinds_for_modalities(mods)))
        if "SeriesInstanceUID" in m:
            i_conds.append(Series.series_uid.in_(m["SeriesInstanceUID"]))
            o_conds.append(Output.series_uid.in_(m["SeriesInstanceUID"]))
        if "SOPInstanceUID" in m:
            i_conds.append(Instance.sop_uid.in_(m["SOPInstanceUID"]))
            o_conds.append(Output.sop_uid.in_(m["SOPInstanceUID"]))
        if "SOPClassUID" in m:
            i_conds.append(Instance.sop_class_uid.in_(m["SOPClassUID"]))
            o_conds.append(Output.sop_class_uid.in_(m["SOPClassUID"]))
        inputs = (
            select(
                literal(0, Integer).label("src"),
                Instance.id.label("rid"),
                Series.study_id.label("study_id"),
                Series.id.label("series_key"),
                func.coalesce(Instance.instance_number, 0).label("num"),
            )
            .join(Series, Series.id == Instance.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(*i_conds)
        )
        outputs = (
            select(
                literal(1, Integer).label("src"),
                func.min(Output.id).label("rid"),
                Output.study_id.label("study_id"),
                literal(0, Integer).label("series_key"),
                literal(0, Integer).label("num"),
            )
            .join(Study, Study.id == Output.study_id)
            .where(*o_conds)
            .group_by(Output.sop_uid, Output.study_id)
        )
        rows = self._page(
            session, union_all(inputs, outputs).subquery(), q, ("study_id", "src", "series_key", "num", "rid")
        )
        inst_ids = [rid for src, rid in rows if src == 0]
        output_ids = [rid for src, rid in rows if src == 1]
        inst = {
            i.id: (i, s, st)
            for i, s, st in session.execute(
                select(Instance, Series, Study.study_uid)
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(Instance.id.in_(inst_ids))
            )
        }
        outs = {
            o.id: (o, st)
            for o, st in session.execute(
                select(Output, Study.study_uid)
                .join(Study, Study.id == Output.study_id)
                .where(Output.id.in_(output_ids))
            )
        }
        needs_file = q.include_all or bool(set(q.include) - set(INSTANCE_TAGS) - set(SERIES_TAGS) - set(STUDY_TAGS))
        items = []
        for src, rid in rows:
            if src == 0:
                i, s, study_uid = inst[rid]
                items.append(self._instance_json(i, s, study_uid, q, root, needs_file))
            else:
                o, study_uid = outs[rid]
                item = self._output_instance_json(o, study_uid, q, root)
                if item is not None:
                    items.append(item)
        return items

    def _instance_json(
        self, i: Instance, s: Series, study_uid: str, q: Query, root: str, needs_file: bool
    ) -> dict[str, Any]:
        h = s.header or {}
        values: dict[str, Any] = {
            "SpecificCharacterSet": h.get("SpecificCharacterSet"),
            "SOPClassUID": i.sop_class_uid,
            "SOPInstanceUID": i.sop_uid,
            "InstanceAvailability": "ONLINE",
            "Modality": s.modality,
            "RetrieveURL": f"{root}/studies/{study_uid}/series/{s.series_uid}/instances/{i.sop_uid}",
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": s.series_uid,
            "InstanceNumber": i.instance_number,
            "Rows": h.get("Rows"),
            "Columns": h.get("Columns"),
            "BitsAllocated": h.get("BitsAllocated"),
        }
        if i.number_of_frames and i.number_of_frames > 1:
            values["NumberOfFrames"] = i.number_of_frames
        out = attributes(values.items())
        if needs_file:
            meta = self._file_metadata(i.path) or {}
            for key, attr in meta.items():
                if q.include_all or int(key, 16) in q.include:
                    out.setdefault(key, attr)
        elif q.include:
            for key, attr in from_header(h, q.include).items():
                if keyword(int(key, 16)) not in INSTANCE_LEVEL_KEYWORDS:
                    out.setdefault(key, attr)
        return dict(sorted(out.items()))

    def _output_instance_json(self, o: Output, study_uid: str, q: Query, root: str) -> dict[str, Any] | None:
        meta = self._file_metadata(o.path)
        if meta is None:
            return None
        values: dict[str, Any] = {
            "SOPClassUID": o.sop_class_uid,
            "SOPInstanceUID": o.sop_uid,
            "InstanceAvailability": "ONLINE",
            "RetrieveURL": f"{root}/studies/{study_uid}/series/{o.series_uid}/instances/{o.sop_uid}",
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": o.series_uid,
        }
        out = attributes(values.items())
        wanted = set(INSTANCE_TAGS) | set(q.include)
        for key, attr in meta.items():
            if key not in out and (q.include_all or int(key, 16) in wanted):
                out[key] = attr
        return dict(sorted(out.items()))
