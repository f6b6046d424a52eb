"""The node's dashboard: server-rendered pages under ``/ui/`` (studies, jobs, deliveries, rules, models).

:func:`~pacs_node.web.dashboard.views.routes` are mounted by :func:`pacs_node.web.app.create_app`
when ``http.dashboard`` is on (the default).
"""

from __future__ import annotations

from pacs_node.web.dashboard.views import Dashboard, make_dashboard, routes

__all__ = ["Dashboard", "make_dashboard", "routes"]
