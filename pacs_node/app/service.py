"""Assembles the stages of ``pacs-node serve``.

Stages share only the database and the file store: the SCP and its indexer
(receive), the router, the inference workers (child processes), the dispatcher
(sending results), and retention. ``dicom.processes > 1`` runs extra SCP
processes that share the port (SO_REUSEPORT), each with its own indexer, so
that several associations are not serialised on one interpreter lock.

With ``queue.backend: celery`` (distributed mode) serve runs no inference
workers: an :class:`~pacs_node.process.distributed.Enqueuer` publishes PENDING jobs to
the broker and reaps expired job leases, and ``pacs-node worker`` processes on
any number of hosts run the jobs.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

from pacs_node.common.logs import configure_logging
from pacs_node.common.store import open_store
from pacs_node.config import Settings
from pacs_node.deliver.dispatcher import Dispatcher
from pacs_node.process.worker import WorkerSupervisor
from pacs_node.receive.indexer import Indexer
from pacs_node.receive.ingest import IngestLimits, Ingestor, StoredLocations
from pacs_node.receive.scp import StorageSCP
from pacs_node.retain.retention import Retention
from pacs_node.route.router import Router
from pacs_node.web import HttpServer
from storage.db import Database
from storage.filestore import FileStore

if TYPE_CHECKING:
    from pacs_node.process.distributed import Enqueuer

logger = logging.getLogger(__name__)


class Receiver:
    """SCP + indexer: the receive path of one process."""

    def __init__(self, settings: Settings, db: Database, store: FileStore, *, reuse_port: bool = False) -> None:
        self.indexer = Indexer(db, store)
        self.ingestor = Ingestor(
            store,
            self.indexer.submit,
            limits=IngestLimits.from_settings(settings.storage),
            locate=StoredLocations(db),
        )
        self.scp = StorageSCP(settings.dicom, self.ingestor, reuse_port=reuse_port)

    def start(self) -> None:
        """Start indexing, then listening."""
        self.indexer.start()
        self.scp.start()

    def stop(self) -> None:
        """Stop listening, then index what was acknowledged."""
        self.scp.stop()
        self.indexer.stop()


class Node:
    """Everything ``pacs-node serve`` runs, in one object.

    Args:
        settings: the loaded settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = open_store(settings)
        self.db = Database(settings.db_url)
        self.receiver = Receiver(settings, self.db, self.store, reuse_port=settings.dicom.processes > 1)
        # raises ConfigError for a non-loopback http.host without a token
        self.http: HttpServer | None = (
            HttpServer(settings, self.db, self.store, self.receiver.ingestor) if settings.http.enabled else None
        )
        self.enqueuer: Enqueuer | None = None
        self.workers: WorkerSupervisor | None = None
        if settings.distributed:
            from pacs_node.process.distributed import Enqueuer

            self.enqueuer = Enqueuer(settings, self.db, self.store)
        else:
            self.workers = WorkerSupervisor(settings, self.db)
        self.router = Router(settings, self.db, on_pending=self.enqueuer.wake if self.enqueuer else None)
        self.retention = Retention(settings.retention, self.db, self.store, data_dir=settings.data_dir)
        self.dispatcher: Dispatcher | None = (
            Dispatcher(settings, self.db, self.store) if settings.dispatch.enabled else None
        )
        self._children: list[mp.process.BaseProcess] = []

    @property
    def indexer(self) -> Indexer:
        """The main process's indexer."""
        return self.receiver.indexer

    @property
    def scp(self) -> StorageSCP:
        """The main process's SCP."""
        return self.receiver.scp

    def start(self) -> None:
        """Migrate, recover, then start every stage."""
        self.db.upgrade()
        stale = self.store.clean_incoming()
        if stale:
            logger.info("removed %d temporary files of transfers interrupted before the last stop", stale)
        recovered = self.indexer.recover()
        if recovered:
            logger.info("recovery: indexed %d acknowledged instances", recovered)
        self.receiver.start()
        if self.http is not None:
            self.http.start()
        ctx = mp.get_context("spawn")
        for i in range(self.settings.dicom.processes - 1):
            proc = ctx.Process(target=_receiver_process, args=(self.settings,), name=f"scp-{i + 1}", daemon=True)
            proc.start()
            self._children.append(proc)
        self.router.start()
        if self.workers is not None:
            self.workers.start()
        if self.enqueuer is not None:
            self.enqueuer.start()
        if self.dispatcher is not None:
            self.dispatcher.start()
        self.retention.start()
        logger.info(
            "pacs-node serving: AE %s on %s:%d, data in %s, database %s",
            self.settings.dicom.ae_title,
            self.settings.dicom.host,
            self.scp.port,
            self.settings.data_dir,
            self.db.engine.url.render_as_string(hide_password=True),
        )

    def stop(self) -> None:
        """Stop every stage; acknowledged instances are indexed before return.

        The dispatcher stops first: a send under way finishes its current
        instance and what it still held goes back to the queue.
        """
        try:
            if self.http is not None:  # STOW requests finish before the indexer stops
                self.http.stop()
            if self.dispatcher is not None:
                self.dispatcher.stop()
        finally:
            if self.workers is not None:
                self.workers.stop()
            if self.enqueuer is not None:
                self.enqueuer.stop()
            for proc in self._children:
                proc.terminate()
            for proc in self._children:
                proc.join(30)
            self._children.clear()
            self.receiver.stop()
            self.router.stop()
            self.retention.stop()
            self.db.dispose()


def _receiver_process(settings: Settings) -> None:  # pragma: no cover - runs in a child
    configure_logging(settings.log_level)
    db = Database(settings.db_url)
    receiver = Receiver(settings, db, open_store(settings), reuse_port=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    receiver.start()
    done.wait()
    receiver.stop()
    db.dispose()


def serve(settings: Settings) -> int:
    """Run the node until SIGINT or SIGTERM; returns the exit code."""
    node = Node(settings)
    done = threading.Event()

    def _signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: stopping", signum)
        done.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    node.start()
    try:
        done.wait()
    finally:
        node.stop()
    return 0
