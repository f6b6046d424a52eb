"""Who may talk to the HTTP side: bearer token, loopback binding, Host and CORS policy.

Without a token the server binds only to loopback addresses, answers only
requests whose Host header names this machine (so that a web page cannot reach
it through DNS rebinding) and allows cross-origin reads only from loopback
origins (a viewer running on the same machine). With a token every request but
``/healthz`` must carry ``Authorization: Bearer <token>``.

A browser cannot add that header to a page load, so the dashboard's login form
(``/ui/login``) exchanges the token for a session cookie: an HMAC of the token
(:func:`session_value`; the token itself is never stored in the browser),
``HttpOnly`` and ``SameSite=Strict``, accepted in place of the header. A
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
import socket
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from urllib.parse import quote, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from pacs_node.config import HttpSettings
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
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
LOOPBACK_ORIGIN_REGEX = r"https?://(localhost|127\.\d+\.\d+\.\d+|\[::1\])(:\d+)?"


def load_token(http: HttpSettings, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token from ``http.token_file`` or ``http.token_env``, or None when neither is set.

    Raises:
        ConfigError: both are set, the file cannot be read, or the token is empty.
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
        return token
    if http.token_env is not None:
        token = env.get(http.token_env, "").strip()
        if not token:
            raise ConfigError(f"http.token_env: the environment variable {http.token_env} is not set or empty")
        return token
    return None


def session_value(token: str) -> str:
    """The dashboard session cookie's value for ``token``: an HMAC of it, not the token itself.

    It changes when the token changes, which ends every session.
    """
    return hmac.new(token.encode("utf-8"), b"pacs-node dashboard session v1", hashlib.sha256).hexdigest()


def safe_next(target: str | None, default: str = "/ui/") -> str:
    """A local path to return to after the login (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    if any(ord(ch) < 0x20 for ch in target):
        return default
    return target


def _cookie(scope: Scope, name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an address or a name) refers only to this machine."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
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


def _host_name(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class AccessMiddleware:
    """Bearer token check, and the Host check when serving without a token.

    Args:
        app: the wrapped application.
        token: the bearer token, or None.
        http: the ``http`` settings (public_url names an extra allowed Host).
    """

    def __init__(self, app: ASGIApp, *, token: str | None, http: HttpSettings) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.session = session_value(token).encode("ascii") if token else None
        self.check_host = token is None and not http.allow_remote_without_token
        self.allowed_hosts = {"localhost", "127.0.0.1", "::1", http.host.lower()}
        self.public_origin: str | None = None
        if http.public_url:
            parts = urlsplit(http.public_url)
            self.public_origin = f"{parts.scheme}://{parts.netloc}"
            public = urlsplit(http.public_url).hostname
            if public:
                self.allowed_hosts.add(public.lower())

    def _local_origin(self, origin: str) -> bool:
        if re.fullmatch(LOOPBACK_ORIGIN_REGEX, origin):
            return True
        return self.public_origin is not None and origin.rstrip("/") == self.public_origin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.check_host:
            host = _host_name(_header(scope, b"host") or "").lower()
            if host and host not in self.allowed_hosts and not host.startswith("127."):
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
                assert self.session is not None
                cookie = (_cookie(scope, SESSION_COOKIE) or "").encode("ascii", "replace")
                if not (cookie and hmac.compare_digest(cookie, self.session)):
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
