"""DICOMweb over a real uvicorn server on 127.0.0.1: STOW-RS through the same
receive path as C-STORE, QIDO-RS from the SQL index (SQLite and PostgreSQL)
over received instances and produced results, WADO-RS retrieve, metadata,
frames and bulk data. dicomweb-client is the peer; raw httpx requests cover
what it cannot send (malformed bodies, exact bytes)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread
from sqlalchemy import select, update

from pacs_lab.synthetic import make_series, new_uid
from pacs_node.config import Settings
from pacs_node.process.results import BuiltOutput, store_outputs
from pacs_node.web.multipart import MultipartError, MultipartParser, PartEnd, PartStart
from storage.models import Instance, Job, JobState, Output, OutputKind, Series, Study
from tests.http_support import HttpNode, http_node, multipart_body, node_settings, part10, split_multipart

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


# -- fixtures ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def node(make_settings: Callable[..., Settings]) -> Iterator[HttpNode]:
    with http_node(node_settings(make_settings)) as n:
        yield n


def _client(node: HttpNode) -> DICOMwebClient:
    return DICOMwebClient(url=node.dicomweb)


def _study(n_ct: int = 3, n_mr: int = 2, **header: Any) -> tuple[str, list[Dataset], list[Dataset]]:
    study = new_uid()
    ct = list(make_series(n_ct, study_uid=study, **header))
    mr = list(make_series(n_mr, modality="MR", study_uid=study, seed=1, **header))
    return study, ct, mr


def _uids(items: list[dict[str, Any]], tag: str) -> list[str]:
    return [item[tag]["Value"][0] for item in items]


def _value(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


# -- the multipart parser on its own ----------------------------------------------------------------------------------


def test_multipart_parser_finds_parts_at_every_chunk_split() -> None:
    payloads = [b"\r\n--not-the-boundary\r\n" + bytes(range(256)) * 3, b"", b"x" * 1000 + b"\r\n--boun"]
    ctype, body = multipart_body([("application/dicom", p) for p in payloads], boundary="bound")
    body = b"preamble text\r\n" + body + b"epilogue"
    for split in range(1, len(body)):
        for step in (split, 7):
            parser = MultipartParser("bound")
            got: list[bytes] = []
            current = b""
            for i in range(0, len(body), step):
                for event in parser.feed(body[i : i + step]):
                    if isinstance(event, PartStart):
                        assert event.content_type == "application/dicom"
                        current = b""
                    elif isinstance(event, PartEnd):
                        got.append(current)
                    else:
                        current += event
            parser.close()
            assert got == payloads, f"split at {split}, step {step}"


def test_multipart_parser_reports_a_truncated_body() -> None:
    _ctype, body = multipart_body([("application/dicom", b"abc")], boundary="b")
    parser = MultipartParser("b")
    list(parser.feed(body[:-8]))
    with pytest.raises(MultipartError, match="truncated"):
        parser.close()
    with pytest.raises(MultipartError, match="no multipart boundary"):
        MultipartParser("b").close()


# -- STOW, QIDO, WADO with dicomweb-client (both databases) ------------------------------------------------------------


def test_store_search_retrieve_round_trip(make_settings: Callable[..., Settings], db_url: str) -> None:
    with http_node(node_settings(make_settings, db_url)) as node:
        client = _client(node)
        study, ct, mr = _study(PatientName="Müller^Jürgen")
        other_study = new_uid()
        other = list(
            make_series(1, study_uid=other_study, PatientID="OTHER", PatientName="Other^Pat", StudyDate="20250101")
        )
        answer = client.store_instances(ct + mr + other)
        refs = answer.ReferencedSOPSequence
        assert sorted(r.ReferencedSOPInstanceUID for r in refs) == sorted(d.SOPInstanceUID for d in ct + mr + other)
        assert "FailedSOPSequence" not in answer
        node.flush()

        # The same receive path as C-STORE: rows in the index, files at <study>/<series>/<sop>.dcm.
        with node.db.session() as session:
            rows = {i.sop_uid: i for i in session.scalars(select(Instance))}
            assert len(rows) == 6
            for ds in ct:
                assert rows[ds.SOPInstanceUID].path == f"{study}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
                assert node.store.path(rows[ds.SOPInstanceUID].path).is_file()
            series = session.scalar(select(Series).where(Series.series_uid == ct[0].SeriesInstanceUID))
            assert series is not None and series.instance_count == 3 and series.source_address == "127.0.0.1"

        # QIDO-RS: studies with their counts, modalities and patient data.
        studies = client.search_for_studies()
        assert sorted(_uids(studies, "0020000D")) == sorted([study, other_study])
        mine = next(s for s in studies if _value(s, "0020000D") == study)
        assert _value(mine, "00201206") == 2 and _value(mine, "00201208") == 5
        assert mine["00080061"]["Value"] == ["CT", "MR"]
        assert _value(mine, "00100010") == {"Alphabetic": "Müller^Jürgen"}
        assert _value(mine, "00080030") == "101500"  # StudyTime comes from the header summary
        assert _value(mine, "00081190").endswith(f"/dicom-web/studies/{study}")

        def found(**filters: str) -> list[str]:
            return sorted(_uids(client.search_for_studies(search_filters=filters), "0020000D"))

        assert found(PatientName="müller*") == [study], "PatientName wildcards, case-insensitive"
        assert found(PatientName="M?ller^J*") == [study]
        assert found(PatientName="Nobody*") == []
        assert found(PatientID="OTHER") == [other_study]
        assert found(StudyDate="20261101-20261130") == [study]
        assert found(StudyDate="-20251231") == [other_study]
        assert found(StudyDate="20250101") == [other_study]
        assert found(AccessionNumber="ACC0001") == sorted([study, other_study])
        assert found(ModalitiesInStudy="MR") == [study]
        assert found(StudyInstanceUID=f"{other_study},{study}") == sorted([study, other_study])
        assert len(client.search_for_studies(limit=1)) == 1
        assert len(client.search_for_studies(limit=1, offset=1)) == 1
        assert client.search_for_studies(offset=2) == []

        # Series: per study and across studies, with Modality and includefield.
        series_items = client.search_for_series(study)
        assert sorted(_uids(series_items, "0020000E")) == sorted([ct[0].SeriesInstanceUID, mr[0].SeriesInstanceUID])
        ct_item = next(s for s in series_items if _value(s, "00080060") == "CT")
        assert _value(ct_item, "00201209") == 3 and _value(ct_item, "00200011") == 2
        mr_only = client.search_for_series(search_filters={"Modality": "MR"})
        assert _uids(mr_only, "0020000E") == [mr[0].SeriesInstanceUID]
        with_thickness = client.search_for_series(study, fields=["SliceThickness"])
        assert all(_value(s, "00180050") == 2.5 for s in with_thickness)

        # Instances: includefield of a per-instance attribute is read from each file.
        instances = client.search_for_instances(study, ct[0].SeriesInstanceUID, fields=["ImagePositionPatient"])
        assert sorted(_uids(instances, "00080018")) == sorted(d.SOPInstanceUID for d in ct)
        positions = {_value(i, "00080018"): i["00200032"]["Value"] for i in instances}
        for ds in ct:
            assert positions[ds.SOPInstanceUID] == pytest.approx([float(v) for v in ds.ImagePositionPatient])
        one = client.search_for_instances(search_filters={"SOPInstanceUID": mr[1].SOPInstanceUID})
        assert _uids(one, "0020000E") == [mr[1].SeriesInstanceUID]
        assert _value(one[0], "00280010") == 64 and _value(one[0], "00080016") == mr[1].SOPClassUID

        # WADO-RS: instance, series and study retrieval; the pixel data round-trips.
        got = client.retrieve_instance(study, ct[1].SeriesInstanceUID, ct[1].SOPInstanceUID)
        assert got.SOPInstanceUID == ct[1].SOPInstanceUID and got.PixelData == ct[1].PixelData
        assert str(got.PatientName) == "Müller^Jürgen"
        assert sorted(d.SOPInstanceUID for d in client.retrieve_series(study, mr[0].SeriesInstanceUID)) == sorted(
            d.SOPInstanceUID for d in mr
        )
        assert len(client.retrieve_study(study)) == 5

        # Metadata: no pixel data, a BulkDataURI that returns exactly the pixel data.
        metadata = client.retrieve_series_metadata(study, ct[0].SeriesInstanceUID)
        assert sorted(_uids(metadata, "00080018")) == sorted(d.SOPInstanceUID for d in ct)
        first = next(m for m in metadata if _value(m, "00080018") == ct[0].SOPInstanceUID)
        assert "InlineBinary" not in first["7FE00010"] and "Value" not in first["7FE00010"]
        assert _value(first, "00083002") == "1.2.840.10008.1.2.1"
        assert client.retrieve_bulkdata(first["7FE00010"]["BulkDataURI"]) == [ct[0].PixelData]
        as_ds = Dataset.from_json({k: v for k, v in first.items() if k != "7FE00010"})
        assert as_ds.Rows == 64 and as_ds.SOPInstanceUID == ct[0].SOPInstanceUID

        # Frames: native pixel data of frame 1.
        [frame] = client.retrieve_instance_frames(study, ct[2].SeriesInstanceUID, ct[2].SOPInstanceUID, [1])
        assert frame == ct[2].PixelData
        with pytest.raises(requests.HTTPError) as err:
            client.retrieve_instance_frames(study, ct[2].SeriesInstanceUID, ct[2].SOPInstanceUID, [2])
        assert err.value.response.status_code == 404


def test_retrieve_sends_the_stored_bytes(node: HttpNode) -> None:
    study, ct, _mr = _study(2, 0)
    data = [part10(ds) for ds in ct]
    ctype, body = multipart_body([("application/dicom", d) for d in data])
    r = httpx.post(f"{node.dicomweb}/studies", content=body, headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == 200, r.text
    node.flush()
    client = _client(node)
    for ds, raw in zip(ct, data, strict=True):
        url = f"{node.dicomweb}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        assert client.retrieve_bulkdata(url) == [raw], "multipart/related; type=*/* sends the stored file unchanged"
    # The series as multipart with Content-Location per part, in instance order.
    r = httpx.get(
        f"{node.dicomweb}/studies/{study}/series/{ct[0].SeriesInstanceUID}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    assert r.status_code == 200
    parts = split_multipart(r.headers["content-type"], r.content)
    assert [p[1] for p in parts] == data
    assert all(p[0]["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1" for p in parts)
    assert parts[0][0]["content-location"].endswith(f"/instances/{ct[0].SOPInstanceUID}")
    # A bare application/dicom for one instance is one body, not multipart.
    r = httpx.get(
        f"{node.dicomweb}/studies/{study}/series/{ct[0].SeriesInstanceUID}/instances/{ct[0].SOPInstanceUID}",
        headers={"Accept": "application/dicom"},
    )
    assert r.status_code == 200 and r.content == data[0]


def test_retrieve_url_follows_the_host_header_without_public_url(make_settings: Callable[..., Settings]) -> None:
    with http_node(make_settings({"http": {"port": 0}})) as node:
        study, ct, _mr = _study(1, 0)
        ctype, body = multipart_body([("application/dicom", part10(ct[0]))])
        r = httpx.post(f"{node.dicomweb}/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200
        assert _value(r.json(), "00081190") == f"{node.url}/dicom-web/studies/{study}"
        node.flush()
        r = httpx.get(f"{node.dicomweb}/studies")
        assert _value(r.json()[0], "00081190") == f"{node.url}/dicom-web/studies/{study}"


# -- STOW refusals ----------------------------------------------------------------------------------------------------


def test_stow_refuses_bad_parts_and_keeps_the_good_ones(node: HttpNode) -> None:
    study, ct, _mr = _study(2, 0)
    ctype, body = multipart_body(
        [
            ("application/dicom", part10(ct[0])),
            ("application/dicom", b"this is not DICOM at all" * 10),
            ("text/plain", b"hello"),
            (None, part10(ct[1])),  # no Content-Type: the type parameter's application/dicom applies
        ]
    )
    r = httpx.post(f"{node.dicomweb}/studies", content=body, headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == 202, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    answer = r.json()
    stored = [_value(i, "00081155") for i in answer["00081199"]["Value"]]
    assert stored == [ct[0].SOPInstanceUID, ct[1].SOPInstanceUID]
    failed = answer["00081198"]["Value"]
    assert [_value(f, "00081197") for f in failed] == [0xC210, 0xC000]
    warnings = r.headers.get_list("warning")
    assert any("part 2" in w and "not stored" in w for w in warnings), warnings
    assert any("part 3" in w and "text/plain" in w and "not application/dicom" in w for w in warnings), warnings
    node.flush()
    ds = dcmread(io.BytesIO(_client(node).retrieve_bulkdata(stored_url(node, study, ct[1]))[0]))
    assert ds.SOPInstanceUID == ct[1].SOPInstanceUID
    with node.db.session() as session:
        assert sorted(session.scalars(select(Instance.sop_uid))) == sorted(d.SOPInstanceUID for d in ct)
    assert list(node.store.incoming_dir.iterdir()) == [], "refused parts leave nothing behind"
    assert list(node.store.quarantine_dir.iterdir()) == []


def stored_url(node: HttpNode, study: str, ds: Dataset) -> str:
    return f"{node.dicomweb}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def test_stow_to_a_study_refuses_instances_of_another(node: HttpNode) -> None:
    study, ct, _mr = _study(1, 0)
    elsewhere = new_uid()
    with pytest.raises(requests.HTTPError) as err:
        _client(node).store_instances(ct, study_instance_uid=elsewhere)
    r = err.value.response
    assert r.status_code == 409, "nothing stored"
    [failed] = r.json()["00081198"]["Value"]
    assert _value(failed, "00081197") == 0xC409 and _value(failed, "00081155") == ct[0].SOPInstanceUID
    assert elsewhere in r.headers["warning"]
    node.flush()
    with node.db.session() as session:
        assert session.scalar(select(Instance.id)) is None
    # The right study in the URL is fine.
    answer = _client(node).store_instances(ct, study_instance_uid=study)
    assert _value(answer.to_json_dict(), "00081190").endswith(f"/studies/{study}")


def test_stow_refuses_what_is_not_multipart_dicom(node: HttpNode) -> None:
    url = f"{node.dicomweb}/studies"
    r = httpx.post(url, content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415 and "multipart/related" in r.json()["error"]
    r = httpx.post(
        url, content=b"x", headers={"Content-Type": 'multipart/related; type="application/dicom+xml"; boundary=b'}
    )
    assert r.status_code == 415 and "only application/dicom parts" in r.json()["error"]
    r = httpx.post(url, content=b"x", headers={"Content-Type": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 400 and "boundary" in r.json()["error"]
    r = httpx.post(
        url,
        content=b"no parts here",
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
    )
    assert r.status_code == 400 and "no multipart boundary" in r.json()["error"]


def test_stow_of_a_truncated_body_keeps_the_complete_parts(node: HttpNode) -> None:
    study, ct, _mr = _study(2, 0)
    ctype, body = multipart_body([("application/dicom", part10(ct[0])), ("application/dicom", part10(ct[1]))])
    cut = body[: len(body) - len(part10(ct[1])) // 2]
    r = httpx.post(f"{node.dicomweb}/studies", content=cut, headers={"Content-Type": ctype})
    assert r.status_code == 202, r.text
    answer = r.json()
    assert [_value(i, "00081155") for i in answer["00081199"]["Value"]] == [ct[0].SOPInstanceUID]
    assert [_value(i, "00081197") for i in answer["00081198"]["Value"]] == [0xC000]
    assert any("truncated" in w for w in r.headers.get_list("warning"))
    node.flush()
    assert list(node.store.incoming_dir.iterdir()) == []


def test_large_stow_is_streamed_in_chunks(node: HttpNode) -> None:
    study = new_uid()
    big = list(make_series(1, rows=1024, cols=1024, study_uid=study))[0]  # 2 MiB of pixels
    small = list(make_series(1, rows=16, cols=16, study_uid=study, seed=3))[0]
    ctype, body = multipart_body([("application/dicom", part10(big)), ("application/dicom", part10(small))])

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 65_537):  # odd chunks: delimiters fall across them
            yield body[i : i + 65_537]

    r = httpx.post(f"{node.dicomweb}/studies", content=chunks(), headers={"Content-Type": ctype}, timeout=60)
    assert r.status_code == 200, r.text
    node.flush()
    client = _client(node)
    assert client.retrieve_bulkdata(stored_url(node, study, big)) == [part10(big)]
    [frame] = client.retrieve_instance_frames(study, big.SeriesInstanceUID, big.SOPInstanceUID, [1])
    assert frame == big.PixelData


# -- compressed and multi-frame instances -----------------------------------------------------------------------------


def test_compressed_multiframe_frames_and_transcoding(node: HttpNode, testdata: Callable[[str], str]) -> None:
    path = Path(testdata("emri_small_jpeg_2k_lossless.dcm"))  # enhanced MR, 10 frames, JPEG 2000 lossless
    raw = path.read_bytes()
    ds = dcmread(path)
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    ctype, body = multipart_body([("application/dicom", raw)])
    assert httpx.post(f"{node.dicomweb}/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
    node.flush()
    client = _client(node)
    base = f"{node.dicomweb}/studies/{study}/series/{series}/instances/{sop}"

    # Frames as stored (transfer-syntax=*): the JPEG 2000 codestreams of frames 3 and 10.
    stored = client.retrieve_instance_frames(
        study, series, sop, [3, 10], media_types=(("application/octet-stream", "*"),)
    )
    codestreams = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=10))
    assert stored == [codestreams[2], codestreams[9]]
    # Frames decoded for a client that wants native bytes (application/octet-stream, no syntax).
    r = httpx.get(f"{base}/frames/4", headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert r.status_code == 200
    [(headers, data)] = split_multipart(r.headers["content-type"], r.content)
    assert headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    assert np.array_equal(np.frombuffer(data, "<u2").reshape(64, 64), ds.pixel_array[3])
    # As image/jp2 (the frame's own media type).
    r = httpx.get(f"{base}/frames/1", headers={"Accept": 'multipart/related; type="image/jp2"'})
    [(headers, data)] = split_multipart(r.headers["content-type"], r.content)
    assert headers["content-type"].startswith("image/jp2") and data == codestreams[0]
    # Something we cannot give: 406 with what we offer.
    r = httpx.get(f"{base}/frames/1", headers={"Accept": 'multipart/related; type="image/jpeg"'})
    assert r.status_code == 406 and "image/jp2" in r.json()["error"]
    r = httpx.get(f"{base}/frames/11")
    assert r.status_code == 404 and "10 frame" in r.json()["error"]
    r = httpx.get(f"{base}/frames/0,x")
    assert r.status_code == 400

    # Instance retrieval: stored bytes with transfer-syntax=*, decompressed for Explicit VR Little Endian,
    # which is also what a multipart/related; type="application/dicom" without transfer-syntax means.
    assert client.retrieve_bulkdata(base) == [raw]
    assert client.retrieve_instance(study, series, sop).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    explicit = client.retrieve_instance(study, series, sop, media_types=(("application/dicom", EXPLICIT_LE),))
    assert explicit.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert np.array_equal(explicit.pixel_array, ds.pixel_array)
    r = httpx.get(base, headers={"Accept": 'multipart/related; type="application/dicom"'})
    [(headers, data)] = split_multipart(r.headers["content-type"], r.content)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={EXPLICIT_LE}"
    assert dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == EXPLICIT_LE
    # Metadata and the multi-frame QIDO answer.
    meta = client.retrieve_instance_metadata(study, series, sop)
    assert _value(meta, "00083002") == "1.2.840.10008.1.2.4.90" and _value(meta, "00280008") == 10
    [inst] = client.search_for_instances(study)
    assert _value(inst, "00280008") == 10


# -- produced results are searchable and retrievable -----------------------------------------------------------------


def _seg_for(source: list[Dataset]) -> Dataset:
    mask = np.zeros((len(source), source[0].Rows, source[0].Columns), dtype=bool)
    mask[:, 10:30, 12:40] = True
    algorithm = hd.AlgorithmIdentificationSequence(
        name="test", version="1", family=hd.sr.CodedConcept("123109", "DCM", "Manual Processing")
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="box",
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical structure"),
        segmented_property_type=hd.sr.CodedConcept("64033007", "SCT", "Kidney"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    return hd.seg.Segmentation(
        source_images=source,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=new_uid(),
        series_number=9001,
        sop_instance_uid=new_uid(),
        instance_number=1,
        manufacturer="pacs-node",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
        series_description="AI test SEG",
    )


def _add_job(node: HttpNode, study_uid: str) -> int:
    with node.db.session() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        assert study is not None
        job = Job(study_id=study.id, pipeline="kidney", route="kidney", state=JobState.DONE, inputs={})
        session.add(job)
        session.flush()
        return int(job.id)


def test_results_are_searchable_and_retrievable(make_settings: Callable[..., Settings], db_url: str) -> None:
    with http_node(node_settings(make_settings, db_url)) as node:
        client = _client(node)
        study, ct, _mr = _study(4, 0)
        client.store_instances(ct)
        node.flush()
        seg = _seg_for(ct)
        job_id = _add_job(node, study)
        [out] = store_outputs(node.settings, node.db, node.store, job_id, [BuiltOutput(OutputKind.SEG, seg)])

        [item] = client.search_for_studies(search_filters={"StudyInstanceUID": study})
        assert item["00080061"]["Value"] == ["CT", "SEG"]
        assert _value(item, "00201206") == 2 and _value(item, "00201208") == 5
        assert _uids(client.search_for_studies(search_filters={"ModalitiesInStudy": "SEG"}), "0020000D") == [study]
        series = client.search_for_series(study)
        seg_series = next(s for s in series if _value(s, "0020000E") == seg.SeriesInstanceUID)
        assert _value(seg_series, "00080060") == "SEG"
        assert _value(seg_series, "0008103E") == "AI test SEG" and _value(seg_series, "00200011") == 9001
        assert _value(seg_series, "00201209") == 1
        [inst] = client.search_for_instances(search_filters={"Modality": "SEG"})
        assert _value(inst, "00080018") == seg.SOPInstanceUID and _value(inst, "00080016") == SEG_CLASS
        assert _value(inst, "00280008") == 4 and _value(inst, "00280100") == 1

        # OHIF opens a SEG by its metadata and the instance itself.
        [meta] = client.retrieve_series_metadata(study, seg.SeriesInstanceUID)
        assert _value(meta, "00080018") == seg.SOPInstanceUID and meta["7FE00010"]["vr"] == "OB"
        stored_seg = dcmread(node.store.path(out.path))
        assert client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"]) == [stored_seg.PixelData]
        got = client.retrieve_instance(study, seg.SeriesInstanceUID, seg.SOPInstanceUID)
        assert got.SOPInstanceUID == seg.SOPInstanceUID
        back = hd.seg.segread(io.BytesIO(client.retrieve_bulkdata(stored_url(node, study, seg))[0]))
        assert back.number_of_segments == 1
        assert client.retrieve_bulkdata(stored_url(node, study, seg)) == [node.store.path(out.path).read_bytes()]
        # 1-bit frames, each packed from its first bit.
        frames = client.retrieve_instance_frames(study, seg.SeriesInstanceUID, seg.SOPInstanceUID, [1, 4])
        expected = seg.pixel_array
        for data, index in zip(frames, (0, 3), strict=True):
            bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[: 64 * 64]
            assert np.array_equal(bits.reshape(64, 64), expected[index])
        assert len(client.retrieve_study(study)) == 5

        # A superseded result disappears; a result received back is listed once.
        with node.db.session() as session:
            session.execute(update(Output).values(superseded_at=Output.created_at))
        assert [_value(s, "00080060") for s in client.search_for_series(study)] == ["CT"]
        with node.db.session() as session:
            session.execute(update(Output).values(superseded_at=None))
        client.store_instances([seg])
        node.flush()
        assert sorted(_value(s, "00080060") for s in client.search_for_series(study)) == ["CT", "SEG"]
        assert len(client.search_for_instances(study, seg.SeriesInstanceUID)) == 1


# -- QIDO details -----------------------------------------------------------------------------------------------------


def test_qido_errors_and_warnings(node: HttpNode) -> None:
    study, ct, _mr = _study(1, 0, PatientAge="050Y")
    _client(node).store_instances(ct)
    node.flush()
    r = httpx.get(f"{node.dicomweb}/studies", params={"StudyDate": "2026-11-20"})
    assert r.status_code == 400 and "YYYYMMDD" in r.json()["error"]
    r = httpx.get(f"{node.dicomweb}/studies", params={"NotAnAttribute": "x"})
    assert r.status_code == 400 and "NotAnAttribute" in r.json()["error"]
    r = httpx.get(f"{node.dicomweb}/studies", params={"limit": "-1"})
    assert r.status_code == 400
    r = httpx.get(f"{node.dicomweb}/studies", params={"ReferringPhysicianName": "Nobody", "00100020": "SYN0001"})
    assert r.status_code == 200 and len(r.json()) == 1, "an unsupported key is ignored, a tag is a key"
    assert "ReferringPhysicianName" in r.headers["warning"]
    r = httpx.get(f"{node.dicomweb}/studies", headers={"Accept": "application/dicom+xml"})
    assert r.status_code == 406
    r = httpx.get(f"{node.dicomweb}/studies/1.2.3.4/series")
    assert r.status_code == 200 and r.json() == []
    r = httpx.get(f"{node.dicomweb}/studies/1.2.3.4")
    assert r.status_code == 404 and "1.2.3.4" in r.json()["error"]
    r = httpx.get(f"{node.dicomweb}/studies/not..a..uid/metadata")
    assert r.status_code == 400
    r = httpx.get(f"{node.dicomweb}/studies")
    assert "00101010" not in r.json()[0], "PatientAge is not returned by default"
    r = httpx.get(f"{node.dicomweb}/studies", params={"includefield": "all"})
    assert _value(r.json()[0], "00101010") == "050Y" and "00080070" not in r.json()[0], "study level only"
    r = httpx.get(f"{node.dicomweb}/studies", params={"includefield": "00101010,Manufacturer"})
    assert _value(r.json()[0], "00101010") == "050Y" and _value(r.json()[0], "00080070") == "SIEMENS"


def test_metadata_is_read_once_and_refreshed_when_the_file_changes(node: HttpNode) -> None:
    study, ct, _mr = _study(1, 0)
    client = _client(node)
    client.store_instances(ct)
    node.flush()
    client.retrieve_study_metadata(study)
    misses = node.server.context.cache.misses
    client.retrieve_study_metadata(study)
    assert node.server.context.cache.misses == misses
    changed = ct[0].copy()
    changed.SeriesDescription = "re-sent with another description"
    client.store_instances([changed])
    node.flush()
    [meta] = client.retrieve_study_metadata(study)
    assert _value(meta, "0008103E") == "re-sent with another description"


def test_responses_are_json_and_multipart_as_declared(node: HttpNode) -> None:
    study, ct, _mr = _study(1, 0)
    _client(node).store_instances(ct)
    node.flush()
    r = httpx.get(f"{node.dicomweb}/studies/{study}/metadata")
    assert r.headers["content-type"] == "application/dicom+json"
    assert json.loads(r.content)[0]["00080018"]["Value"] == [ct[0].SOPInstanceUID]


def test_public_url_names_the_retrieve_urls(make_settings: Callable[..., Settings]) -> None:
    for public in ("https://proxy.example/pacs", "https://proxy.example/pacs/dicom-web/"):
        with http_node(make_settings({"http": {"port": 0, "public_url": public}})) as node:
            study, ct, _mr = _study(1, 0)
            ctype, body = multipart_body([("application/dicom", part10(ct[0]))])
            r = httpx.post(f"{node.dicomweb}/studies", content=body, headers={"Content-Type": ctype})
            assert _value(r.json(), "00081190") == f"https://proxy.example/pacs/dicom-web/studies/{study}"
            node.flush()
            [meta] = _client(node).retrieve_study_metadata(study)
            assert meta["7FE00010"]["BulkDataURI"].startswith(f"https://proxy.example/pacs/dicom-web/studies/{study}/")
