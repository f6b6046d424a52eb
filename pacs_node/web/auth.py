"""Who may talk to the HTTP side: bearer token, loopback binding, Host and CORS policy.

Without a token the server binds only to loopback addresses, answers only
requests whose Host header names this machine exactly (``localhost``, a loopback
address, ``http.host`` or ``http.public_url``'s host, each with its own port or
none), so that a web page cannot reach it through DNS rebinding, and allows
cross-origin reads only from loopback origins (a viewer running on the same
machine). With a token every request but ``/healthz`` must carry
``Authorization: Bearer <token>``; the token must be at least
:data:`MIN_TOKEN_LENGTH` characters of at least :data:`MIN_TOKEN_DISTINCT`
different ones.

A browser cannot add that header to a page load, so the dashboard's login form
(``/ui/login``) exchanges the token for a session cookie: a random session id
(:class:`Sessions`; the token itself is never stored in the browser),
``HttpOnly`` and ``SameSite=Strict``, accepted in place of the header. The
server keeps the open sessions: logging out, or 12 hours, ends one, and a copy
of its cookie is then refused; a restart ends them all. A
request that changes something on the strength of the cookie alone must also
come from the node's own pages (its ``Origin`` names the node), so another site
cannot post a form through the user's session. Pages of the dashboard and the
viewer answer an unauthenticated browser with a redirect to the login form
rather than a JSON 401.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from http.cookies import CookieError, SimpleCookie
from urllib.parse import quote, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from pacs_node.config import HttpSettings
from pacs_node.config.model import is_loopback_literal
from pacs_node.errors import ConfigError

logger = logging.getLogger(__name__)

#: Paths answered without a token (no PHI, no state change but the login itself).
OPEN_PATHS = frozenset({"/healthz", "/ui/login"})
#: Path prefixes answered without a token: the dashboard's stylesheet and script (no PHI).
OPEN_PREFIXES = ("/ui/static/",)
#: The dashboard's session cookie (see :func:`session_value`).
SESSION_COOKIE = "pacs_node_session"
#: Pages a browser opens: without a session they redirect to the login form.
LOGIN_REDIRECT_PREFIXES = ("/ui", "/viewer")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_ORIGIN_REGEX = r"https?://(localhost|127\.\d+\.\d+\.\d+|\[::1\])(:\d+)?"
#: Shortest bearer token accepted (``openssl rand -hex 32`` makes 64 characters).
MIN_TOKEN_LENGTH = 16
#: Fewest different characters in a token (``aaaaaaaaaaaaaaaa`` is not a secret).
MIN_TOKEN_DISTINCT = 8
#: How long a dashboard session lasts after its login.
SESSION_MAX_AGE_S = 12 * 3600
#: Most sessions held at once; the oldest is ended when a login would exceed it.
MAX_SESSIONS = 1000


def load_token(http: HttpSettings, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token from ``http.token_file`` or ``http.token_env``, or None when neither is set.

    Raises:
        ConfigError: both are set, the file cannot be read, the token is empty or
            too weak (:func:`check_token_strength`); the message names the key.
    """
    env = os.environ if environ is None else environ
    if http.token_file is not None and http.token_env is not None:
        raise ConfigError("http.token_file and http.token_env are both set; set only one of them")
    if http.token_file is not None:
        try:
            token = http.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"http.token_file: cannot read {http.token_file}: {exc.strerror}") from exc
        if not token:
            raise ConfigError(f"http.token_file: {http.token_file} is empty")
        check_token_strength(token, f"http.token_file ({http.token_file})")
        return token
    if http.token_env is not None:
        token = env.get(http.token_env, "").strip()
        if not token:
            raise ConfigError(f"http.token_env: the environment variable {http.token_env} is not set or empty")
        check_token_strength(token, f"http.token_env ({http.token_env})")
        return token
    return None


def check_token_strength(token: str, key: str) -> None:
    """Refuse a bearer token that can be guessed: shorter than :data:`MIN_TOKEN_LENGTH` characters, or made
    of fewer than :data:`MIN_TOKEN_DISTINCT` different characters.

    Raises:
        ConfigError: naming ``key``, never showing the token.
    """
    advice = "use a random one, e.g. the output of `openssl rand -hex 32`"
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{key}: the bearer token is {len(token)} characters long, fewer than {MIN_TOKEN_LENGTH}; {advice}"
        )
    distinct = len(set(token))
    if distinct < MIN_TOKEN_DISTINCT:
        raise ConfigError(
            f"{key}: the bearer token has only {distinct} different characters "
            f"(at least {MIN_TOKEN_DISTINCT} are needed); {advice}"
        )


class Sessions:
    """The dashboard's open sessions, kept by the server (in memory).

    A session cookie holds a random id (:meth:`open`); the server keeps only its
    SHA-256 with its expiry, so :meth:`close` (logout) or the expiry makes every
    copy of the cookie worthless, and a restart ends every session. Thread-safe
    (logins and logouts run in the thread pool, checks on the event loop).

    Args:
        max_age_s: how long a session lasts after its login.
        max_sessions: most sessions held; a login beyond it ends the oldest.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        *,
        max_age_s: float = SESSION_MAX_AGE_S,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age_s = max_age_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._expiry: OrderedDict[bytes, float] = OrderedDict()  # digest -> expiry, oldest first
        self._lock = threading.Lock()

    @staticmethod
    def _digest(value: str) -> bytes:
        return hashlib.sha256(value.encode("utf-8", "replace")).digest()

    def open(self) -> str:
        """A new session; returns the cookie value."""
        value = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            self._expire(now)
            while len(self._expiry) >= self.max_sessions:
                self._expiry.popitem(last=False)
            self._expiry[self._digest(value)] = now + self.max_age_s
        return value

    def valid(self, value: str | None) -> bool:
        """Whether ``value`` names an open session that has not expired."""
        if not value or len(value) > 128:
            return False
        digest = self._digest(value)
        with self._lock:
            expiry = self._expiry.get(digest)
            if expiry is None:
                return False
            if expiry <= self._clock():
                del self._expiry[digest]
                return False
            return True

    def close(self, value: str | None) -> bool:
        """End the session ``value`` names (logout); whether there was one."""
        if not value:
            return False
        with self._lock:
            return self._expiry.pop(self._digest(value), None) is not None

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._expiry)

    def _expire(self, now: float) -> None:
        for digest in [d for d, expiry in self._expiry.items() if expiry <= now]:
            del self._expiry[digest]


def safe_next(target: str | None, default: str = "/ui/") -> str:
    """A local path to return to after the login (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    if any(ord(ch) < 0x20 for ch in target):
        return default
    return target


def session_cookie(raw: str | None) -> str | None:
    """The session cookie's value in a ``Cookie`` header, or None."""
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return None
    morsel = jar.get(SESSION_COOKIE)
    return morsel.value if morsel is not None else None


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an address or a name) refers only to this machine."""
    if is_loopback_literal(host):
        return True
    name = host.strip().strip("[]").lower()
    try:
        infos = socket.getaddrinfo(name, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def check_bind(http: HttpSettings, token: str | None) -> None:
    """Refuse to serve a non-loopback address without a token.

    Raises:
        ConfigError: naming the settings that would allow it.
    """
    if token is None and not http.allow_remote_without_token and not is_loopback_host(http.host):
        raise ConfigError(
            f"http.host is {http.host!r}, which is not a loopback address, and no bearer token is configured: "
            "set http.token_file or http.token_env, bind http.host to 127.0.0.1, or (only behind a proxy that "
            "authenticates) set http.allow_remote_without_token: true"
        )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def split_host(value: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a Host header: the name lower-cased, without IPv6 brackets or a final dot; the port
    None when absent. None for a malformed header (a bare IPv6 address, a port that is not a port)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
    elif value.count(":") > 1:
        return None
    else:
        name, sep, port_text = value.partition(":")
        rest = ":" + port_text if sep else ""
    if rest and (not rest.startswith(":") or not rest[1:].isascii() or not rest[1:].isdigit() or len(rest) > 6):
        return None
    port = int(rest[1:]) if rest else None
    if port is not None and not 0 < port <= 65535:
        return None
    name = name[:-1] if name.endswith(".") else name
    return (name, port) if name else None


class AccessMiddleware:
    """Bearer token check, and the Host check when serving without a token.

    Args:
        app: the wrapped application.
        token: the bearer token, or None.
        http: the ``http`` settings (public_url names an extra allowed Host).
        sessions: the dashboard's open sessions (cookies accepted in place of the token).
    """

    def __init__(self, app: ASGIApp, *, token: str | None, http: HttpSettings, sessions: Sessions) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.sessions = sessions
        self.check_host = token is None and not http.allow_remote_without_token
        local = (split_host(http.host) or ("", None))[0]
        self.local_names = {local} if local and local not in ("0.0.0.0", "::") else set()
        self.public_origin: str | None = None
        self.public_host: tuple[str, int] | None = None
        if http.public_url:
            parts = urlsplit(http.public_url)
            self.public_origin = f"{parts.scheme}://{parts.netloc}"
            if parts.hostname:
                default = 443 if parts.scheme == "https" else 80
                self.public_host = (parts.hostname.lower().rstrip("."), parts.port or default)

    def host_allowed(self, scope: Scope) -> bool:
        """Whether the Host header names this node exactly: a loopback name or address, ``http.host``, with
        the port the request came in on (or none), or ``http.public_url``'s host and port. No Host at all (an
        HTTP/1.0 client; browsers always send one) is let through."""
        raw = _header(scope, b"host")
        if raw is None or not raw.strip():
            return True
        parsed = split_host(raw)
        if parsed is None:
            return False
        name, port = parsed
        if self.public_host is not None and (name, port) in (self.public_host, (self.public_host[0], None)):
            return True
        if not (is_loopback_literal(name) or name in self.local_names):
            return False
        server = scope.get("server")
        return port is None or server is None or port == server[1]

    def _local_origin(self, origin: str) -> bool:
        if re.fullmatch(LOOPBACK_ORIGIN_REGEX, origin):
            return True
        return self.public_origin is not None and origin.rstrip("/") == self.public_origin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.check_host and not self.host_allowed(scope):
            host = _header(scope, b"host") or ""
            logger.warning("refused a request for Host %r: serving without a token, only local names", host[:80])
            await _deny(send, 403, "this node serves without a token and answers only requests for localhost")
            return
        path = scope.get("path", "")
        origin = _header(scope, b"origin")
        if self.check_host and origin and scope.get("method") not in SAFE_METHODS and not self._local_origin(origin):
            # Without a token a page from another site could still post a form to 127.0.0.1.
            logger.warning(
                "refused %s %s from origin %r: serving without a token", scope.get("method"), path, origin[:80]
            )
            await _deny(send, 403, "this node serves without a token and accepts changes only from local pages")
            return
        if self.token is not None and not self._open(path) and scope.get("method") != "OPTIONS":
            auth = _header(scope, b"authorization") or ""
            scheme, _, given = auth.partition(" ")
            bearer_ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"), self.token)
            if not bearer_ok:
                if not self.sessions.valid(session_cookie(_header(scope, b"cookie"))):
                    await self._unauthenticated(scope, send, path)
                    return
                if scope.get("method") not in SAFE_METHODS and not self._same_origin(scope):
                    logger.warning("refused %s %s: a session cookie from another origin", scope.get("method"), path)
                    await _deny(send, 403, "changes made with the dashboard's session must come from its own pages")
                    return
        await self.app(scope, receive, send)

    @staticmethod
    def _open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)

    def _same_origin(self, scope: Scope) -> bool:
        """Whether the request's Origin (or, lacking one, Referer) names the node: the host it was
        sent to, or ``http.public_url`` (behind a proxy that rewrites Host)."""
        host = (_header(scope, b"host") or "").lower()
        source = _header(scope, b"origin") or _header(scope, b"referer")
        if not source or source == "null":
            return False
        parts = urlsplit(source)
        if self.public_origin is not None and f"{parts.scheme}://{parts.netloc}" == self.public_origin:
            return True
        return bool(host) and parts.netloc.lower() == host

    async def _unauthenticated(self, scope: Scope, send: Send, path: str) -> None:
        client = scope.get("client") or ("?", 0)
        method = scope.get("method")
        if method in ("GET", "HEAD") and (path == "/" or path.startswith(LOGIN_REDIRECT_PREFIXES)):
            query = scope.get("query_string", b"").decode("latin-1")
            target = path + ("?" + query if query else "")
            location = "/ui/login?next=" + quote(target, safe="")
            await send(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [(b"location", location.encode("latin-1")), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        logger.warning("refused %s %s from %s: missing or wrong bearer token", method, path, client[0])
        await _deny(send, 401, "a valid bearer token is required (Authorization: Bearer <token>)", bearer=True)


async def _deny(send: Send, status: int, message: str, *, bearer: bool = False) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if bearer:
        headers.append((b"www-authenticate", b'Bearer realm="pacs-node"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
