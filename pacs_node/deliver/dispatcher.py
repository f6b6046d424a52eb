"""The dispatcher: sends stored results to their destinations and keeps score.

Rows, not calls: :func:`pacs_node.common.destinations.create_deliveries` adds
one ``Delivery`` per output and destination when a job's outputs are stored;
the :class:`Dispatcher` loop

1. returns deliveries whose lease expired (a dispatcher that crashed or hung)
   to PENDING, and renews the leases of its own,
2. claims due PENDING deliveries of one destination atomically (``FOR UPDATE
   SKIP LOCKED`` on PostgreSQL; a conditional UPDATE that only one process wins
   on both databases), up to ``dispatch.batch_size``,
3. hands each batch to the destination's sender, which sends it over ONE
   association (C-STORE) or ONE STOW-RS request, checking every returned status, and
4. records each delivery's outcome: delivered (success or warning), retried
   after an exponential backoff with full jitter (transient), or failed for
   good (dead letter) with the reason.

Outputs carry deterministic SOP Instance UIDs, so a re-send after a crash or an
operator's retry replaces the destination's copy instead of adding another.

This module is the loop only. Outcomes, status classification, backoff and the
:class:`~pacs_node.deliver.base.Sender` interface are in
:mod:`pacs_node.deliver.base`; the protocols in :mod:`pacs_node.deliver.dimse`
and :mod:`pacs_node.deliver.dicomweb`; the ``type`` -> sender registry in
:mod:`pacs_node.deliver.senders`; operators' retry and cancel in
:mod:`pacs_node.deliver.ledger`.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_node.common.dicomnet import client_ssl_context
from pacs_node.config import RETURN_TO_SENDER, DimseDestination, DispatchSettings, ReturnToSender, Settings
from pacs_node.deliver.base import Item, Outcome, SendOptions, Target, backoff_delay, permanent, transient
from pacs_node.deliver.senders import target_for
from pacs_node.errors import ConfigError
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Delivery, DeliveryState, Job, Output, Series, utcnow

logger = logging.getLogger(__name__)


# -- claiming, recording ------------------------------------------------------------------------------------------


def _due(now: datetime) -> Any:
    return (Delivery.state == DeliveryState.PENDING) & (
        Delivery.next_attempt_at.is_(None) | (Delivery.next_attempt_at <= now)
    )


def due_destinations(db: Database, now: datetime | None = None) -> list[str]:
    """Destinations with at least one due PENDING delivery."""
    now = now or utcnow()
    with db.session() as session:
        return sorted(session.scalars(select(Delivery.destination).where(_due(now)).distinct()))


def claim(
    db: Database, destination: str, worker_id: str, *, limit: int, lease_s: float, now: datetime | None = None
) -> list[int]:
    """Move up to ``limit`` due PENDING deliveries of ``destination`` to IN_PROGRESS for ``worker_id``.

    Oldest first. Safe with several dispatchers on SQLite or PostgreSQL: rows
    locked by another claimer are skipped (PostgreSQL), and the conditional
    UPDATE re-checks the state, so a row is claimed by one dispatcher only.
    Each claim counts as an attempt.
    """
    now = now or utcnow()
    with db.session() as session:
        ids = list(
            session.scalars(
                select(Delivery.id)
                .where(_due(now), Delivery.destination == destination)
                .order_by(Delivery.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        if not ids:
            return []
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids), Delivery.state == DeliveryState.PENDING)
            .values(
                state=DeliveryState.IN_PROGRESS,
                worker_id=worker_id,
                lease_until=now + timedelta(seconds=lease_s),
                started_at=now,
                attempts=Delivery.attempts + 1,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        return list(
            session.scalars(
                select(Delivery.id)
                .where(
                    Delivery.id.in_(ids),
                    Delivery.state == DeliveryState.IN_PROGRESS,
                    Delivery.worker_id == worker_id,
                    Delivery.started_at == now,
                )
                .order_by(Delivery.id)
            )
        )


def reap_expired_leases(db: Database, settings: DispatchSettings, now: datetime | None = None) -> int:
    """IN_PROGRESS deliveries whose lease expired go back to PENDING (or fail past ``max_attempts``).

    A dispatcher renews its leases every poll; an expired lease means it
    crashed, hung or lost the database. Returns the number of rows changed.
    """
    now = now or utcnow()
    n = 0
    with db.session() as session:
        rows = session.scalars(
            select(Delivery)
            .where(Delivery.state == DeliveryState.IN_PROGRESS, Delivery.lease_until < now)
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            owner = row.worker_id
            row.worker_id = None
            row.lease_until = None
            row.updated_at = now
            if row.attempts >= settings.max_attempts:
                row.state = DeliveryState.FAILED
                row.next_attempt_at = None
                row.last_error = (
                    f"its dispatcher ({owner}) stopped during attempt {row.attempts}; "
                    "not retried again (dispatch.max_attempts)"
                )
                logger.warning("delivery %d to %s FAILED: %s", row.id, row.destination, row.last_error)
            else:
                row.state = DeliveryState.PENDING
                row.next_attempt_at = now
                row.last_error = f"lease of dispatcher {owner} expired during attempt {row.attempts}; re-queued"
                logger.warning("delivery %d to %s re-queued: %s", row.id, row.destination, row.last_error)
            n += 1
    return n


def renew_leases(db: Database, worker_id: str, lease_s: float, now: datetime | None = None) -> int:
    """Extend the leases of every delivery ``worker_id`` holds; returns how many."""
    now = now or utcnow()
    with db.session() as session:
        result = session.execute(
            update(Delivery)
            .where(Delivery.state == DeliveryState.IN_PROGRESS, Delivery.worker_id == worker_id)
            .values(lease_until=now + timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def release(db: Database, worker_id: str) -> int:
    """Return every delivery ``worker_id`` holds to PENDING, due now, the attempt not counted."""
    now = utcnow()
    with db.session() as session:
        result = session.execute(
            update(Delivery)
            .where(Delivery.state == DeliveryState.IN_PROGRESS, Delivery.worker_id == worker_id)
            .values(
                state=DeliveryState.PENDING,
                worker_id=None,
                lease_until=None,
                next_attempt_at=now,
                attempts=Delivery.attempts - 1,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def record(
    db: Database,
    outcomes: dict[int, Outcome],
    worker_id: str,
    settings: DispatchSettings,
    *,
    label: str = "",
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> dict[int, DeliveryState]:
    """Write the outcomes of one batch; returns each delivery's new state.

    Only rows still held by ``worker_id`` change (a lease that expired and was
    reclaimed by another dispatcher is left to it).
    """
    now = now or utcnow()
    states: dict[int, DeliveryState] = {}
    if not outcomes:
        return states
    with db.session() as session:
        rows = session.scalars(
            select(Delivery)
            .where(
                Delivery.id.in_(list(outcomes)),
                Delivery.state == DeliveryState.IN_PROGRESS,
                Delivery.worker_id == worker_id,
            )
            .with_for_update()
        ).all()
        held = {row.id for row in rows}
        fraction = (rng or random).random()  # one draw per batch: its deliveries are retried together
        for lost in sorted(set(outcomes) - held):
            logger.warning("delivery %d: outcome not recorded, its lease was taken over (%s)", lost, outcomes[lost])
        for row in rows:
            oc = outcomes[row.id]
            _apply(row, oc, settings, now, fraction)
            states[row.id] = row.state
            if oc.peer_text:
                logger.debug("delivery %d: %s said: %s", row.id, label or row.destination, oc.peer_text)
            if row.state is DeliveryState.DELIVERED and oc.message:
                logger.warning("delivery %d to %s delivered, %s", row.id, label or row.destination, oc.message)
            elif row.state is DeliveryState.FAILED:
                logger.warning("delivery %d to %s FAILED: %s", row.id, label or row.destination, verdict_of(row, oc))
            elif row.state is DeliveryState.PENDING and oc.attempted:
                logger.info(
                    "delivery %d to %s attempt %d failed (%s): %s; next attempt at %s",
                    row.id,
                    label or row.destination,
                    row.attempts,
                    "permanent" if oc.permanent else "transient",
                    oc.message,
                    row.next_attempt_at.isoformat(timespec="seconds") if row.next_attempt_at else "?",
                )
    return states


def _apply(row: Delivery, oc: Outcome, settings: DispatchSettings, now: datetime, fraction: float) -> None:
    row.worker_id = None
    row.lease_until = None
    row.updated_at = now
    if not oc.attempted:
        row.state = DeliveryState.PENDING
        row.attempts = max(0, row.attempts - 1)
        row.next_attempt_at = now
        return
    row.last_status = oc.status
    row.permanent = oc.permanent
    if oc.delivered:
        row.state = DeliveryState.DELIVERED
        row.delivered_at = now
        row.next_attempt_at = None
        row.last_error = oc.error_text  # the warning, if any
        return
    age = (now - row.created_at).total_seconds()
    if oc.final:
        verdict = "not retried: retrying cannot help"
    elif oc.permanent and row.attempts >= settings.permanent_max_attempts:
        verdict = f"refused permanently {row.attempts} times (dispatch.permanent_max_attempts)"
    elif row.attempts >= settings.max_attempts:
        verdict = f"gave up after {row.attempts} attempts (dispatch.max_attempts)"
    elif age >= settings.max_age_s:
        verdict = f"gave up: older than dispatch.max_age_s ({settings.max_age_s:g} s) after {row.attempts} attempts"
    else:
        delay = backoff_delay(row.attempts, settings, fraction=fraction)
        if oc.retry_after_s is not None:
            delay = min(max(delay, oc.retry_after_s), settings.backoff_max_s)
        row.state = DeliveryState.PENDING
        row.next_attempt_at = now + timedelta(seconds=delay)
        row.last_error = oc.error_text
        return
    row.state = DeliveryState.FAILED
    row.next_attempt_at = None
    row.last_error = f"{oc.error_text}; {verdict}"


def verdict_of(row: Delivery, oc: Outcome) -> str:
    """A failed delivery's reason without the peer's own words (for logs above DEBUG)."""
    text = row.last_error or ""
    if oc.peer_text and oc.error_text and text.startswith(oc.error_text):
        return f"{oc.message}{text[len(oc.error_text) :]}"
    return text


def load_items(session: Session, store: FileStore, ids: Sequence[int]) -> list[tuple[Item, int]]:
    """The claimed deliveries with their files, and each one's job id."""
    rows = session.execute(
        select(Delivery.id, Delivery.job_id, Output.path, Output.sop_class_uid, Output.sop_uid, Output.kind)
        .join(Output, Output.id == Delivery.output_id)
        .where(Delivery.id.in_(list(ids)))
        .order_by(Delivery.id)
    ).all()
    return [(Item(r[0], store.path(r[2]), r[3], r[4], r[5]), r[1]) for r in rows]


def resolve_sender(session: Session, settings: Settings, job_id: int) -> Target:
    """The DIMSE peer that sent a job's triggering series, for ``return_to_sender``.

    Raises:
        ConfigError: the route no longer asks for it, or the series arrived without a calling AE and
            address (over STOW-RS, or before they were recorded).
    """
    job = session.get(Job, job_id)
    if job is None:
        raise ConfigError(f"job {job_id} no longer exists")
    route = next((r for r in settings.routes if r.name == job.route), None)
    rts: ReturnToSender | None = route.return_to_sender if route is not None else None
    if rts is None:
        raise ConfigError(f"route {job.route!r} no longer has return_to_sender configured")
    series = None
    if job.trigger_series_uid:
        series = session.scalar(select(Series).where(Series.series_uid == job.trigger_series_uid))
    if series is None or not series.calling_ae or not series.source_address:
        raise ConfigError(
            f"return to sender: the series of job {job_id} did not arrive over DIMSE with a calling AE title "
            "and address, so there is no sender to return to"
        )
    try:
        dest = DimseDestination(
            type="dimse",
            host=series.source_address,
            port=rts.port,
            ae_title=series.calling_ae,
            calling_ae=None,
            seg_type=rts.seg_type,
            tls=rts.tls,
        )
    except ValueError as exc:
        raise ConfigError(f"return to sender: the recorded sender cannot be called: {exc}") from exc
    where = f"routes[{settings.routes.index(route)}].return_to_sender" if route is not None else "return_to_sender"
    return target_for(RETURN_TO_SENDER, where, dest)


# -- the loop -----------------------------------------------------------------------------------------------------


class Dispatcher:
    """Claims due deliveries and sends them, one batch per destination at a time.

    Args:
        settings: the node's settings (``dispatch``, ``destinations``, ``routes``, ``dicom.ae_title``).
        db: the database.
        store: the file store the outputs are in.
        worker_id: this dispatcher's lease owner name (default: host, process id and a random tag,
            so that a restarted process never mistakes an old lease for its own).
    """

    def __init__(self, settings: Settings, db: Database, store: FileStore, *, worker_id: str | None = None) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:dispatch:{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Check the destinations' secrets and TLS files (errors are logged), then poll in a thread."""
        if self._thread is not None:
            return
        for line in self.check_destinations():
            logger.error("%s", line)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._thread.start()
        logger.info(
            "dispatcher %s started: %d destinations, batches of %d, up to %d in parallel",
            self.worker_id,
            len(self.settings.destinations),
            self.settings.dispatch.batch_size,
            self.settings.dispatch.concurrency,
        )

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming, let running batches finish their current instance, release what is left.

        Waits at most ``timeout`` seconds (default ``dispatch.timeout_s`` + 5) for running batches.
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        limit = self.settings.dispatch.timeout_s + 5 if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._lock:
            running = list(self._inflight.values())
        for thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("dispatcher stopping: %s did not finish within %g s", thread.name, limit)
        try:
            n = release(self.db, self.worker_id)
            if n:
                logger.info("dispatcher stopping: %d deliveries returned to the queue", n)
        except Exception:
            logger.exception("could not release held deliveries; their leases will expire")

    def wake(self) -> None:
        """Poll now (new deliveries were queued)."""
        self._wake.set()

    def check_destinations(self) -> list[str]:
        """Problems with the destinations' secrets and TLS files, one line each (empty when all is well)."""

        problems: list[str] = []
        for name, dest in self.settings.destinations.items():
            try:
                target = target_for(name, f"destinations.{name}", dest)
                target.sender.check(target)
            except ConfigError as exc:
                problems.append(f"destination {name} cannot be used until this is fixed: {exc}")
        for i, route in enumerate(self.settings.routes):
            if route.return_to_sender is not None and route.return_to_sender.tls is not None:
                try:
                    client_ssl_context(route.return_to_sender.tls, where=f"routes[{i}].return_to_sender.tls")
                except ConfigError as exc:
                    problems.append(f"route {route.name} cannot return results to senders: {exc}")
        return problems

    # -- one pass -------------------------------------------------------------------------------------------------
    def run_once(self) -> int:
        """One synchronous pass: reap, then send one batch for each destination with due deliveries.

        Returns the number of deliveries attempted.
        """
        reap_expired_leases(self.db, self.settings.dispatch)
        n = 0
        for destination in due_destinations(self.db):
            n += self.process(destination)
        return n

    def process(self, destination: str) -> int:
        """Claim one batch of ``destination`` and send it; returns how many deliveries were in it."""
        ds = self.settings.dispatch
        ids = claim(self.db, destination, self.worker_id, limit=ds.batch_size, lease_s=ds.lease_s)
        if not ids:
            return 0
        try:
            self._send_batch(destination, ids)
        except Exception:
            logger.exception("dispatching %d deliveries to %s failed unexpectedly", len(ids), destination)
            outcomes = {i: transient("internal error in the dispatcher; see the node's log") for i in ids}
            record(self.db, outcomes, self.worker_id, ds, label=destination)
        return len(ids)

    def _send_batch(self, destination: str, ids: list[int]) -> None:
        ds = self.settings.dispatch
        groups: dict[str, tuple[Target | None, list[Item], str]] = {}
        with self.db.session() as session:
            for item, job_id in load_items(session, self.store, ids):
                try:
                    target: Target | None = self._target(session, destination, job_id)
                    problem = ""
                except ConfigError as exc:
                    target, problem = None, str(exc)
                key = target.label if target is not None else f"unresolved: {problem}"
                groups.setdefault(key, (target, [], problem))[1].append(item)
        for _key, (target, items, problem) in groups.items():
            if target is None:
                outcomes = {i.delivery_id: permanent(problem, final=True) for i in items}
                record(self.db, outcomes, self.worker_id, ds, label=destination)
                continue
            options = SendOptions(self.settings.dicom.ae_title, ds.timeout_s, self._stop)
            outcomes = target.sender.send(target, items, options)
            states = record(self.db, outcomes, self.worker_id, ds, label=target.label)
            done = sum(1 for s in states.values() if s is DeliveryState.DELIVERED)
            log = logger.info if done == len(items) else logger.warning
            log("sent %d instances to %s: %d delivered", len(items), target.label, done)
            for item in items:
                logger.debug("delivery %d: %s %s -> %s", item.delivery_id, item.kind.value, item.sop_uid, target.name)

    def _target(self, session: Session, destination: str, job_id: int) -> Target:
        """Where a claimed delivery of ``destination`` (and of job ``job_id``) goes.

        Raises:
            ConfigError: the destination is no longer configured, or its sender cannot be resolved.
        """
        if destination == RETURN_TO_SENDER:
            return resolve_sender(session, self.settings, job_id)
        dest = self.settings.destinations.get(destination)
        if dest is None:
            raise ConfigError(f"destination {destination!r} is no longer configured")
        return target_for(destination, f"destinations.{destination}", dest)

    def _run(self) -> None:
        ds = self.settings.dispatch
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                logger.exception("dispatcher pass failed; will try again")
            self._wake.wait(ds.poll_interval_s)
            self._wake.clear()

    def tick(self) -> None:
        """One pass of the loop: reap and renew leases, start a batch thread for each idle destination with work."""
        ds = self.settings.dispatch
        reap_expired_leases(self.db, ds)
        with self._lock:
            self._inflight = {k: t for k, t in self._inflight.items() if t.is_alive()}
            busy = set(self._inflight)
        if busy:
            renew_leases(self.db, self.worker_id, ds.lease_s)
        for destination in due_destinations(self.db):
            if self._stop.is_set():
                return
            with self._lock:
                if destination in self._inflight or len(self._inflight) >= ds.concurrency:
                    continue
                thread = threading.Thread(
                    target=self._batch_thread, args=(destination,), name=f"dispatch-{destination}", daemon=True
                )
                self._inflight[destination] = thread
            thread.start()

    def _batch_thread(self, destination: str) -> None:
        try:
            while not self._stop.is_set() and self.process(destination) > 0:
                pass  # keep draining this destination while it has due work
        except Exception:
            logger.exception("dispatcher batch for %s failed", destination)
        finally:
            self._wake.set()
