"""The HTTP side of ``pacs-node serve``: DICOMweb (STOW-RS, QIDO-RS, WADO-RS),
a JSON API, the dashboard (``/ui/``, :mod:`pacs_node.dashboard`), OHIF v3 at
``/viewer`` when ``http.viewer_dir`` is set (:mod:`.viewer`), /healthz, /metrics
and /conformance, served by uvicorn.

:class:`~pacs_node.http.server.HttpServer` runs it; :func:`~pacs_node.http.app.create_app`
builds the Starlette application for tests or another ASGI server.
"""

from __future__ import annotations

from pacs_node.http.app import HttpContext, create_app
from pacs_node.http.server import HttpServer

__all__ = ["HttpContext", "HttpServer", "create_app"]
