"""The administrators' web console: :func:`create_app` builds it (``fedface console serve`` runs it).

Layers, outermost first (each a plain ASGI middleware, so that the server-sent event stream is
passed through untouched):

1. :class:`SecurityHeaders`: a strict Content-Security-Policy (scripts, styles and everything
   else from the console itself; no inline script or style, no frames, forms only to itself),
   ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``, and
   ``Cache-Control: no-store`` on everything but the static files, and under TLS
   ``Strict-Transport-Security``.
2. :class:`TrustedHosts`: a request whose ``Host`` header is not one of the console's names
   (:attr:`Settings.trusted_hosts <fedface.server.console.sources.Settings.trusted_hosts>`) is
   answered 400, so a page of another site cannot reach a loopback console by DNS rebinding.
   starlette's ``TrustedHostMiddleware`` does this check too, but it cuts the Host header at
   its first colon and so never matches an IPv6 address (``[::1]:8765``).
3. :class:`SmallForms`: a POST body must be a URL-encoded form (an empty body may have no type)
   of at most :data:`MAX_BODY` bytes; anything else (a multipart upload, which python-multipart
   would spool to disk; a large body) is refused (415, 413) before a byte of it is parsed.
4. starlette's ``SessionMiddleware``: the signed session cookie (:mod:`.auth`).
5. :class:`LoginRequired`: without a live session (:class:`~.auth.Sessions`, bound to the
   administrator ``admin.json`` holds now) only ``/login`` and ``/static/*`` are served; any
   other GET is redirected (303) to ``/login``, ``/events`` and every POST are answered 401.

The routes are in :mod:`.pages` (HTML, and the page shown for a fedface error such as an
unreadable run store) and :mod:`.feed` (``/events``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedface.server.console import auth
from fedface.server.console.pages import add_routes
from fedface.server.console.sources import Settings, StoreSource, host_name

STATIC_DIR = Path(__file__).parent / "static"
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
_PUBLIC = ("/login", "/static/")
#: The largest POST body accepted, in bytes (the console's forms are a few hundred).
MAX_BODY = 8 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"


class SecurityHeaders:
    """Adds the console's security headers to every HTTP response (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, https: bool = False) -> None:
        self.app = app
        self.https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control" or static]
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                headers.append((b"cache-control", b"no-cache" if static else b"no-store"))
                if self.https:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def request_host(scope: Scope) -> str:
    """The host a request's ``Host`` header names, without its port (an IPv6 address without
    brackets), as :func:`~.sources.host_name` writes it; empty if there is none."""
    value = Headers(scope=scope).get("host", "").strip()
    if value.startswith("["):
        return host_name(value[: value.find("]") + 1]) if "]" in value else ""
    return host_name(value.rsplit(":", 1)[0] if value.count(":") == 1 else value)


class TrustedHosts:
    """Answers 400 unless the ``Host`` header names one of ``allowed`` (see the module
    docstring). A name ``*.example.org`` allows every subdomain of ``example.org``."""

    def __init__(self, app: ASGIApp, *, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = frozenset(host_name(h) for h in allowed if not h.startswith("*."))
        self.suffixes = tuple(host_name(h)[1:] for h in allowed if h.startswith("*."))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = request_host(scope)
        if host and (host in self.allowed or host.endswith(self.suffixes)):
            await self.app(scope, receive, send)
            return
        await PlainTextResponse("unknown host: serve the console with --allowed-host NAME for the name in the address bar",
                                status_code=400)(scope, receive, send)


class SmallForms:
    """Refuses a POST body that is not a URL-encoded form of at most ``limit`` bytes before
    the app parses it (see the module docstring); the body read is handed on to the app."""

    def __init__(self, app: ASGIApp, *, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind and kind != FORM_TYPE:
            await self._refuse(scope, receive, send, 415, f"a console form is sent as {FORM_TYPE}")
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(scope, receive, send, 413, f"a console form is at most {self.limit} bytes")
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(scope, receive, send, 413, f"a console form is at most {self.limit} bytes")
                return
            if not message.get("more_body", False):
                break
        if body and not kind:
            await self._refuse(scope, receive, send, 415, f"a console form is sent as {FORM_TYPE}")
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, text: str) -> None:
        await PlainTextResponse(text, status_code=status, headers={"connection": "close"})(scope, receive, send)


class LoginRequired:
    """Lets through only ``/login`` and ``/static/*`` without a live session (see the module
    docstring); puts the session's user and :class:`~.auth.Session` in the request state."""

    def __init__(self, app: ASGIApp, *, sessions: auth.Sessions, admin: auth.AdminFile) -> None:
        self.app = app
        self.sessions = sessions
        self.admin = admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        if path == _PUBLIC[0] or path.startswith(_PUBLIC[1]):
            await self.app(scope, receive, send)
            return
        session = self.sessions.current(scope["session"], self.admin.fingerprint())
        if session is not None:
            scope["state"] = {**scope.get("state", {}), "user": session.user, "session": session}
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD") and path != "/events":
            response: PlainTextResponse | RedirectResponse = RedirectResponse("/login", status_code=303)
        else:
            response = PlainTextResponse("log in first: /login", status_code=401)
        await response(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    """The console over ``settings`` (a run store, an admin directory ...).

    Raises
    ------
    KeyFileError
        When the admin directory has no admin or session key (`fedface console init-admin`).
    """
    auth.load_admin(settings.admin_dir)  # no admin yet: say so first
    secret = auth.load_session_key(settings.admin_dir)
    admin = auth.AdminFile(settings.admin_dir, secret)
    source = StoreSource(settings.store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            source.close()

    app = FastAPI(title="fedface console", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.settings = settings
    app.state.admin = admin
    app.state.source = source
    app.state.sessions = sessions = auth.Sessions(max_age_s=settings.session_max_age_s)
    app.state.limiter = auth.LoginLimiter(
        limit=settings.login_limit, window_s=settings.login_window_s, address_limit=settings.login_address_limit,
        user_limit=settings.login_user_limit, user_backoff_s=settings.login_user_backoff_s,
    )
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    add_routes(app)
    # added innermost first: LoginRequired runs inside the session, the headers outside everything
    app.add_middleware(LoginRequired, sessions=sessions, admin=admin)
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret.hex(),
        session_cookie=auth.SESSION_COOKIE,
        max_age=settings.session_max_age_s,
        same_site="strict",
        https_only=settings.https,
    )
    app.add_middleware(SmallForms, limit=MAX_BODY)
    app.add_middleware(TrustedHosts, allowed=settings.trusted_hosts)
    app.add_middleware(SecurityHeaders, https=settings.https)
    return app


__all__ = [
    "CSP",
    "FORM_TYPE",
    "MAX_BODY",
    "STATIC_DIR",
    "LoginRequired",
    "SecurityHeaders",
    "SmallForms",
    "TrustedHosts",
    "create_app",
    "request_host",
]
