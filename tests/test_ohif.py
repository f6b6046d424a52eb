"""Clinicians see the overlay in OHIF v3: the node's results, opened in the viewer they use.

For each demo pipeline (stroke DWI+ADC+FLAIR, dentate QSM, kidney CT) the inputs and
the results the node itself produced in ``pacs-node demo`` (the session's
``demo_run``) are stored by STOW-RS into a DICOMweb server, OHIF v3 (the npm
package's prebuilt viewer) is opened on ``/viewer?StudyInstanceUIDs=...``, the SEG is
loaded from the study browser, and at the image where each segment is largest
the overlay's colours must lie inside the segment's outline and nowhere else
(:func:`tests.viewer_support.check_overlay`). Screenshots are kept under
``$TEST_ARTIFACTS_DIR`` (else a temporary folder).

The server is the node's own DICOMweb (which also serves OHIF at ``/viewer``) and,
in a test marked ``slow``, Orthanc's DICOMweb behind a same-origin proxy. For
the dentate nuclei and the kidneys, the patient's left structure is drawn to the
right of the right one, as radiologists read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread

from pacs_lab.synthetic import make_series
from pacs_node.config import Settings
from pacs_node.errors import ConfigError
from pacs_node.web import HttpServer
from storage.models import Study
from tests.conftest import dimse
from tests.http_support import http_node, node_settings, part10
from tests.test_orthanc import Orthanc, start_orthanc  # noqa: F401  (fixture)
from tests.viewer_support import (
    ViewerProxy,
    analyse_overlay,
    artifacts,  # noqa: F401  (fixture)
    browser,  # noqa: F401  (fixture)
    check_overlay,
    load_seg,
    new_page,  # noqa: F401  (fixture)
    ohif_dist,
    open_study,
    read_seg,
)

PIPELINES = ("stroke", "dentate", "kidney")
ISOLATION = {
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-embedder-policy": "require-corp",
    "cross-origin-resource-policy": "same-origin",
}


# -- serving the viewer (no browser) --------------------------------------------------------------------------------


def _fake_dist(folder: Path) -> Path:
    """A folder shaped like OHIF's dist/: index.html with its service-worker script, a bundle, a wasm."""
    folder.mkdir(parents=True)
    (folder / "index.html").write_text(
        '<!doctype html><html><head><script src="/app-config.js"></script>'
        '<script rel="preload" as="script" type="module" src="/init-service-worker.js"></script>'
        '<script defer src="/app.bundle.0123456789abcdef.js"></script></head><body><div id="root"></div></body></html>'
    )
    (folder / "app.bundle.0123456789abcdef.js").write_text("console.log('ohif')")
    (folder / "init-service-worker.js").write_text("navigator.serviceWorker.register('/sw.js')")
    (folder / "sw.js").write_text("self.addEventListener('fetch', () => {})")
    (folder / "app-config.js").write_text(
        "window.config = {dataSources: [{configuration: {qidoRoot: 'https://elsewhere'}}]}"
    )
    (folder / "0ddf166f7a343eda.wasm").write_bytes(b"\0asm\1\0\0\0")
    return folder


def test_the_node_serves_ohif_at_viewer_with_an_app_config_for_its_own_dicomweb(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    dist = _fake_dist(tmp_path / "dist")
    (tmp_path / "secret.txt").write_text("outside the viewer folder")
    with http_node(node_settings(make_settings, viewer_dir=str(dist))) as node:
        for path in ("/viewer?StudyInstanceUIDs=1.2.3", "/viewer", "/segmentation?StudyInstanceUIDs=1.2.3"):
            r = httpx.get(node.url + path)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
            assert '<div id="root">' in r.text and "init-service-worker" not in r.text, path
            assert {k: r.headers.get(k) for k in ISOLATION} == ISOLATION, path
        config = httpx.get(node.url + "/app-config.js")
        assert config.status_code == 200 and config.headers["content-type"].startswith("text/javascript")
        assert "window.location.origin" in config.text and '"/dicom-web"' in config.text
        assert "elsewhere" not in config.text and "@ohif/extension-default.dataSourcesModule.dicomweb" in config.text
        assert {k: config.headers.get(k) for k in ISOLATION} == ISOLATION
        bundle = httpx.get(node.url + "/app.bundle.0123456789abcdef.js")
        assert bundle.status_code == 200 and "immutable" in bundle.headers["cache-control"]
        assert bundle.headers["content-type"].startswith("text/javascript")
        assert httpx.get(node.url + "/0ddf166f7a343eda.wasm").headers["content-type"] == "application/wasm"
        for path in ("/sw.js", "/init-service-worker.js", "/nothing-here.js", "/..%2fsecret.txt", "/%2e%2e/secret.txt"):
            r = httpx.get(node.url + path)
            assert r.status_code == 404 and "outside" not in r.text, path
        # the node's own routes come first and answer as before
        assert httpx.get(node.url + "/api/nope").status_code == 404
        assert httpx.get(node.url + "/healthz").json()["status"] == "ok"
        assert httpx.get(node.url + "/dicom-web/studies").status_code == 200
        home = httpx.get(node.url + "/")
        assert home.status_code == 303 and home.headers["location"] == "/ui/"


def test_viewer_links_without_a_viewer_folder(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    with http_node(node_settings(make_settings)) as node:
        r = httpx.get(node.url + "/viewer?StudyInstanceUIDs=1.2.3")
        assert r.status_code == 404 and "http.viewer_dir" in r.text
    own = "https://viewer.example.org/viewer?StudyInstanceUIDs={study_uid}"
    with http_node(node_settings(make_settings, viewer_url=own)) as node:
        r = httpx.get(node.url + "/viewer?StudyInstanceUIDs=1.2.3")
        assert r.status_code == 303 and r.headers["location"] == own.format(study_uid="1.2.3")
    with pytest.raises(ConfigError, match="viewer_url"):
        node_settings(make_settings, viewer_url="https://viewer.example.org/viewer")
    empty = tmp_path / "empty"
    empty.mkdir()
    settings = node_settings(make_settings, viewer_dir=str(empty))
    from pacs_node.common.store import open_store
    from storage.db import Database

    with pytest.raises(ConfigError, match="holds no index.html"):
        HttpServer(settings, Database(settings.db_url), open_store(settings), ingestor=None)  # type: ignore[arg-type]


def test_the_dashboard_links_each_study_to_the_viewer(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """Studies list, study page and job card open the study in the viewer the node serves, or the site's own."""
    study = next(make_series(1, rows=8, cols=8))
    with http_node(node_settings(make_settings, viewer_dir=str(_fake_dist(tmp_path / "dist")))) as node:
        node.ingestor.receive_bytes(part10(study))
        node.flush()
        href = f'href="/viewer?StudyInstanceUIDs={study.StudyInstanceUID}"'
        listing = httpx.get(node.url + "/ui/studies")
        assert listing.status_code == 200 and href in listing.text and ">Viewer</a>" in listing.text
        page = httpx.get(f"{node.url}/ui/studies/{study.StudyInstanceUID}")
        assert page.status_code == 200 and href in page.text and "Open in viewer" in page.text
        opened = httpx.get(node.url + f"/viewer?StudyInstanceUIDs={study.StudyInstanceUID}")
        assert opened.status_code == 200 and '<div id="root">' in opened.text
    own = "https://viewer.example.org/viewer?StudyInstanceUIDs={study_uid}"
    with http_node(node_settings(make_settings, viewer_url=own)) as node:
        node.ingestor.receive_bytes(part10(study))
        node.flush()
        listing = httpx.get(node.url + "/ui/studies")
        assert f'href="{own.format(study_uid=study.StudyInstanceUID)}"' in listing.text
    with http_node(node_settings(make_settings)) as node:  # no viewer configured: no dead link
        node.ingestor.receive_bytes(part10(study))
        node.flush()
        listing = httpx.get(node.url + "/ui/studies")
        assert study.StudyInstanceUID in listing.text and "/viewer?" not in listing.text


# -- the overlay check itself ---------------------------------------------------------------------------------------


def _screens(mask: np.ndarray, colour: tuple[int, int, int], shift: int = 0, scale: int = 10) -> tuple[Any, Any]:
    """Screenshots of a grey image with ``mask`` blended in ``colour`` (alpha 0.5), drawn ``shift`` pixels right."""
    hidden = np.full((mask.shape[0] * scale, mask.shape[1] * scale, 3), 100, dtype=np.int16)
    drawn = np.roll(mask, shift, axis=1).repeat(scale, axis=0).repeat(scale, axis=1)
    shown = hidden.copy()
    shown[drawn] = (0.5 * hidden[drawn] + 0.5 * np.asarray(colour)).astype(np.int16)
    return shown, hidden


def test_the_overlay_check_fails_for_a_misplaced_or_miscoloured_overlay() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:10, 4:9] = True
    red, blue = (255, 64, 64), (0, 80, 255)

    def to_image(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return y / 10 - 0.5, x / 10 - 0.5

    def check(shown: Any, hidden: Any) -> Any:
        return analyse_overlay(shown, hidden, to_image, {1: mask}, {1: red, 2: blue}, {1: "lesion", 2: "other"})

    good = check(*_screens(mask, red))
    assert good.segments[1].coverage == 1.0 and good.segments[1].outside_px == 0 and good.stray_px == 0
    shifted = check(*_screens(mask, red, shift=3))
    assert shifted.segments[1].coverage < 0.6 and shifted.segments[1].outside_px > 25
    wrong_colour = check(*_screens(mask, blue))
    assert wrong_colour.segments[1].inside_px == 0 and wrong_colour.segments[2].outside_px > 25


def _demo_files(demo_run: Any, pipeline: str) -> tuple[list[Path], Path]:
    """Every input of a demo pipeline and the results the demo PACS received (SEG, SR, key images)."""
    result = demo_run.results.get(pipeline)
    assert result is not None and result.state == "done", f"the demo's {pipeline} run: {result}"
    inputs = sorted((demo_run.folder / "inputs" / pipeline).rglob("*.dcm"))
    results = sorted((demo_run.folder / pipeline).glob("*.dcm"))
    seg = demo_run.folder / pipeline / "seg.dcm"
    assert inputs and seg in results, f"demo files of {pipeline}: {len(inputs)} inputs, results {results}"
    return inputs + results, seg


def _stow(url: str, files: list[Path]) -> list[Dataset]:
    datasets = [dcmread(f) for f in files]
    client = DICOMwebClient(url=url)
    for start in range(0, len(datasets), 50):
        client.store_instances(datasets[start : start + 50])
    return datasets


def _show(page: Any, base: str, datasets: list[Dataset], seg_path: Path, out: Path, name: str) -> list[Any]:
    """Open the study, load the SEG onto its reference series and check the overlay; returns the reports."""
    seg = read_seg(seg_path)
    sources = {str(ds.SOPInstanceUID): ds for ds in datasets if str(ds.SeriesInstanceUID) == seg.referenced_series_uid}
    assert sources, "the SEG's reference series is not among the stored instances"
    reference = str(next(iter(sources.values())).SeriesDescription)
    study_uid = str(datasets[0].StudyInstanceUID)
    open_study(page, base, study_uid)
    shown = load_seg(page, seg, reference)
    reports = check_overlay(page, seg, sources, shown, out, name)
    assert not page.errors, f"{name}: script errors in the viewer: {page.errors[:3]}"
    return reports


def _left_on_the_screens_right(reports: list[Any]) -> None:
    """Radiological convention: where left and right structures are drawn together (dentate nuclei,
    kidneys), the patient's left one is to the right of the patient's right one on the screen."""
    pairs = 0
    for report in reports:
        sides = {
            s.label.split()[0].lower(): s.centre_x
            for s in report.segments.values()
            if s.centre_x is not None and s.label.split()[0].lower() in ("left", "right")
        }
        if len(sides) == 2:
            pairs += 1
            assert sides["left"] > sides["right"], f"left drawn at x={sides['left']:.0f}, right at {sides['right']:.0f}"
    assert pairs, "no image showed a left and a right structure together"


def _stroke_lands_on_lesion(reports: list[Any]) -> None:
    """The DWI is one series with b=0 and b=1000 images at each position: OHIF shows it as 4-D.
    The overlay must be right at both b-values, and at b=1000 it covers the bright lesion."""
    groups = {r.group for r in reports}
    assert any(g and g.endswith(" 1000") for g in groups), f"OHIF did not show the DWI as 4-D (groups {groups})"
    for r in reports:
        if r.group and r.group.endswith(" 1000"):
            assert r.inside_grey > r.around_grey + 20, f"the overlay is not on the hyperintense lesion at b=1000: {r}"


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_ohif_draws_the_seg_over_its_segments_from_the_node_dicomweb(
    pipeline: str,
    demo_run: Any,
    make_settings: Callable[..., Settings],
    new_page: Callable[..., Any],  # noqa: F811
    artifacts: Path,  # noqa: F811
) -> None:
    dist = ohif_dist()
    files, seg_path = _demo_files(demo_run, pipeline)
    with http_node(node_settings(make_settings, viewer_dir=str(dist))) as node:
        datasets = _stow(node.dicomweb, files)
        node.flush()
        page = new_page(quiet_ohif=True)
        reports = _show(page, node.url, datasets, seg_path, artifacts, f"node-{pipeline}")
    if pipeline == "stroke":
        _stroke_lands_on_lesion(reports)
    else:
        _left_on_the_screens_right(reports)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite: the viewer reads through the same queries on both databases (tests/test_http_dicomweb.py)."""
    return f"sqlite:///{tmp_path / 'db.sqlite'}"


def test_ohif_behind_the_token_login(
    queued: Callable[..., Any],
    recording_scp: Callable[..., Any],
    new_page: Callable[..., Any],  # noqa: F811
    artifacts: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """With a token, /viewer sends the browser to the login form and back; the viewer's DICOMweb
    requests then carry the session cookie (same origin) and the study opens."""
    dist = ohif_dist()
    token_file = tmp_path / "token"
    token_file.write_text("viewer-test-token\n")
    env = queued({"pacs": dimse(recording_scp("PACS"))}, http={"token_file": str(token_file), "viewer_dir": str(dist)})
    with env.db.session() as s:
        study_uid = s.query(Study).one().study_uid
    with http_node(env.settings) as node:
        assert httpx.get(f"{node.url}/dicom-web/studies/{study_uid}/metadata").status_code == 401
        page = new_page(quiet_ohif=True)
        page.goto(f"{node.url}/viewer?StudyInstanceUIDs={study_uid}")
        assert "/ui/login" in page.url
        page.fill("input[name=token]", "viewer-test-token")
        page.click("button[type=submit]")
        page.wait_for_url(f"**/viewer?StudyInstanceUIDs={study_uid}")
        open_study(page, "", study_uid, navigate=False)
        page.screenshot(path=str(artifacts / "viewer-after-login.png"))
        assert not page.errors, page.errors


@pytest.mark.slow
def test_ohif_draws_the_seg_over_its_segments_from_orthanc_dicomweb(
    demo_run: Any,
    start_orthanc: Callable[..., Orthanc],  # noqa: F811
    new_page: Callable[..., Any],  # noqa: F811
    artifacts: Path,  # noqa: F811
) -> None:
    """The same check with Orthanc as the PACS (its DICOMweb plugin), OHIF in front of it."""
    dist = ohif_dist()
    orthanc = start_orthanc()
    proxy = ViewerProxy(dist, f"{orthanc.url}/dicom-web")
    try:
        for pipeline in PIPELINES:
            files, seg_path = _demo_files(demo_run, pipeline)
            datasets = _stow(f"{orthanc.url}/dicom-web", files)
            page = new_page(quiet_ohif=True)
            reports = _show(page, proxy.url, datasets, seg_path, artifacts, f"orthanc-{pipeline}")
            page.context.close()
            if pipeline == "stroke":
                _stroke_lands_on_lesion(reports)
    finally:
        proxy.stop()
