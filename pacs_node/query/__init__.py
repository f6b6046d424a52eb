"""The one read layer of the node's faces: the CLI, the JSON API and the dashboard ask here.

Plain functions of a SQLAlchemy session and filters; they return plain
dataclasses (holding the storage rows) and JSON-ready dicts, and change
nothing. Lists are newest first, paged with ``limit``/``offset``, and carry the
``total`` that matched (:class:`~pacs_node.query.base.Page`); what a page
needs about its rows is fetched for the page's ids in a few IN queries, never
per row (the indexes are in :mod:`storage.models`). Operator actions live with
their stage (:mod:`pacs_node.deliver.ledger`, :mod:`pacs_node.process.jobs`).

This package imports only ``pacs_node.config``, ``pacs_node.common``,
``pacs_node.errors`` and ``storage``.
"""

from __future__ import annotations

from pacs_node.query.base import FilterError, Page, like_pattern
from pacs_node.query.deliveries import (
    DeliveryRow,
    delivery_dict,
    delivery_summary,
    get_delivery,
    list_deliveries,
    shown_status,
)
from pacs_node.query.jobs import (
    JobRow,
    job_card_dict,
    job_detail,
    job_dict,
    list_jobs,
    output_png,
    pipelines_seen,
)
from pacs_node.query.overview import Overview, overview
from pacs_node.query.studies import (
    StudyDetail,
    StudyRow,
    list_studies,
    series_by_study,
    study_detail,
    study_detail_dict,
    study_dict,
)

__all__ = [
    "DeliveryRow",
    "FilterError",
    "JobRow",
    "Overview",
    "Page",
    "StudyDetail",
    "StudyRow",
    "delivery_dict",
    "delivery_summary",
    "get_delivery",
    "job_card_dict",
    "job_detail",
    "job_dict",
    "like_pattern",
    "list_deliveries",
    "list_jobs",
    "list_studies",
    "output_png",
    "overview",
    "pipelines_seen",
    "series_by_study",
    "shown_status",
    "study_detail",
    "study_detail_dict",
    "study_dict",
]
