"""The administrators' web console: :func:`create_app` builds it (``fedface console serve`` runs it).

Layers, outermost first (each a plain ASGI middleware, so that the server-sent event stream is
passed through untouched):

1. :class:`SecurityHeaders`: a strict Content-Security-Policy (scripts, styles and everything
   else from the console itself; no inline script or style, no frames, forms only to itself),
   ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``, and
   ``Cache-Control: no-store`` on everything but the static files, and under TLS
   ``Strict-Transport-Security``.
2. starlette's ``SessionMiddleware``: the signed session cookie (:mod:`.auth`).
3. :class:`LoginRequired`: without a logged-in session only ``/login`` and ``/static/*`` are
   served; any other GET is redirected (303) to ``/login``, ``/events`` and every POST are
   answered 401.

The routes are in :mod:`.pages` (HTML) and :mod:`.feed` (``/events``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.middleware.sessions import SessionMiddleware
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedface.common.errors import FedFaceError
from fedface.server.console import auth
from fedface.server.console.pages import add_routes
from fedface.server.console.sources import Settings, StoreSource

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
_PUBLIC = ("/login", "/static/")


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


class LoginRequired:
    """Lets through only ``/login`` and ``/static/*`` without a logged-in session (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, max_age_s: int) -> None:
        self.app = app
        self.max_age_s = max_age_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        if path == _PUBLIC[0] or path.startswith(_PUBLIC[1]):
            await self.app(scope, receive, send)
            return
        user = auth.session_user(scope["session"], self.max_age_s)
        if user is not None:
            scope["state"] = {**scope.get("state", {}), "user": user}
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD") and path != "/events":
            response: PlainTextResponse | RedirectResponse = RedirectResponse("/login", status_code=303)
        else:
            response = PlainTextResponse("log in first: /login", status_code=401)
        await response(scope, receive, send)


async def _one_line_error(request: Request, exc: Exception) -> Response:
    """A fedface error while serving (an unreadable run store ...): its one line, as a 500."""
    logger.error("console: %s: %s", type(exc).__name__, exc)
    return PlainTextResponse(f"{type(exc).__name__}: {exc}", status_code=500)


def create_app(settings: Settings) -> FastAPI:
    """The console over ``settings`` (a run store, an admin directory ...).

    Raises
    ------
    KeyFileError
        When the admin directory has no admin or session key (`fedface console init-admin`).
    """
    admin = auth.load_admin(settings.admin_dir)
    secret = auth.load_session_key(settings.admin_dir)
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
    app.state.limiter = auth.LoginLimiter(limit=settings.login_limit, window_s=settings.login_window_s)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_exception_handler(FedFaceError, _one_line_error)
    add_routes(app)
    # added innermost first: LoginRequired runs inside the session, the headers outside both
    app.add_middleware(LoginRequired, max_age_s=settings.session_max_age_s)
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret.hex(),
        session_cookie=auth.SESSION_COOKIE,
        max_age=settings.session_max_age_s,
        same_site="strict",
        https_only=settings.https,
    )
    app.add_middleware(SecurityHeaders, https=settings.https)
    return app


__all__ = ["CSP", "STATIC_DIR", "LoginRequired", "SecurityHeaders", "create_app"]
