"""Browser tests' support: Debian's chromium driven by Playwright, OHIF v3's prebuilt viewer,
and the check that a SEG's overlay lands where its segments are.

Nothing is downloaded at test time: ``scripts/install_viewer.sh`` installs chromium
and Playwright and unpacks ``@ohif/app``'s ``dist/`` into ``.cache/ohif/<version>/``.
Where something is missing the tests skip, except in CI (``CI`` set), where they fail.

The overlay check (:func:`check_overlay`) does not trust the viewer's own
bookkeeping for *where* a segment is: it takes the segment's mask on a source
image from the SEG file (highdicom), maps that image's pixel grid to the
screen through the viewport's own ``worldToCanvas`` (three points give the
affine map, a fourth checks it), and then compares two screenshots of the
viewport, with the segmentation shown and hidden. The pixels that changed are
the overlay; each is given to the segment whose display colour it has (hue in
the (R-G, G-B) plane, which blending over a grey image keeps), and it must lie
inside that segment's outline (allowing for the outline's width) and nowhere
else.
"""

from __future__ import annotations

import atexit
import io
import json
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
OHIF_VERSION = "3.13.2"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-gl=swiftshader",
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
]
#: how long OHIF may take to ask "Do you want to open this Segmentation?" after the double-click
PROMPT_TIMEOUT_S = 20
#: OHIF's first-visit tour and investigational-use banner would cover the viewport.
OHIF_QUIET = (
    "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
    "sessionStorage.setItem('investigationalUseDialog', 'hidden');"
)


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what}; scripts/install_viewer.sh installs it (CI runs it through scripts/install.sh --dev)")
    pytest.skip(what)


def ohif_dist() -> Path:
    """OHIF's prebuilt ``dist/`` (``PACS_NODE_OHIF_DIST`` or ``.cache/ohif/<version>/dist``)."""
    given = os.environ.get("PACS_NODE_OHIF_DIST")
    folder = Path(given) if given else REPO / ".cache" / "ohif" / OHIF_VERSION / "dist"
    if not (folder / "index.html").is_file():
        _missing(f"OHIF {OHIF_VERSION} is not unpacked in {folder}")
    return folder


def chromium_path() -> str:
    """Debian's chromium (Playwright drives it; it downloads no browser of its own)."""
    found = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if found is None:
        _missing("chromium is not installed (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("Playwright is not installed (pip install -c constraints.txt playwright)")
    return str(found)


_SHARED: dict[str, Any] = {}


def _close_shared() -> None:
    browser = _SHARED.pop("browser", None)
    pw = _SHARED.pop("playwright", None)
    if browser is not None:
        browser.close()
    if pw is not None:
        pw.stop()


def shared_browser() -> Any:
    """One headless chromium per test process, started on first use and closed at exit.

    Several test modules import the fixtures below, which makes pytest hold one
    session fixture per module; Playwright's sync API allows one instance per thread.
    """
    if "browser" not in _SHARED:
        exe = chromium_path()
        from playwright.sync_api import sync_playwright

        pw = sync_playwright().start()
        _SHARED["playwright"] = pw
        _SHARED["browser"] = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        atexit.register(_close_shared)
    return _SHARED["browser"]


@pytest.fixture(scope="session")
def browser() -> Any:
    """The process's headless chromium (:func:`shared_browser`)."""
    return shared_browser()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """Pages in fresh contexts (1280x800), closed at teardown; console errors are kept on ``page.errors``."""
    contexts: list[Any] = []

    def make(*, quiet_ohif: bool = False, width: int = 1280, height: int = 800) -> Any:
        ctx = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
        contexts.append(ctx)
        if quiet_ohif:
            ctx.add_init_script(OHIF_QUIET)
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        return page

    yield make
    for ctx in contexts:
        ctx.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots are kept: ``$TEST_ARTIFACTS_DIR`` or a session temporary folder."""
    given = os.environ.get("TEST_ARTIFACTS_DIR")
    folder = Path(given) if given else tmp_path_factory.mktemp("artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- a small server: OHIF in front of another DICOMweb server (Orthanc) ------------------------------------------------


class ViewerProxy:
    """OHIF served on 127.0.0.1 with ``/dicom-web`` proxied to another server's DICOMweb root.

    The viewer's requests stay same-origin (the page is cross-origin isolated for
    OHIF's SharedArrayBuffer use), and every answer carries the isolation headers.
    """

    def __init__(self, dist: Path, upstream: str) -> None:
        import httpx
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        from pacs_node.web.viewer import ISOLATION_HEADERS, ViewerFiles

        files = ViewerFiles(dist)
        client = httpx.Client(base_url=upstream.rstrip("/"), timeout=60)
        self._client = client

        def proxy(request: Request) -> Response:
            path = request.path_params["path"]
            headers = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "content-type")}
            up = client.request(
                request.method, "/" + path, params=list(request.query_params.multi_items()), headers=headers
            )
            # The upstream's retrieve URLs name the upstream: rewrite them to this origin.
            body = up.content
            ctype = up.headers.get("content-type", "application/octet-stream")
            if "json" in ctype:
                body = body.replace(upstream.rstrip("/").encode(), f"{self.url}/dicom-web".encode())
            return Response(body, status_code=up.status_code, media_type=ctype, headers=ISOLATION_HEADERS)

        def viewer(request: Request) -> Response:
            answer = files.response(request.path_params["path"])
            return answer if answer is not None else JSONResponse({"error": "not found"}, status_code=404)

        app = Starlette(
            routes=[
                Route("/dicom-web/{path:path}", proxy, methods=["GET"]),
                Route("/{path:path}", viewer, methods=["GET"]),
            ]
        )
        self.port = free_port()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        wait_for(lambda: self._server.started, timeout=20, what="the viewer proxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self._client.close()


# -- what the SEG says -------------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """One segment of a SEG: its number, label, recommended display colour and masks per source image."""

    number: int
    label: str
    rgb: tuple[int, int, int]
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # source SOP Instance UID -> (rows, cols) bool

    @property
    def largest(self) -> str:
        """The source instance where the segment covers most pixels."""
        return max(self.masks, key=lambda uid: int(self.masks[uid].sum()))


@dataclass
class SegInfo:
    """A SEG file read for the overlay check."""

    series_uid: str
    description: str
    referenced_series_uid: str
    segments: dict[int, Segment]


def read_seg(path: Path) -> SegInfo:
    """Segments, colours and per-source-instance masks of a SEG file (binary or labelmap)."""
    import highdicom as hd
    from highdicom.color import CIELabColor

    seg = hd.seg.segread(path)
    sources = [sop for _, _, sop in seg.get_source_image_uids()]
    numbers = [int(n) for n in seg.get_segment_numbers()]
    pixels = seg.get_pixels_by_source_instance(
        sources, segment_numbers=numbers, combine_segments=False, skip_overlap_checks=True, dtype=np.uint8
    )  # (sources, rows, columns, segments)
    segments: dict[int, Segment] = {}
    for item in seg.SegmentSequence:
        n = int(item.SegmentNumber)
        rgb = CIELabColor.from_dicom_value(tuple(int(v) for v in item.RecommendedDisplayCIELabValue)).to_rgb()
        segment = Segment(n, str(item.SegmentLabel), tuple(int(c) for c in rgb))
        k = numbers.index(n)
        for i, sop in enumerate(sources):
            mask = pixels[i, :, :, k] > 0
            if mask.any():
                segment.masks[sop] = mask
        segments[n] = segment
    ref_series = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    return SegInfo(str(seg.SeriesInstanceUID), str(seg.SeriesDescription), ref_series, segments)


@dataclass(frozen=True)
class Plane:
    """A source image's pixel grid in patient space (DICOM LPS, mm)."""

    position: np.ndarray  # centre of pixel (0, 0)
    row_dir: np.ndarray  # direction of increasing column index
    col_dir: np.ndarray  # direction of increasing row index
    spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    cols: int

    @classmethod
    def of(cls, ds: Any) -> Plane:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        ps = [float(v) for v in ds.PixelSpacing]
        return cls(
            np.asarray([float(v) for v in ds.ImagePositionPatient]),
            iop[:3],
            iop[3:],
            (ps[0], ps[1]),
            int(ds.Rows),
            int(ds.Columns),
        )

    def world(self, row: float, col: float) -> list[float]:
        """Patient coordinates of a (row, column) pixel centre."""
        p = self.position + col * self.spacing[1] * self.row_dir + row * self.spacing[0] * self.col_dir
        return [float(x) for x in p]


# -- driving OHIF ------------------------------------------------------------------------------------------------------

_JS_VIEWPORT = """() => {
  const cs = window.cornerstone;
  if (!cs) return null;
  const engine = cs.getRenderingEngines().find(e => e.id === 'OHIFCornerstoneRenderingEngine');
  if (!engine) return null;
  const vp = engine.getViewports()[0];
  if (!vp) return null;
  const ids = vp.getImageIds ? vp.getImageIds() : [];
  return {id: vp.id, type: vp.type, images: ids.length,
          current: vp.getCurrentImageId ? (vp.getCurrentImageId() || '') : ''};
}"""

_JS_SEGMENTATIONS = """() => {
  const ct = window.cornerstoneTools;
  const cs = window.cornerstone;
  if (!ct || !cs) return [];
  const engine = cs.getRenderingEngines().find(e => e.id === 'OHIFCornerstoneRenderingEngine');
  const vp = engine && engine.getViewports()[0];
  if (!vp) return [];
  const reps = ct.segmentation.state.getSegmentationRepresentations(vp.id) || [];
  return reps.map(r => {
    const s = ct.segmentation.state.getSegmentation(r.segmentationId);
    const colors = {};
    for (const k of Object.keys(s.segments)) {
      colors[k] = ct.segmentation.config.color.getSegmentIndexColor(vp.id, r.segmentationId, Number(k));
    }
    return {id: r.segmentationId, label: s.label, type: r.type, visible: r.visible, colors};
  });
}"""

#: resolves once the viewport has rendered again (cornerstone's IMAGE_RENDERED), or after 10 s
_RENDERED = """
  const rendered = (vp) => new Promise(resolve => {
    const done = () => { vp.element.removeEventListener('CORNERSTONE_IMAGE_RENDERED', done); resolve(true); };
    vp.element.addEventListener('CORNERSTONE_IMAGE_RENDERED', done);
    setTimeout(() => { vp.element.removeEventListener('CORNERSTONE_IMAGE_RENDERED', done); resolve(false); }, 10000);
  });
"""

_JS_GOTO = (
    """async ({sop, world}) => {"""
    + _RENDERED
    + """
  const cs = window.cornerstone;
  const vp = cs.getRenderingEngines().find(e => e.id === 'OHIFCornerstoneRenderingEngine').getViewports()[0];
  if (vp.setImageIdIndex && vp.type === 'stack') {
    const index = vp.getImageIds().findIndex(id => id.includes('/instances/' + sop + '/'));
    if (index < 0) return {ok: false, why: 'instance not in the stack'};
    await vp.setImageIdIndex(index);
  } else {
    // a volume viewport (a 4-D series is one): move the camera onto the image's plane
    const cam = vp.getCamera();
    const n = cam.viewPlaneNormal;
    const d = (world[0] - cam.focalPoint[0]) * n[0] + (world[1] - cam.focalPoint[1]) * n[1]
            + (world[2] - cam.focalPoint[2]) * n[2];
    const shift = p => [p[0] + d * n[0], p[1] + d * n[1], p[2] + d * n[2]];
    const done = rendered(vp);
    vp.setCamera({focalPoint: shift(cam.focalPoint), position: shift(cam.position)});
    vp.render();
    await done;
  }
  const done = rendered(vp);
  vp.render();
  await done;
  return {ok: true, type: vp.type};
}"""
)

_JS_MAP = """({points}) => {
  const cs = window.cornerstone;
  const vp = cs.getRenderingEngines().find(e => e.id === 'OHIFCornerstoneRenderingEngine').getViewports()[0];
  const r = vp.canvas.getBoundingClientRect();
  const cam = vp.getCamera();
  const n = cam.viewPlaneNormal;
  const f = cam.focalPoint;
  const off = p => (p[0] - f[0]) * n[0] + (p[1] - f[1]) * n[1] + (p[2] - f[2]) * n[2];
  return {
    rect: [r.x, r.y, r.width, r.height],
    canvas: points.map(p => vp.worldToCanvas(p)),
    offPlane: points.map(off),
    type: vp.type,
    current: vp.getCurrentImageId ? (vp.getCurrentImageId() || '') : '',
  };
}"""

_JS_VISIBLE = (
    """async ({visible}) => {"""
    + _RENDERED
    + """
  const cs = window.cornerstone, ct = window.cornerstoneTools;
  const vp = cs.getRenderingEngines().find(e => e.id === 'OHIFCornerstoneRenderingEngine').getViewports()[0];
  const done = rendered(vp);
  for (const r of ct.segmentation.state.getSegmentationRepresentations(vp.id) || []) {
    ct.segmentation.config.visibility.setSegmentationRepresentationVisibility(
      vp.id, {segmentationId: r.segmentationId, type: r.type}, visible);
  }
  vp.render();
  return await done;
}"""
)


_JS_GROUPS = """() => {
  const cs = window.cornerstone;
  const vp = cs.getRenderingEngines().find(e => e.id === 'OHIFCornerstoneRenderingEngine').getViewports()[0];
  const volumeId = vp.getVolumeId ? vp.getVolumeId() : null;
  const vol = volumeId ? cs.cache.getVolume(volumeId) : null;
  if (!vol || !vol.numDimensionGroups || vol.numDimensionGroups < 2) return null;
  const values = [];
  const keep = vol.dimensionGroupNumber;
  for (let g = 1; g <= vol.numDimensionGroups; g++) {
    vol.dimensionGroupNumber = g;
    const id = vol.getCurrentDimensionGroupImageIds()[0];
    values.push((cs.metaData.get('instance', id) || {})[vol.splittingTag]);
  }
  vol.dimensionGroupNumber = keep;
  return {tag: vol.splittingTag, current: keep, values};
}"""

_JS_SET_GROUP = (
    """async ({group}) => {"""
    + _RENDERED
    + """
  const cs = window.cornerstone;
  const vp = cs.getRenderingEngines().find(e => e.id === 'OHIFCornerstoneRenderingEngine').getViewports()[0];
  const vol = cs.cache.getVolume(vp.getVolumeId());
  const done = rendered(vp);
  vol.dimensionGroupNumber = group;
  vp.render();
  await done;
  return vol.dimensionGroupNumber;
}"""
)


def open_study(page: Any, base: str, study_uid: str, *, timeout: float = 90, navigate: bool = True) -> None:
    """Open ``/viewer?StudyInstanceUIDs=...`` (unless already there) and wait until a viewport shows an image."""
    if navigate:
        page.goto(f"{base}/viewer?StudyInstanceUIDs={study_uid}", timeout=timeout * 1000)
    wait_for(lambda: (page.evaluate(_JS_VIEWPORT) or {}).get("current"), timeout=timeout, what="OHIF's first image")


def _thumbnail(page: Any, description: str) -> Any:
    return page.locator("[data-cy='study-browser-thumbnail'], [data-cy='study-browser-thumbnail-no-image']").filter(
        has_text=description
    )


def load_seg(page: Any, seg: SegInfo, reference_description: str, *, timeout: float = 90) -> dict[str, Any]:
    """Show the reference series, then double-click the SEG in the study browser and confirm OHIF's prompt.

    Returns the segmentation as cornerstone holds it (id, label, colours per segment index).
    """
    ref = _thumbnail(page, reference_description).first
    ref.dblclick()
    wait_for(
        lambda: "/series/" + seg.referenced_series_uid + "/" in (page.evaluate(_JS_VIEWPORT) or {}).get("current", ""),
        timeout=timeout,
        what=f"the reference series {reference_description!r} in the viewport",
    )
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    _thumbnail(page, seg.description).first.dblclick()
    prompt = page.get_by_text("Do you want to open this Segmentation?")
    preview = page.get_by_text("LOAD", exact=True)  # the viewport's pill while the SEG is only previewed
    try:  # OHIF previews the SEG and asks; confirm
        prompt.first.wait_for(state="visible", timeout=PROMPT_TIMEOUT_S * 1000)
    except PlaywrightTimeout:
        prompted = False
    else:
        prompted = True
        page.get_by_role("button", name="Yes").first.click()
    deadline = time.monotonic() + timeout
    while True:
        reps = page.evaluate(_JS_SEGMENTATIONS)
        hydrated = [r for r in reps if r.get("label") == seg.description]
        confirmed = not (prompt.count() and prompt.first.is_visible()) and not (
            preview.count() and preview.first.is_visible()
        )
        if hydrated and confirmed:
            return dict(hydrated[0])
        if time.monotonic() > deadline:
            raise AssertionError(
                f"OHIF did not load the SEG {seg.description!r} within {timeout:g} s "
                f"(prompted: {prompted}, segmentations: {reps})"
            )
        page.wait_for_timeout(200)


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def stable_screenshot(page: Any, clip: dict[str, float], *, timeout: float = 20) -> tuple[bytes, np.ndarray]:
    """A screenshot of ``clip`` taken once two consecutive ones agree (rendering has settled)."""
    deadline = time.monotonic() + timeout
    last = page.screenshot(clip=clip)
    while True:
        page.wait_for_timeout(150)
        shot = page.screenshot(clip=clip)
        if shot == last:
            return shot, _png(shot)
        if time.monotonic() > deadline:
            raise AssertionError(f"the viewport did not settle within {timeout:g} s")
        last = shot


def _hue(rgb: np.ndarray) -> np.ndarray:
    u = rgb[..., 0].astype(float) - rgb[..., 1]
    v = rgb[..., 1].astype(float) - rgb[..., 2]
    return np.degrees(np.arctan2(v, u))


def _hue_distance(a: np.ndarray | float, b: float) -> np.ndarray:
    d = np.abs((np.asarray(a) - b + 180.0) % 360.0 - 180.0)
    return np.asarray(d)


@dataclass
class SegmentReport:
    """What the screenshots show for one segment on one image."""

    label: str
    display_rgb: tuple[int, int, int]
    expected_px: int  # screen pixels inside the segment's outline where no other (overlapping) segment lies
    inside_px: int  # overlay pixels of its colour inside the outline
    outside_px: int  # overlay pixels of its colour outside the (widened) outline
    centre_x: float | None = None  # mean x of those inside pixels, in the screenshot

    @property
    def coverage(self) -> float:
        return self.inside_px / self.expected_px if self.expected_px else 0.0


@dataclass
class OverlayReport:
    """The overlay check of one image: per segment, plus overlay pixels that belong to no segment's place."""

    image: str
    segments: dict[int, SegmentReport]
    stray_px: int
    overlay_px: int
    residual_colour_px: int  # coloured pixels left where the segments are when the segmentation is hidden
    inside_grey: float = 0.0  # mean grey level under the segments, segmentation hidden
    around_grey: float = 0.0  # mean grey level in a ring just outside them
    group: str | None = None  # the 4-D dimension group shown (e.g. "DiffusionBValue 1000")
    width: int = 0  # of the screenshot

    def as_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "group": self.group,
            "width": self.width,
            "inside_grey": round(self.inside_grey, 1),
            "around_grey": round(self.around_grey, 1),
            "stray_px": self.stray_px,
            "overlay_px": self.overlay_px,
            "residual_colour_px": self.residual_colour_px,
            "segments": {n: {**s.__dict__, "coverage": round(s.coverage, 3)} for n, s in sorted(self.segments.items())},
        }


def analyse_overlay(
    shown: np.ndarray,
    hidden: np.ndarray,
    to_image: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    masks: dict[int, np.ndarray],
    colours: dict[int, tuple[int, int, int]],
    labels: dict[int, str],
    *,
    tolerance_px: int = 5,
    image: str = "",
) -> OverlayReport:
    """Compare a viewport screenshot with the segmentation shown and hidden (plain numpy, unit-testable).

    Args:
        shown, hidden: (H, W, 3) screenshots of the viewport's canvas.
        to_image: maps screen pixel centres (x, y arrays) to continuous image (row, col) coordinates.
        masks: segment number -> (rows, cols) mask on the image shown (missing or empty: not on it).
        colours: segment number -> the colour the viewer displays it in.
        labels: segment number -> label, for messages.
        tolerance_px: how far outside the outline an overlay pixel may lie (outline width, anti-aliasing).
    """
    from scipy import ndimage

    h, w = shown.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    rows, cols = to_image(xs.ravel() + 0.5, ys.ravel() + 0.5)
    ri = np.floor(rows + 0.5).astype(int).reshape(h, w)
    ci = np.floor(cols + 0.5).astype(int).reshape(h, w)
    changed = np.abs(shown - hidden).max(axis=2) > 12
    chroma = np.hypot(shown[..., 0] - shown[..., 1], shown[..., 1] - shown[..., 2])
    overlay = changed & (chroma > 20)
    hue = _hue(shown)
    numbers = sorted(colours)
    hues = {n: float(_hue(np.asarray(colours[n], dtype=float))) for n in numbers}
    dist = np.stack([_hue_distance(hue, hues[n]) for n in numbers], axis=-1)
    nearest = np.asarray(numbers)[np.argmin(dist, axis=-1)]
    near_enough = dist.min(axis=-1) <= 25
    union = np.zeros((h, w), dtype=bool)
    anywhere = np.zeros((h, w), dtype=bool)
    reports: dict[int, SegmentReport] = {}
    on_screen: dict[int, np.ndarray] = {}
    for n in numbers:
        mask = masks.get(n)
        if mask is None:
            mask = np.zeros((1, 1), dtype=bool)
        inside_grid = (ri >= 0) & (ri < mask.shape[0]) & (ci >= 0) & (ci < mask.shape[1])
        expected = np.zeros((h, w), dtype=bool)
        expected[inside_grid] = mask[ri[inside_grid], ci[inside_grid]]
        on_screen[n] = expected
    for n in numbers:
        expected = on_screen[n]
        # overlapping segments (a whole kidney and its parenchyma): the viewer blends their translucent
        # fills, so a segment's own colour shows only where no other segment lies; that part is checked
        covered = np.zeros((h, w), dtype=bool)
        for m in numbers:
            if m != n:
                covered |= on_screen[m]
        visible = expected & ~covered
        widened = ndimage.binary_dilation(expected, iterations=tolerance_px) if expected.any() else expected
        union |= widened
        anywhere |= expected
        mine = overlay & near_enough & (nearest == n)
        xs_inside = xs[mine & visible]
        reports[n] = SegmentReport(
            centre_x=float(xs_inside.mean()) if xs_inside.size else None,
            label=labels.get(n, str(n)),
            display_rgb=tuple(int(c) for c in colours[n][:3]),
            expected_px=int(visible.sum()),
            inside_px=int((mine & visible).sum()),
            outside_px=int((mine & ~widened).sum()),
        )
    hidden_chroma = np.hypot(hidden[..., 0] - hidden[..., 1], hidden[..., 1] - hidden[..., 2])
    grey = hidden.mean(axis=2)
    ring = ndimage.binary_dilation(anywhere, iterations=3 * tolerance_px) & ~union if anywhere.any() else anywhere
    return OverlayReport(
        width=w,
        inside_grey=float(grey[anywhere].mean()) if anywhere.any() else 0.0,
        around_grey=float(grey[ring].mean()) if ring.any() else 0.0,
        image=image,
        segments=reports,
        stray_px=int((overlay & ~union).sum()),
        overlay_px=int(overlay.sum()),
        residual_colour_px=int(((hidden_chroma > 20) & union).sum()),
    )


def check_overlay(
    page: Any,
    seg: SegInfo,
    sources: dict[str, Any],
    shown_seg: dict[str, Any],
    artifacts: Path,
    name: str,
) -> list[OverlayReport]:
    """For each segment, go to the source image where it is largest, screenshot the viewport with the
    segmentation shown and hidden, save both, and assert the overlay's colours lie where the segments are.

    A series OHIF shows as 4-D (several b-values at each position) is checked at every
    one of its dimension groups: the overlay must land on the same place whichever
    b-value is on screen.

    Args:
        page: the OHIF page, with the SEG loaded (:func:`load_seg`).
        seg: the SEG as read by :func:`read_seg`.
        sources: source SOP Instance UID -> its dataset (header) with the image's geometry.
        shown_seg: what :func:`load_seg` returned (the viewer's display colours).
        artifacts: where the screenshots go.
        name: a prefix for their file names.

    Returns:
        One report per image and dimension group checked (``report.group`` names the group's value).
    """
    colours = {int(k): tuple(int(c) for c in v[:3]) for k, v in shown_seg["colors"].items() if int(k) > 0}
    for n, segment in seg.segments.items():
        assert n in colours, f"OHIF shows no segment {n} ({segment.label}); it has {sorted(colours)}"
        shown_hue = float(_hue(np.asarray(colours[n], float)))
        assert _hue_distance(shown_hue, float(_hue(np.asarray(segment.rgb, float)))) <= 20, (
            f"segment {segment.label}: OHIF displays {colours[n]}, the SEG recommends {segment.rgb}"
        )
    labels = {n: s.label for n, s in seg.segments.items()}
    targets = list(dict.fromkeys(s.largest for s in seg.segments.values() if s.masks))
    assert targets, f"the SEG {seg.description} has no segment pixels at all"
    groups = page.evaluate(_JS_GROUPS)
    reports = []
    for k, sop in enumerate(targets):
        plane = Plane.of(sources[sop])
        centre = plane.world((plane.rows - 1) / 2, (plane.cols - 1) / 2)
        moved = page.evaluate(_JS_GOTO, {"sop": sop, "world": centre})
        assert moved["ok"], f"cannot show instance {sop}: {moved}"
        probe = [plane.world(0, 0), plane.world(0, 1), plane.world(1, 0), plane.world(plane.rows - 1, plane.cols - 1)]
        half_slice = 0.5 * _slice_tolerance(sources, sop)

        def on_plane(probe: list[list[float]] = probe, half_slice: float = half_slice) -> dict[str, Any] | None:
            m = dict(page.evaluate(_JS_MAP, {"points": probe}))
            return m if max(abs(o) for o in m["offPlane"]) < half_slice else None

        geo = wait_for(on_plane, timeout=20, what=f"the viewport on instance {sop}")
        x, y, w, h = geo["rect"]
        clip = {"x": math.floor(x) + 1, "y": math.floor(y) + 1, "width": math.floor(w) - 2, "height": math.floor(h) - 2}
        c0, c1, c2, c3 = (np.asarray(p, float) for p in geo["canvas"])
        offset = np.asarray([x - clip["x"], y - clip["y"]])  # canvas -> clip pixels
        o, ex, ey = c0 + offset, c1 - c0, c2 - c0  # pixel (0, 0), one column, one row
        predicted = o + (plane.cols - 1) * ex + (plane.rows - 1) * ey
        assert np.allclose(predicted, c3 + offset, atol=1.5), "worldToCanvas is not the affine map of the image grid"
        inverse = np.linalg.inv(np.column_stack([ey, ex]))  # (row, col) = inverse @ (p - o)

        def to_image(px: np.ndarray, py: np.ndarray, o: np.ndarray = o, inverse: np.ndarray = inverse) -> Any:
            rc = inverse @ np.vstack([px - o[0], py - o[1]])
            return rc[0], rc[1]

        masks = {n: s.masks[sop] for n, s in seg.segments.items() if sop in s.masks}
        for g, value in enumerate(groups["values"] if groups else [None], start=1):
            tag = f"{name}-{k + 1}" + (f"-{groups['tag']}{value}" if groups else "")
            if groups:
                page.evaluate(_JS_SET_GROUP, {"group": g})
            shown_png, shown = stable_screenshot(page, clip)
            (artifacts / f"{tag}-overlay.png").write_bytes(shown_png)
            page.evaluate(_JS_VISIBLE, {"visible": False})
            hidden_png, hidden = stable_screenshot(page, clip)
            (artifacts / f"{tag}-hidden.png").write_bytes(hidden_png)
            page.evaluate(_JS_VISIBLE, {"visible": True})
            report = analyse_overlay(shown, hidden, to_image, masks, colours, labels, image=sop)
            report.group = None if value is None else f"{groups['tag']} {value}"
            (artifacts / f"{tag}-report.json").write_text(json.dumps(report.as_dict(), indent=2))
            reports.append(report)
            where = f"{tag}: instance {sop} (screenshots {artifacts}/{tag}-*.png)"
            assert report.residual_colour_px <= 30, f"{where}: colour remains where the segments are when hidden"
            for n, seg_report in report.segments.items():
                if n not in masks or seg_report.expected_px < 20:  # absent, or lying wholly inside another segment
                    continue
                assert seg_report.coverage >= 0.6, f"{where}: {seg_report.label} is not drawn over it: {seg_report}"
                assert seg_report.outside_px <= max(25, 0.03 * seg_report.inside_px), (
                    f"{where}: {seg_report.label}'s colour appears outside its outline: {seg_report}"
                )
            assert report.stray_px <= max(40, 0.03 * report.overlay_px), (
                f"{where}: overlay where no segment is: {report}"
            )
    return reports


def _slice_tolerance(sources: dict[str, Any], sop: str) -> float:
    ds = sources[sop]
    return float(getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", None) or 1.0)
