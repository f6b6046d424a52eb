"""/metrics in the Prometheus text exposition format (version 0.0.4).

Several processes write the database (SCP processes, workers, dispatchers), so
the figures come from the database, not from this process's memory: counts by
state, and the stage durations of the last 24 hours as histograms. The
histograms are a sliding window over rows (their counts can fall as rows leave
the window): use ``histogram_quantile()`` on the bucket series directly, not on
``rate()`` of them. Each query is bounded by the window and capped at
:data:`MAX_ROWS` rows.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select

from storage.db import Database
from storage.filestore import FileStore
from storage.models import Delivery, DeliveryState, Job, JobState, Series, SeriesState, utcnow

WINDOW = timedelta(hours=24)
MAX_ROWS = 100_000
BUCKETS: tuple[float, ...] = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


@dataclass
class Histogram:
    """Observations bucketed like a Prometheus histogram."""

    buckets: Sequence[float] = BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        """Add one observation (negative ones, from clock skew between hosts, count as 0)."""
        value = max(0.0, value)
        self.n += 1
        self.total += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class Exposition:
    """Builds the exposition text one metric family at a time."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        """Start a family with its HELP and TYPE lines."""
        self.lines.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        """One sample line."""
        self.lines.append(f"{name}{_labels(labels or {})} {_number(value)}")

    def histogram(self, name: str, hist: Histogram, labels: dict[str, str] | None = None) -> None:
        """The bucket, sum and count samples of one histogram."""
        base = dict(labels or {})
        for bound, count in zip(hist.buckets, hist.counts, strict=True):
            self.sample(f"{name}_bucket", count, {**base, "le": _number(bound)})
        self.sample(f"{name}_bucket", hist.n, {**base, "le": "+Inf"})
        self.sample(f"{name}_sum", hist.total, base)
        self.sample(f"{name}_count", hist.n, base)

    def text(self) -> str:
        """The whole exposition, newline-terminated."""
        return "\n".join(self.lines) + "\n"


class LocalCounters:
    """Counters of this process only (thread-safe): STOW-RS instances by result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.stow_stored = 0
        self.stow_failed = 0

    def add_stow(self, stored: int, failed: int) -> None:
        """Count the parts of one STOW-RS request."""
        with self._lock:
            self.stow_stored += stored
            self.stow_failed += failed


def _durations(rows: Iterable[tuple[datetime | None, datetime | None]]) -> Histogram:
    hist = Histogram()
    for start, end in rows:
        if start is not None and end is not None:
            hist.observe((end - start).total_seconds())
    return hist


def collect(db: Database, store: FileStore, local: LocalCounters, now: datetime | None = None) -> str:
    """The exposition text from the database, the store and this process's counters."""
    now = now or utcnow()
    cutoff = now - WINDOW
    out = Exposition()
    with db.sessions() as session:
        received = session.scalar(select(func.coalesce(func.sum(Series.instance_count), 0))) or 0
        series_states = dict(session.execute(select(Series.state, func.count()).group_by(Series.state)).all())
        job_states = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        delivery_states = dict(session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all())
        receive = _durations(
            session.execute(
                select(Series.first_received_at, Series.completed_at)
                .where(
                    Series.state.in_(list(SeriesState)),
                    Series.last_received_at >= cutoff,
                    Series.completed_at.is_not(None),
                )
                .limit(MAX_ROWS)
            )
        )
        queue_by_pipeline: dict[str, Histogram] = {}
        for created, required, started, pipeline in session.execute(
            select(Job.created_at, Job.required_complete_at, Job.started_at, Job.pipeline)
            .where(Job.started_at >= cutoff)
            .limit(MAX_ROWS)
        ):
            if started is not None:
                hist = queue_by_pipeline.setdefault(pipeline, Histogram())
                hist.observe((started - (required or created)).total_seconds())
        inference_by_pipeline: dict[tuple[str, str], Histogram] = {}
        for started, finished, pipeline, state in session.execute(
            select(Job.started_at, Job.finished_at, Job.pipeline, Job.state)
            .where(Job.finished_at >= cutoff, Job.started_at.is_not(None))
            .limit(MAX_ROWS)
        ):
            if started is not None and finished is not None:
                hist = inference_by_pipeline.setdefault((pipeline, state.value), Histogram())
                hist.observe((finished - started).total_seconds())
        delivery_by_destination: dict[str, Histogram] = {}
        for created, delivered, destination in session.execute(
            select(Delivery.created_at, Delivery.delivered_at, Delivery.destination)
            .where(Delivery.state == DeliveryState.DELIVERED, Delivery.delivered_at >= cutoff)
            .limit(MAX_ROWS)
        ):
            if delivered is not None:
                hist = delivery_by_destination.setdefault(destination, Histogram())
                hist.observe((delivered - created).total_seconds())

    out.family(
        "pacs_node_instances_received_total",
        "counter",
        "Distinct instances received (C-STORE and STOW-RS, all processes), summed over series from the database",
    )
    out.sample("pacs_node_instances_received_total", int(received))
    out.family("pacs_node_stow_instances_total", "counter", "STOW-RS parts handled by this process, by result")
    out.sample("pacs_node_stow_instances_total", local.stow_stored, {"result": "stored"})
    out.sample("pacs_node_stow_instances_total", local.stow_failed, {"result": "failed"})
    out.family("pacs_node_series", "gauge", "Series by state")
    for s_state in SeriesState:
        out.sample("pacs_node_series", series_states.get(s_state, 0), {"state": s_state.value.lower()})
    out.family("pacs_node_jobs", "gauge", "Jobs by state")
    for j_state in JobState:
        out.sample("pacs_node_jobs", job_states.get(j_state, 0), {"state": j_state.value.lower()})
    out.family("pacs_node_deliveries", "gauge", "Deliveries by state")
    for d_state in DeliveryState:
        out.sample("pacs_node_deliveries", delivery_states.get(d_state, 0), {"state": d_state.value})
    out.family(
        "pacs_node_series_receive_seconds",
        "histogram",
        "First instance received to series complete, series active in the last 24 h (sliding window)",
    )
    out.histogram("pacs_node_series_receive_seconds", receive)
    out.family(
        "pacs_node_job_queue_wait_seconds",
        "histogram",
        "Job ready (inputs complete, else created) to started, jobs started in the last 24 h (sliding window)",
    )
    for pipeline, hist in sorted(queue_by_pipeline.items()):
        out.histogram("pacs_node_job_queue_wait_seconds", hist, {"pipeline": pipeline})
    out.family(
        "pacs_node_job_inference_seconds",
        "histogram",
        "Job started to finished, by pipeline and final state, jobs finished in the last 24 h (sliding window)",
    )
    for (pipeline, j_value), hist in sorted(inference_by_pipeline.items()):
        out.histogram("pacs_node_job_inference_seconds", hist, {"pipeline": pipeline, "state": j_value.lower()})
    out.family(
        "pacs_node_delivery_seconds",
        "histogram",
        "Delivery created to delivered, by destination, deliveries of the last 24 h (sliding window)",
    )
    for destination, hist in sorted(delivery_by_destination.items()):
        out.histogram("pacs_node_delivery_seconds", hist, {"destination": destination})
    out.family("pacs_node_store_free_bytes", "gauge", "Free bytes on the file store's filesystem")
    out.sample("pacs_node_store_free_bytes", store.free_bytes())
    out.family("pacs_node_journal_instances", "gauge", "Instances acknowledged but not yet indexed")
    out.sample("pacs_node_journal_instances", len(store.pending()))
    return out.text()
