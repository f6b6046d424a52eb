"""The HTTP side of ``pacs-node serve``: DICOMweb (STOW-RS, QIDO-RS, WADO-RS),
a JSON API, the dashboard (``/ui/``, :mod:`pacs_node.web.dashboard`), OHIF v3 at
``/viewer`` when ``http.viewer_dir`` is set (:mod:`.viewer`), /healthz, /metrics
and /conformance, served by uvicorn.

:class:`~pacs_node.web.server.HttpServer` runs it; :func:`~pacs_node.web.app.create_app`
builds the Starlette application for tests or another ASGI server.
"""

from __future__ import annotations

from pacs_node.web.app import create_app
from pacs_node.web.context import HttpContext
from pacs_node.web.server import HttpServer

__all__ = ["HttpContext", "HttpServer", "create_app"]
