"""The Starlette application: DICOMweb under ``/dicom-web``, the JSON API under
``/api``, ``/healthz``, ``/metrics`` and ``/conformance``.

Handlers are thin adapters over plain functions (:mod:`.qido`, :mod:`.stow`,
:mod:`.pixels`, :mod:`.api`, :mod:`.metrics`). Database work runs in
Starlette's thread pool (plain ``def`` endpoints and synchronous body
iterators); only STOW-RS is ``async``, to read the body as it arrives.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import select, text
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route

from pacs_node import __version__
from pacs_node.errors import ConfigError
from pacs_node.process.jobs import rerun
from pacs_node.web import api, dashboard
from pacs_node.web.auth import LOOPBACK_ORIGIN_REGEX, AccessMiddleware
from pacs_node.web.catalog import StoredInstance, find_instances
from pacs_node.web.conformance import conformance_statement
from pacs_node.web.context import DICOMWEB, HttpContext
from pacs_node.web.dicomfile import HEAD_BYTES, NotDicomFile, read_file_meta
from pacs_node.web.media import (
    DICOM_JSON,
    EXPLICIT_LE,
    NATIVE_SYNTAXES,
    NotAcceptable,
    accepts_json,
    negotiate_dicom,
    negotiate_frames,
)
from pacs_node.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pacs_node.web.metrics import collect
from pacs_node.web.multipart import closing, multipart_content_type, new_boundary, part_header
from pacs_node.web.pixels import (
    PIXEL_DATA,
    FrameError,
    all_decoded_pixels,
    all_encapsulated_frames,
    bulk_value,
    decoded_frames,
    encapsulated_frames,
    frame_count,
    native_frames,
    pixel_syntax,
    transcode_to_explicit_le,
)
from pacs_node.web.qido import QueryError, parse_query
from pacs_node.web.stow import StowReceiver, StowRequestError, check_content_type
from pacs_node.web.viewer import ViewerFiles, ViewerNotFound, viewer_endpoint
from storage.db import Database
from storage.errors import InvalidUID, StorageError
from storage.filestore import FileStore, validate_uid
from storage.models import Series, Study

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
HEALTH_TIMEOUT_S = 5.0


def _ctx(request: Request) -> HttpContext:
    ctx: HttpContext = request.app.state.ctx
    return ctx


class HttpError(Exception):
    """An error answer with a status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _warning_value(text: str) -> str:
    clean = text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")
    return '299 pacs-node "' + clean.encode("latin-1", "replace").decode("latin-1")[:900] + '"'


def _dicom_json(body: Any, status: int = 200, warnings: list[str] | tuple[str, ...] = ()) -> Response:
    resp = Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
        status_code=status,
        media_type=DICOM_JSON,
    )
    for w in warnings:
        resp.headers.append("Warning", _warning_value(w))
    return resp


def _uid(request: Request, name: str, what: str) -> str | None:
    value = request.path_params.get(name)
    if value is None:
        return None
    try:
        return validate_uid(value, what)
    except InvalidUID as exc:
        raise HttpError(400, str(exc)) from exc


def _locate(request: Request) -> tuple[HttpContext, list[StoredInstance]]:
    ctx = _ctx(request)
    study = _uid(request, "study", "Study Instance UID")
    series = _uid(request, "series", "Series Instance UID")
    sop = _uid(request, "instance", "SOP Instance UID")
    assert study is not None
    with ctx.db.sessions() as session:
        items = find_instances(session, study, series, sop)
    if not items:
        what = f"instance {sop}" if sop else f"series {series}" if series else f"study {study}"
        raise HttpError(404, f"{what} is not held by this node")
    return ctx, items


def _file_syntax(path: Path) -> str | None:
    """The Transfer Syntax UID in the file's meta information (read alone: a deflated data set is not inflated)."""
    try:
        with open(path, "rb") as fh:
            return read_file_meta(fh.read(HEAD_BYTES)).transfer_syntax
    except (OSError, NotDicomFile):  # unreadable: treated as not sendable
        return None


# -- DICOMweb: QIDO-RS ------------------------------------------------------------------------------------------------


def _qido(level: str) -> Callable[[Request], Response]:
    def endpoint(request: Request) -> Response:
        if not accepts_json(request.headers.get("accept")):
            raise HttpError(406, "QIDO-RS answers only application/dicom+json")
        ctx = _ctx(request)
        query = parse_query(
            level,
            request.query_params.multi_items(),
            study_uid=_uid(request, "study", "Study Instance UID"),
            series_uid=_uid(request, "series", "Series Instance UID"),
        )
        result = ctx.qido.search(query, ctx.dicomweb_root(request))
        logger.debug("QIDO-RS %s: %d results for %s", level, len(result.items), dict(query.match))
        return _dicom_json(result.items, warnings=result.warnings)

    return endpoint


# -- DICOMweb: STOW-RS ------------------------------------------------------------------------------------------------


async def stow(request: Request) -> Response:
    """Store instances (multipart/related; type="application/dicom")."""
    if not accepts_json(request.headers.get("accept")):
        raise HttpError(406, "STOW-RS answers only application/dicom+json")
    ctx = _ctx(request)
    study = _uid(request, "study", "Study Instance UID")
    try:
        boundary = check_content_type(request.headers.get("content-type"))
    except StowRequestError as exc:
        raise HttpError(exc.status, str(exc)) from exc
    address = request.client.host if request.client else None
    receiver = StowReceiver(ctx.ingestor, study, address)
    outcome = await receiver.run(boundary, request.stream())
    ctx.counters.add_stow(len(outcome.stored), len(outcome.failed))
    if not outcome.parts:
        raise HttpError(400, outcome.body_error or "the request body holds no parts")
    logger.info(
        "STOW-RS from %s: %d instances stored, %d refused%s",
        address,
        len(outcome.stored),
        len(outcome.failed),
        f" (study {study})" if study else "",
    )
    return _dicom_json(outcome.response(ctx.dicomweb_root(request), study), outcome.http_status, outcome.warnings())


# -- DICOMweb: WADO-RS ------------------------------------------------------------------------------------------------


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def retrieve(request: Request) -> Response:
    """Whole instances of a study, series or one instance."""
    single_ok = "instance" in request.path_params
    try:
        choice = negotiate_dicom(request.headers.get("accept"), single_ok=single_ok)
    except NotAcceptable as exc:
        raise HttpError(406, str(exc)) from exc
    ctx, items = _locate(request)
    known = [i.transfer_syntax_uid for i in items if i.transfer_syntax_uid is not None]
    if known and len(known) == len(items) and all(choice.send_as(ts) is None for ts in known):
        raise HttpError(
            406,
            f"the instances are stored in {', '.join(sorted(set(known)))}; ask for transfer-syntax=* or {EXPLICIT_LE}",
        )
    root = ctx.dicomweb_root(request)

    def encoded(item: StoredInstance) -> tuple[str, Iterator[bytes]] | None:
        path = ctx.store.path(item.path)
        stored = item.transfer_syntax_uid or _file_syntax(path)
        target = choice.send_as(stored)
        if target is None:
            logger.warning("WADO-RS: instance %s (%s) not sent: not acceptable to the client", item.sop_uid, stored)
            return None
        if target == stored:
            if not path.exists():
                logger.warning("WADO-RS: file of instance %s is gone (purged?); not sent", item.sop_uid)
                return None
            return target, _file_chunks(path)
        try:
            return target, iter([transcode_to_explicit_le(path)])
        except (FrameError, OSError) as exc:
            logger.warning("WADO-RS: instance %s not sent: %s", item.sop_uid, exc)
            return None

    if not choice.multipart:
        got = encoded(items[0])
        if got is None:
            raise HttpError(404, f"instance {items[0].sop_uid} cannot be sent")
        ts, chunks = got
        return StreamingResponse(chunks, media_type=f"application/dicom; transfer-syntax={ts}")

    boundary = new_boundary()

    def body() -> Iterator[bytes]:
        first = True
        for item in items:
            got = encoded(item)
            if got is None:
                continue
            ts, chunks = got
            location = f"{root}/studies/{item.study_uid}/series/{item.series_uid}/instances/{item.sop_uid}"
            yield part_header(boundary, f"application/dicom; transfer-syntax={ts}", location=location, first=first)
            first = False
            yield from chunks
        yield closing(boundary)

    return StreamingResponse(body(), media_type=multipart_content_type(boundary, "application/dicom"))


def metadata(request: Request) -> Response:
    """DICOM JSON of every instance of a study, series or one instance (bulk data as BulkDataURI)."""
    if not accepts_json(request.headers.get("accept")):
        raise HttpError(406, "metadata is answered only as application/dicom+json")
    ctx, items = _locate(request)
    root = ctx.dicomweb_root(request)

    def body() -> Iterator[bytes]:
        yield b"["
        first = True
        for item in items:
            base = f"{root}/studies/{item.study_uid}/series/{item.series_uid}/instances/{item.sop_uid}"
            try:
                data = ctx.cache.get(ctx.store.path(item.path), base)
            except (OSError, ValueError, StorageError) as exc:
                logger.warning("metadata: instance %s left out: %s", item.sop_uid, exc)
                continue
            yield data if first else b"," + data
            first = False
        yield b"]"

    return StreamingResponse(body(), media_type=DICOM_JSON)


def _frame_numbers(text_value: str) -> list[int]:
    try:
        numbers = [int(x) for x in text_value.split(",") if x.strip()]
    except ValueError as exc:
        raise HttpError(400, f"frame list {text_value!r}: comma-separated frame numbers from 1") from exc
    if not numbers or any(n < 1 for n in numbers):
        raise HttpError(400, f"frame list {text_value!r}: comma-separated frame numbers from 1")
    return numbers


def _pixel_path(request: Request) -> tuple[Path, str]:
    ctx, items = _locate(request)
    path = ctx.store.path(items[0].path)
    try:
        return path, pixel_syntax(path)
    except OSError as exc:
        raise HttpError(404, f"the file of instance {items[0].sop_uid} is gone (purged?)") from exc


def _multipart_parts(parts: Iterator[tuple[str, bytes]], part_type: str) -> StreamingResponse:
    boundary = new_boundary()

    def body() -> Iterator[bytes]:
        first = True
        for content_type, data in parts:
            yield part_header(boundary, content_type, first=first)
            first = False
            yield data
        yield closing(boundary)

    return StreamingResponse(body(), media_type=multipart_content_type(boundary, part_type))


def frames(request: Request) -> Response:
    """Frames of one instance (PS3.18 10.4.1.1.5)."""
    numbers = _frame_numbers(request.path_params["frames"])
    path, stored = _pixel_path(request)
    try:
        choice = negotiate_frames(request.headers.get("accept"), stored)
    except NotAcceptable as exc:
        raise HttpError(406, str(exc)) from exc
    available = frame_count(path)
    bad = [n for n in numbers if n > available]
    if bad:
        raise HttpError(404, f"frame {bad[0]} does not exist: the instance has {available} frame(s)")
    if stored in NATIVE_SYNTAXES:
        source = native_frames(path, numbers)
    elif choice.original:
        source = encapsulated_frames(path, numbers)
    else:
        source = decoded_frames(path, numbers)
    part_type = choice.content_type.split(";")[0]
    return _multipart_parts(((choice.content_type, data) for data in source), part_type)


def bulk(request: Request) -> Response:
    """A top-level bulk data element of one instance, as named by a BulkDataURI."""
    try:
        tag = int(request.path_params["tag"], 16)
    except ValueError as exc:
        raise HttpError(400, "bulk data is addressed by an 8-digit hexadecimal tag") from exc
    ctx, items = _locate(request)
    path = ctx.store.path(items[0].path)
    if tag != PIXEL_DATA:
        try:
            value = bulk_value(path, tag)
        except OSError as exc:
            raise HttpError(404, f"the file of instance {items[0].sop_uid} is gone (purged?)") from exc
        return _multipart_parts(iter([("application/octet-stream", value)]), "application/octet-stream")
    _path, stored = _pixel_path(request)
    try:
        choice = negotiate_frames(request.headers.get("accept"), stored)
    except NotAcceptable as exc:
        raise HttpError(406, str(exc)) from exc
    if stored not in NATIVE_SYNTAXES and choice.original:
        return _multipart_parts(
            ((choice.content_type, data) for data in all_encapsulated_frames(path)), choice.content_type.split(";")[0]
        )
    return _multipart_parts(iter([(choice.content_type, all_decoded_pixels(path))]), "application/octet-stream")


# -- health, metrics, conformance -------------------------------------------------------------------------------------


def _db_ping(db: Database) -> float:
    start = time.monotonic()
    with db.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return (time.monotonic() - start) * 1000


def _store_write(store: FileStore) -> None:
    probe = store.incoming_dir / f".healthz-{os.getpid()}-{time.monotonic_ns()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        probe.unlink(missing_ok=True)


async def healthz(request: Request) -> Response:
    """Database reachable, store writable, free space above the watermark (no PHI; open without a token)."""
    ctx = _ctx(request)
    checks: dict[str, dict[str, Any]] = {}
    with anyio.move_on_after(HEALTH_TIMEOUT_S) as scope:
        try:
            latency = await anyio.to_thread.run_sync(_db_ping, ctx.db, abandon_on_cancel=True)
            checks["database"] = {"ok": True, "latency_ms": round(latency, 1)}
        except Exception as exc:  # any driver error means unreachable
            checks["database"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    if scope.cancelled_caught:
        checks["database"] = {"ok": False, "error": f"no answer within {HEALTH_TIMEOUT_S:g} s"}
    with anyio.move_on_after(HEALTH_TIMEOUT_S) as scope:
        try:
            await anyio.to_thread.run_sync(_store_write, ctx.store, abandon_on_cancel=True)
            checks["store"] = {"ok": True}
        except OSError as exc:
            checks["store"] = {"ok": False, "error": f"cannot write in the store: {exc.strerror}"}
    if scope.cancelled_caught:
        checks["store"] = {"ok": False, "error": f"a write did not finish within {HEALTH_TIMEOUT_S:g} s"}
    free = ctx.store.free_bytes()
    low = free < ctx.store.min_free_bytes
    checks["free_space"] = {
        "ok": not low,
        "free_bytes": free,
        "min_free_bytes": ctx.store.min_free_bytes,
    }
    if low:
        checks["free_space"]["error"] = "below storage.min_free_mb: new instances are refused"
    ok = all(c["ok"] for c in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "failing", "version": __version__, "checks": checks},
        status_code=200 if ok else 503,
    )


def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    ctx = _ctx(request)
    return Response(collect(ctx.db, ctx.store, ctx.counters), media_type=METRICS_CONTENT_TYPE)


def conformance(request: Request) -> Response:
    """The DICOM conformance statement of this configuration (Markdown)."""
    ctx = _ctx(request)
    text_value = conformance_statement(ctx.settings, http_url=ctx.base_url(request))
    return Response(text_value, media_type="text/markdown; charset=utf-8")


# -- JSON API ---------------------------------------------------------------------------------------------------------


def _params(request: Request) -> dict[str, str]:
    return dict(request.query_params.items())


def _row_id(request: Request, what: str) -> int:
    """The ``{id:int}`` of the path (any number of digits: ids beyond the SQL range are 400s, not 500s)."""
    return api.row_id(request.path_params["id"], what)


def api_studies(request: Request) -> Response:
    ctx = _ctx(request)
    with ctx.db.sessions() as session:
        return JSONResponse(api.list_studies(session, _params(request)))


def api_study(request: Request) -> Response:
    ctx = _ctx(request)
    uid = _uid(request, "study", "Study Instance UID")
    assert uid is not None
    with ctx.db.sessions() as session:
        return JSONResponse(api.study_detail(session, uid))


def _rerun(request: Request, kind: str) -> Response:
    ctx = _ctx(request)
    uid = _uid(request, kind, "Study Instance UID" if kind == "study" else "Series Instance UID")
    model: Any = Study if kind == "study" else Series
    column = model.study_uid if kind == "study" else model.series_uid
    with ctx.db.sessions() as session:
        if session.scalar(select(model.id).where(column == uid)) is None:
            raise HttpError(404, f"no {kind} {uid}")
    actions = rerun(ctx.db, study_uid=uid) if kind == "study" else rerun(ctx.db, series_uid=uid)
    logger.info("re-run of %s %s requested over HTTP: %s", kind, uid, "; ".join(actions) or "nothing to do")
    return JSONResponse({"actions": actions})


def api_study_rerun(request: Request) -> Response:
    return _rerun(request, "study")


def api_series_rerun(request: Request) -> Response:
    return _rerun(request, "series")


def api_jobs(request: Request) -> Response:
    ctx = _ctx(request)
    with ctx.db.sessions() as session:
        return JSONResponse(api.list_jobs(session, _params(request)))


def api_job(request: Request) -> Response:
    ctx = _ctx(request)
    with ctx.db.sessions() as session:
        return JSONResponse(api.job_detail(session, _row_id(request, "job id")))


def api_job_cancel(request: Request) -> Response:
    ctx = _ctx(request)
    with ctx.db.session() as session:
        return JSONResponse(api.cancel_job(session, _row_id(request, "job id")))


def api_deliveries(request: Request) -> Response:
    ctx = _ctx(request)
    with ctx.db.sessions() as session:
        return JSONResponse(api.list_deliveries_page(session, _params(request)))


def api_delivery(request: Request) -> Response:
    ctx = _ctx(request)
    with ctx.db.sessions() as session:
        return JSONResponse(api.delivery_detail(session, _row_id(request, "delivery id")))


def _delivery_action(action: str) -> Callable[[Request], Response]:
    def endpoint(request: Request) -> Response:
        ctx = _ctx(request)
        with ctx.db.session() as session:
            result = api.act_on_delivery(session, _row_id(request, "delivery id"), action)
        return JSONResponse(result)

    return endpoint


# -- assembly ---------------------------------------------------------------------------------------------------------


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return _error(exc.status, str(exc))


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, api.ApiError)
    return _error(exc.status, str(exc))


async def _query_error(request: Request, exc: Exception) -> Response:
    return _error(400, str(exc))


async def _frame_error(request: Request, exc: Exception) -> Response:
    return _error(404, str(exc))


def _dicomweb_routes() -> list[Route]:
    study = "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    return [
        Route("/studies", _qido("study"), methods=["GET"]),
        Route("/studies", stow, methods=["POST"]),
        Route("/series", _qido("series"), methods=["GET"]),
        Route("/instances", _qido("instance"), methods=["GET"]),
        Route(study, retrieve, methods=["GET"]),
        Route(study, stow, methods=["POST"]),
        Route(study + "/metadata", metadata, methods=["GET"]),
        Route(study + "/series", _qido("series"), methods=["GET"]),
        Route(study + "/instances", _qido("instance"), methods=["GET"]),
        Route(series, retrieve, methods=["GET"]),
        Route(series + "/metadata", metadata, methods=["GET"]),
        Route(series + "/instances", _qido("instance"), methods=["GET"]),
        Route(instance, retrieve, methods=["GET"]),
        Route(instance + "/metadata", metadata, methods=["GET"]),
        Route(instance + "/frames/{frames}", frames, methods=["GET"]),
        Route(instance + "/bulk/{tag}", bulk, methods=["GET"]),
    ]


def _api_routes() -> list[Route]:
    return [
        Route("/studies", api_studies, methods=["GET"]),
        Route("/studies/{study}", api_study, methods=["GET"]),
        Route("/studies/{study}/rerun", api_study_rerun, methods=["POST"]),
        Route("/series/{series}/rerun", api_series_rerun, methods=["POST"]),
        Route("/jobs", api_jobs, methods=["GET"]),
        Route("/jobs/{id:int}", api_job, methods=["GET"]),
        Route("/jobs/{id:int}/cancel", api_job_cancel, methods=["POST"]),
        Route("/deliveries", api_deliveries, methods=["GET"]),
        Route("/deliveries/{id:int}", api_delivery, methods=["GET"]),
        Route("/deliveries/{id:int}/retry", _delivery_action("retry"), methods=["POST"]),
        Route("/deliveries/{id:int}/cancel", _delivery_action("cancel"), methods=["POST"]),
    ]


def create_app(ctx: HttpContext) -> Starlette:
    """The application for ``ctx`` (its token, if any, guards every route but /healthz).

    Raises:
        ConfigError: ``http.viewer_dir`` holds no OHIF build.
    """
    http = ctx.settings.http
    files = None
    if http.viewer_dir is not None:
        try:
            files = ViewerFiles(http.viewer_dir)
        except ViewerNotFound as exc:
            raise ConfigError(str(exc)) from exc
    cors: dict[str, Any] = {
        "allow_methods": ["GET", "POST", "OPTIONS"],
        "allow_headers": ["Authorization", "Content-Type", "Accept"],
        "expose_headers": ["Content-Type", "Content-Location", "Warning", "WWW-Authenticate", "Server-Timing"],
        "max_age": 600,
    }
    if ctx.token is not None or http.allow_remote_without_token:
        cors["allow_origins"] = ["*"]
    else:
        cors["allow_origin_regex"] = LOOPBACK_ORIGIN_REGEX
    routes: list[BaseRoute] = [
        Mount(DICOMWEB, routes=_dicomweb_routes()),
        Mount("/api", routes=_api_routes()),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/conformance", conformance, methods=["GET"]),
    ]
    handlers: dict[Any, Any] = {
        HttpError: _http_error,
        api.ApiError: _api_error,
        QueryError: _query_error,
        FrameError: _frame_error,
    }
    dash = None
    if http.dashboard:
        dash = dashboard.make_dashboard(ctx.settings)
        routes += [Route("/", _to_dashboard, methods=["GET"]), Mount("/ui", routes=dashboard.routes())]
        handlers.update(dashboard.views.exception_handlers())
    # last: OHIF's files and routes (/viewer?StudyInstanceUIDs=...), see pacs_node.web.viewer
    routes.append(Route("/{path:path}", viewer_endpoint(files), methods=["GET"]))
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(ServerTiming),
            Middleware(CORSMiddleware, **cors),
            Middleware(AccessMiddleware, token=ctx.token, http=http, sessions=ctx.sessions),
        ],
        exception_handlers=handlers,
    )
    app.state.ctx = ctx
    app.state.dashboard = dash
    return app


class ServerTiming:
    """ASGI middleware: ``Server-Timing: app;dur=<ms>`` on every answer, the time until its headers went out
    (a browser's developer tools show it; ``benchmarks/dashboard.py`` reads it)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed(message: Any) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - start) * 1000
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"server-timing", f"app;dur={ms:.1f}".encode())],
                }
            await send(message)

        await self.app(scope, receive, timed)


def _to_dashboard(request: Request) -> Response:
    return RedirectResponse("/ui/", 303)
