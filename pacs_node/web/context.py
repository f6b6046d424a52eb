"""What every HTTP handler (DICOMweb, API, dashboard) shares, on ``app.state.ctx``."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from pacs_node.config import Settings
from pacs_node.receive.ingest import Ingestor
from pacs_node.web.auth import Sessions
from pacs_node.web.dicomjson import MetadataCache
from pacs_node.web.metrics import LocalCounters
from pacs_node.web.qido import Qido
from storage.db import Database
from storage.filestore import FileStore

DICOMWEB = "/dicom-web"


@dataclass
class HttpContext:
    """What the handlers share: settings, database, store, receive path, caches, counters and the dashboard's
    sessions."""

    settings: Settings
    db: Database
    store: FileStore
    ingestor: Ingestor
    token: str | None = None
    cache: MetadataCache = field(default_factory=MetadataCache)
    counters: LocalCounters = field(default_factory=LocalCounters)
    sessions: Sessions = field(default_factory=Sessions)

    def __post_init__(self) -> None:
        self.qido = Qido(self.db, self.store, self.cache)

    def base_url(self, request: Request) -> str:
        """The URL clients reach the server at: ``http.public_url``, else the request's own.

        A public_url given as the DICOMweb root (ending in /dicom-web) is taken as meant.
        """
        public = (self.settings.http.public_url or "").rstrip("/")
        if public.endswith(DICOMWEB):
            public = public[: -len(DICOMWEB)]
        return public or str(request.base_url).rstrip("/")

    def dicomweb_root(self, request: Request) -> str:
        """The DICOMweb base URL for RetrieveURL and BulkDataURI."""
        return self.base_url(request) + DICOMWEB
