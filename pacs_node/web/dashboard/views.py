"""The dashboard's pages: server-rendered HTML under ``/ui/``, no front-end build.

Handlers are thin: they read the request, call :mod:`pacs_node.query` (the
read layer the CLI and the JSON API share), the rule engine or the model
packages, and render a Jinja2 template. Every page has a
``content`` block; ``?partial=1`` answers that block alone, which the page's
small script (``static/dashboard.js``) fetches every ``http.dashboard_refresh_s``
seconds to refresh the page in place. Changes go through the JSON API
(``POST /api/deliveries/{id}/retry``); the dashboard itself only reads, except
for its login.

Access is the HTTP side's (:mod:`pacs_node.web.auth`): with a token, pages ask
for it once (``/ui/login``) and keep a session cookie; on the loopback default
without a token they are open to the local user.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import anyio
import yaml
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from pacs_node import __version__, query
from pacs_node.common.header import HeaderError, NotDicomError, header_from_file
from pacs_node.config import Settings
from pacs_node.config.rules import CompiledRules, SeriesDecision, compile_settings
from pacs_node.query.base import MAX_OFFSET, parse_count, parse_id
from pacs_node.web.auth import SESSION_COOKIE, SESSION_MAX_AGE_S, safe_next, session_cookie
from pacs_node.web.conformance import insecure_destinations
from pacs_node.web.context import HttpContext
from pacs_node.web.dashboard.markdown import render_markdown
from pacs_node.web.dicomfile import InflateLimitError, NotDicomFile, check_upload
from storage.errors import InvalidUID
from storage.filestore import validate_uid
from storage.models import DeliveryState, JobState

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
#: largest file the rule tester reads (only its header is used)
MAX_TEST_BYTES = 64 * 2**20
#: how long the rule tester's answer for one file may take
RULE_TEST_TIMEOUT_S = 15.0
#: files the rule tester reads at once (each in a worker thread, off the event loop)
RULE_TEST_SLOTS = 2
#: rows per page of the lists
PAGE_SIZE = 50
#: the last page a list may be asked for (its offset stays within the query layer's MAX_OFFSET)
MAX_PAGE = MAX_OFFSET // PAGE_SIZE
#: on every page: never framed by another site (clickjacking), no content sniffing, not cached
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class DashboardError(Exception):
    """A page that cannot be answered; carries the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ModelInfo:
    """A pipeline's model package as the models page shows it."""

    pipeline: str
    folder: str
    manifest: Any = None
    card_html: Markup | None = None
    error: str | None = None


@dataclass
class Dashboard:
    """What the pages share: the templates, the compiled rules and a cache of model cards."""

    settings: Settings
    env: Environment
    rules: CompiledRules
    _models: dict[str, tuple[float, ModelInfo]] = field(default_factory=dict)
    tester_slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(RULE_TEST_SLOTS)
    )

    def model(self, pipeline: str) -> ModelInfo:
        """The pipeline's model package and card (re-read when model.yaml or MODEL_CARD.md changes)."""
        from inference.errors import ModelPackageError
        from inference.manifest import ModelPackage

        folder = Path(self.settings.pipelines[pipeline].model)
        stamp = max(
            (p.stat().st_mtime for p in (folder / "model.yaml", folder / "MODEL_CARD.md") if p.is_file()),
            default=0.0,
        )
        cached = self._models.get(pipeline)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        info = ModelInfo(pipeline, str(folder))
        try:
            package = ModelPackage(folder)
            info.manifest = package.manifest
            card = package.card
            info.card_html = Markup(render_markdown(card)) if card else None
        except ModelPackageError as exc:
            info.error = str(exc)
        self._models[pipeline] = (stamp, info)
        return info


def _ago(value: datetime | None) -> str:
    if value is None:
        return ""
    seconds = (datetime.now(timezone.utc) - value).total_seconds()
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def _when(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _da(value: str | None) -> str:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or ""


def _pn(value: str | None) -> str:
    return (value or "").replace("^", " ").strip()


def make_env() -> Environment:
    """The Jinja2 environment of the dashboard's templates (autoescaped)."""
    env = Environment(
        loader=PackageLoader("pacs_node.web.dashboard", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ago=_ago, when=_when, seconds=_seconds, number=_number, da=_da, pn=_pn)
    env.globals.update(version=__version__, job_states=[s.value for s in JobState])
    env.globals.update(delivery_states=[s.value for s in DeliveryState])
    return env


def _dash(request: Request) -> Dashboard:
    dash: Dashboard = request.app.state.dashboard
    return dash


def _ctx(request: Request) -> HttpContext:
    ctx: HttpContext = request.app.state.ctx
    return ctx


def viewer_href(settings: Settings, study_uid: str) -> str | None:
    """Where the dashboard's "open in viewer" link for a study goes (None: no viewer configured)."""
    if settings.http.viewer_dir is not None:
        return f"/viewer?StudyInstanceUIDs={study_uid}"
    if settings.http.viewer_url:
        return settings.http.viewer_url.format(study_uid=study_uid)
    return None


def _render(request: Request, template: str, nav: str, status: int = 200, **values: Any) -> HTMLResponse:
    dash = _dash(request)
    ctx = _ctx(request)
    settings = dash.settings
    query = {k: v for k, v in request.query_params.items() if k != "partial"}

    def page_url(page: int) -> str:
        return request.url.path + "?" + urlencode({**query, "page": page})

    values.update(
        nav=nav,
        settings=settings,
        login=ctx.token is not None,
        refresh_s=settings.http.dashboard_refresh_s,
        viewer=lambda uid: viewer_href(settings, uid),
        page_url=page_url,
        query=query,
        path=request.url.path,
    )
    # ?partial=1 (the page's own refresh) answers the content block alone
    values["layout"] = "partial.html" if request.query_params.get("partial") else "base.html"
    body = dash.env.get_template(template).render(values)
    return HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)


def _offset(request: Request) -> int:
    """The first row of the page the ``page`` parameter asks for (from 1; absent or empty is page 1).

    Raises:
        DashboardError: 400 for a page that is not a whole number from 1 to :data:`MAX_PAGE`.
    """
    try:
        number = parse_count(request.query_params.get("page"), "page", default=1, maximum=MAX_PAGE)
    except query.FilterError as exc:
        raise DashboardError(400, str(exc)) from exc
    return (max(1, number) - 1) * PAGE_SIZE


def _row_id(request: Request, what: str) -> int:
    """The ``{id:int}`` of the path.

    Raises:
        DashboardError: 400 for an id beyond the database's range.
    """
    try:
        return parse_id(request.path_params["id"], what)
    except query.FilterError as exc:
        raise DashboardError(400, str(exc)) from exc


def _listed(
    request: Request, session: Session, lister: Callable[..., query.Page[Any]], noun: str, **filters: Any
) -> query.Page[Any]:
    """The page of a list of :mod:`pacs_node.query` that the ``page`` and ``state`` parameters ask for.

    Raises:
        DashboardError: 400 for a state that is not a ``noun`` state.
    """
    state = request.query_params.get("state", "")
    try:
        return lister(session, states=[state] if state else [], limit=PAGE_SIZE, offset=_offset(request), **filters)
    except query.FilterError as exc:
        raise DashboardError(400, f"state {state!r} is not a {noun} state") from exc


# -- pages ----------------------------------------------------------------------------------------------------------


def overview(request: Request) -> Response:
    """Counts by state, the latest jobs with their previews, failed deliveries."""
    ctx = _ctx(request)
    with ctx.db.sessions() as session:
        data = query.overview(session)
        return _render(request, "overview.html", "overview", data=data)


def studies(request: Request) -> Response:
    """The studies list (searchable, paged)."""
    ctx = _ctx(request)
    q = request.query_params.get("q", "")[:128]
    with ctx.db.sessions() as session:
        page = query.list_studies(session, text=q, limit=PAGE_SIZE, offset=_offset(request))
        return _render(request, "studies.html", "studies", page=page, q=q)


def study(request: Request) -> Response:
    """One study: series, jobs with previews, volumes, timings and deliveries."""
    ctx = _ctx(request)
    try:
        uid = validate_uid(request.path_params["uid"], "Study Instance UID")
    except InvalidUID as exc:
        raise DashboardError(400, str(exc)) from exc
    with ctx.db.sessions() as session:
        detail = query.study_detail(session, uid)
        if detail is None:
            raise DashboardError(404, f"no study {uid} on this node")
        return _render(request, "study.html", "studies", detail=detail)


def jobs(request: Request) -> Response:
    """Jobs by state and pipeline (paged)."""
    ctx = _ctx(request)
    state = request.query_params.get("state", "")
    pipeline = request.query_params.get("pipeline", "")[:64]
    with ctx.db.sessions() as session:
        page = _listed(request, session, query.list_jobs, "job", pipeline=pipeline, cards=True)
        pipelines = query.pipelines_seen(session)
        return _render(
            request, "jobs.html", "jobs", page=page, state=state.upper(), pipeline=pipeline, pipelines=pipelines
        )


def job(request: Request) -> Response:
    """One job's card."""
    ctx = _ctx(request)
    with ctx.db.sessions() as session:
        job_id = _row_id(request, "job id")
        row = query.job_detail(session, job_id)
        if row is None:
            raise DashboardError(404, f"no job {job_id}")
        return _render(request, "job.html", "jobs", row=row)


def deliveries(request: Request) -> Response:
    """Deliveries per destination, with retry and cancel buttons."""
    ctx = _ctx(request)
    state = request.query_params.get("state", "")
    destination = request.query_params.get("destination", "")[:64]
    with ctx.db.sessions() as session:
        page = _listed(request, session, query.list_deliveries, "delivery", destination=destination)
        summary = query.delivery_summary(session)
        configured = sorted(_dash(request).settings.destinations)
        return _render(
            request,
            "deliveries.html",
            "deliveries",
            page=page,
            summary=summary,
            configured=configured,
            insecure=insecure_destinations(_dash(request).settings),
            state=state.lower(),
            destination=destination,
        )


def rules(request: Request) -> Response:
    """The routes and pipeline inputs, and the rule tester."""
    settings = _dash(request).settings

    def dump(value: Any) -> str:
        return yaml.safe_dump(value, sort_keys=False, allow_unicode=True).strip() if value else ""

    return _render(request, "rules.html", "rules", dump=dump, routes=settings.routes, pipelines=settings.pipelines)


def _read_header(data: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The rule engine's header of a DICOM file's bytes, or None and why not (what is not DICOM at all, or
    inflates beyond the bound, is refused before pydicom parses it: :func:`pacs_node.web.dicomfile.check_upload`)."""
    try:
        check_upload(data)
    except NotDicomFile:
        return None, "this is not a DICOM file"
    except InflateLimitError as exc:
        return None, f"it was not read: {exc}"
    fd, name = tempfile.mkstemp(prefix="pacs-node-ruletest-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return header_from_file(name), None
    except NotDicomError:
        return None, "this is not a DICOM file"
    except HeaderError as exc:
        return None, f"its DICOM header cannot be read: {exc}"
    finally:
        Path(name).unlink(missing_ok=True)


def _test_file(
    dash: Dashboard, data: bytes, calling: str | None, called: str | None
) -> tuple[dict[str, Any] | None, str | None, SeriesDecision | None] | None:
    """Read a file's header and evaluate the rules on it (in a worker thread); None when
    :data:`RULE_TEST_SLOTS` tests are running already (an abandoned slow one holds its slot until it ends)."""
    if not dash.tester_slots.acquire(blocking=False):
        return None
    try:
        header, problem = _read_header(data)
        decision = dash.rules.evaluate(header, calling_ae=calling, called_ae=called) if header is not None else None
        return header, problem, decision
    finally:
        dash.tester_slots.release()


async def rules_test(request: Request) -> Response:
    """The rule tester: the body is one DICOM file; the answer an HTML fragment saying what the rules decide.

    Only the header is read; nothing is stored. ``calling_ae`` and ``called_ae``
    in the query check the routes' AE conditions. Reading and evaluating run in a
    worker thread, at most :data:`RULE_TEST_SLOTS` at once, and the answer comes
    within :data:`RULE_TEST_TIMEOUT_S` (503 otherwise): the event loop, and so
    every other request, never waits for a file.

    Raises:
        DashboardError: 413 for a file over :data:`MAX_TEST_BYTES`, 400 for none, 503 busy or too slow.
    """
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_TEST_BYTES:
            raise DashboardError(413, f"the rule tester reads files up to {MAX_TEST_BYTES // 2**20} MiB")
    if not body:
        raise DashboardError(400, "no file was sent")
    dash = _dash(request)
    calling = request.query_params.get("calling_ae", "").strip()[:16] or None
    called = request.query_params.get("called_ae", "").strip()[:16] or None
    try:
        with anyio.fail_after(RULE_TEST_TIMEOUT_S):
            tested = await anyio.to_thread.run_sync(
                functools.partial(_test_file, dash, bytes(body), calling, called), abandon_on_cancel=True
            )
    except TimeoutError:
        logger.warning("rule tester: a file took more than %g s; answered 503", RULE_TEST_TIMEOUT_S)
        raise DashboardError(503, f"testing this file took more than {RULE_TEST_TIMEOUT_S:g} s") from None
    if tested is None:
        raise DashboardError(503, "the rule tester is busy with other files; try again in a moment")
    header, problem, decision = tested
    shown = {}
    if header is not None:
        for key in (
            "Modality",
            "SeriesDescription",
            "ProtocolName",
            "ImageType",
            "SeriesNumber",
            "Manufacturer",
            "BodyPartExamined",
            "SOPClassUID",
        ):
            if header.get(key) not in (None, ""):
                shown[key] = header[key]
    values = {
        "filename": request.query_params.get("name", "")[:200],
        "problem": problem,
        "decision": decision,
        "shown": shown,
        "calling": calling,
        "called": called,
        "settings": dash.settings,
    }
    if decision is None:
        outcome = problem or "not tested"
    else:
        outcome = "guarded" if decision.guard else f"{len(decision.matches)} routes match"
    logger.info("rule tester: %s", outcome)
    return HTMLResponse(dash.env.get_template("rule_result.html").render(values), headers=PAGE_HEADERS)


def models(request: Request) -> Response:
    """Each pipeline's model package: labels, colours, inputs and its model card."""
    dash = _dash(request)
    infos = [dash.model(name) for name in dash.settings.pipelines]
    return _render(request, "models.html", "models", models=infos)


def preview(request: Request) -> Response:
    """The key-image PNG of an output (relative to the data folder, never outside it)."""
    ctx = _ctx(request)
    with ctx.db.sessions() as session:
        rel = query.output_png(session, _row_id(request, "output id"))
    if rel is None:
        raise DashboardError(404, "this output has no preview")
    root = ctx.settings.data_dir.resolve()
    path = (root / rel).resolve()
    if root not in path.parents or not path.is_file():
        raise DashboardError(404, "the preview file is gone (purged?)")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, no-cache"})


# -- login --------------------------------------------------------------------------------------------------------


def login_form(request: Request) -> Response:
    """The token form (only when a token is configured)."""
    ctx = _ctx(request)
    if ctx.token is None:
        return RedirectResponse(safe_next(request.query_params.get("next")), 303)
    return _login_page(request, safe_next(request.query_params.get("next")), None)


def _login_page(request: Request, target: str, error: str | None, status: int = 200) -> Response:
    dash = _dash(request)
    body = dash.env.get_template("login.html").render(
        layout="base.html", target=target, error=error, settings=dash.settings, login=True, nav="", refresh_s=0
    )
    return HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)


async def login(request: Request) -> Response:
    """Check the token (form field ``token``) and set the session cookie."""
    ctx = _ctx(request)
    raw = await request.body()
    form = parse_qs(raw[:8192].decode("utf-8", "replace"))
    target = safe_next((form.get("next") or [""])[0])
    if ctx.token is None:
        return RedirectResponse(target, 303)
    given = (form.get("token") or [""])[0].strip()
    if not hmac.compare_digest(given.encode("utf-8"), ctx.token.encode("utf-8")):
        client = request.client.host if request.client else "?"
        logger.warning("dashboard login from %s refused: wrong token", client)
        await anyio.sleep(0.5)  # keep guessing slow
        return _login_page(request, target, "That is not the node's token.", status=401)
    response = RedirectResponse(target, 303)
    secure = request.url.scheme == "https" or (ctx.settings.http.public_url or "").startswith("https://")
    response.set_cookie(
        SESSION_COOKIE,
        ctx.sessions.open(),
        max_age=SESSION_MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=secure,
        path="/",
    )
    logger.info("dashboard login from %s", request.client.host if request.client else "?")
    return response


def logout(request: Request) -> Response:
    """End the session on the server (a copy of its cookie is refused from now on) and drop the cookie."""
    if _ctx(request).sessions.close(session_cookie(request.headers.get("cookie"))):
        logger.info("dashboard logout from %s", request.client.host if request.client else "?")
    response = RedirectResponse("/ui/login", 303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def _error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DashboardError)
    dash = _dash(request)
    body = dash.env.get_template("error.html").render(
        layout="base.html",
        status=exc.status,
        message=str(exc),
        settings=dash.settings,
        login=_ctx(request).token is not None,
        nav="-",
        refresh_s=0,
    )
    return HTMLResponse(body, status_code=exc.status, headers=PAGE_HEADERS)


def routes() -> list[BaseRoute]:
    """The dashboard's routes (mounted at ``/ui``)."""
    return [
        Route("/", overview, methods=["GET"]),
        Route("/studies", studies, methods=["GET"]),
        Route("/studies/{uid}", study, methods=["GET"]),
        Route("/jobs", jobs, methods=["GET"]),
        Route("/jobs/{id:int}", job, methods=["GET"]),
        Route("/deliveries", deliveries, methods=["GET"]),
        Route("/rules", rules, methods=["GET"]),
        Route("/rules/test", rules_test, methods=["POST"]),
        Route("/models", models, methods=["GET"]),
        Route("/outputs/{id:int}/preview.png", preview, methods=["GET"]),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]


def exception_handlers() -> dict[Any, Any]:
    """Error pages for :class:`DashboardError`."""
    return {DashboardError: _error}


def make_dashboard(settings: Settings) -> Dashboard:
    """The dashboard's shared state for ``settings``.

    Raises:
        RuleError: the settings' rules do not compile (they did when the settings loaded).
    """
    return Dashboard(settings=settings, env=make_env(), rules=compile_settings(settings))
