"""The console's routes: the pages (read through :mod:`fedface.server.queries` and the privacy
report), the login, the admin actions and the live feed.

Pages: ``/runs``, ``/runs/{run_id}``, ``/sites``, ``/privacy?run=RUN_ID``, ``/gallery``, ``/audit``
(``/`` redirects to ``/runs``). Each page has one live fragment (``templates/_<page>.html``);
a request with ``HX-Request: true`` (htmx, when the feed reports a change) gets only that
fragment. Actions (POST, CSRF-checked, written to the audit log with the admin and the client
address, then 303 back to the page with a notice): ``/runs/{run_id}/stop``, ``/sites/suspend``
and ``/sites/resume`` (the site named by the form's ``site`` field: sites choose their own
names, which may hold ``/`` or be ``..``), ``/logout``. ``/login`` is the only page without a
session. ``/events``: the server-sent events of :mod:`.feed`.

A fedface error while serving a page (an unreadable run store, a file that is not a fedface
run store ...) is shown as its one line inside the page layout (``error.html``, 500); the
login still works then, its audit-log rows kept until the store can be written
(:meth:`~.sources.StoreSource.defer`) and logged to stderr meanwhile.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from sse_starlette import EventSourceResponse

from fedface.common.errors import ConfigError, FedFaceError, KeyFileError, RunDirError, TemplateError
from fedface.server import queries
from fedface.server.admin_log import AdminActionKind
from fedface.server.console import auth, views
from fedface.server.console.feed import ZERO, change_events, encode_cursor
from fedface.server.console.sources import Settings, StoreSource
from fedface.server.reports.privacy import privacy_report_for_run
from fedface.server.reports.sections import format_up
from fedface.server.store import RunStore

logger = logging.getLogger(__name__)

MAX_USER = 64
MAX_PASSWORD = 1024
MAX_SITE = 256
NAV = (("runs", "/runs", "Runs"), ("sites", "/sites", "Sites"), ("privacy", "/privacy", "Privacy"),
       ("gallery", "/gallery", "Gallery"), ("audit", "/audit", "Audit log"))
#: The notices an action redirects back with: (kind, text; {target} is the run or site).
NOTICES = {
    "stop-requested": ("ok", "Stop requested for run {target}: the server stops it before its next round."),
    "not-running": ("warn", "Run {target} is not running: there is nothing to stop."),
    "no-run": ("warn", "There is no run {target} in the run store."),
    "suspended": ("ok", "Site {target} suspended: it is not sampled until it is resumed."),
    "resumed": ("ok", "Site {target} resumed: it may be sampled again."),
    "already-suspended": ("warn", "Site {target} is already suspended."),
    "not-suspended": ("warn", "Site {target} is not suspended."),
    "unknown-site": ("warn", "No site of that name has been seen in the run store."),
    "no-store": ("warn", "There is no run store yet: nothing was changed."),
}

_templates = views.templates()


# --- helpers -----------------------------------------------------------------------------------


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _source(request: Request) -> StoreSource:
    return request.app.state.source  # type: ignore[no-any-return]


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _user(request: Request) -> str:
    return str(request.state.user)


def _notice(request: Request, target: str | None) -> dict[str, str] | None:
    code = request.query_params.get("notice")
    if code not in NOTICES or (target is None and "{target}" in NOTICES[code][1]):
        return None
    kind, text = NOTICES[code]
    return {"kind": kind, "text": text.format(target=target)}


def _open(request: Request) -> tuple[RunStore | None, str]:
    """The run store (None while there is none) and its cursor, read before the page's data so
    that the feed, resumed from it, reports every change the page does not show."""
    store = _source(request).get()
    return store, encode_cursor(store.cursor() if store is not None else ZERO)


def _render(
    request: Request, page: str, context: dict[str, Any], *, cursor: str, status: int = 200, template: str | None = None
) -> Response:
    """``templates/<template>.html`` (default: the page's), or only its live fragment
    ``_<template>.html`` for htmx. ``page`` names the page (``<main data-page>``, the nav)."""
    name = template or page
    fragment = request.headers.get("hx-request") == "true" and name != "login"
    session = request.scope.get("session", {})
    base = {
        "page": page,
        "nav": NAV,
        "user": getattr(request.state, "user", None),
        "csrf": auth.csrf_token(session) if name == "login" or getattr(request.state, "session", None) else "",
        "cursor": cursor,
        "store_path": str(_source(request).path),
        "notice": None,
    }
    return _templates.TemplateResponse(request, f"_{name}.html" if fragment else f"{name}.html", {**base, **context},
                                       status_code=status)


def _missing(request: Request, page: str, what: str, cursor: str) -> Response:
    return _render(request, page, {"what": what}, cursor=cursor, status=404, template="missing")


def _redirect(request: Request, route: str, query: dict[str, str] | None = None, **params: str) -> RedirectResponse:
    url = str(request.url_for(route, **params).path)
    return RedirectResponse(url + (f"?{urlencode(query)}" if query else ""), status_code=303)


async def _form(request: Request) -> dict[str, str] | Response:
    """The POSTed form, or a 403 when its csrf_token is not the session's."""
    form = await request.form()
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    if not auth.csrf_ok(request.session, values.get("csrf_token")):
        return PlainTextResponse("the form's CSRF token is missing or wrong: reload the page and try again", status_code=403)
    return values


def _audit(request: Request, admin: str, action: AdminActionKind, target: str | None = None, detail: str | None = None) -> None:
    """Append an audit-log row. Kept until the store exists, if it does not yet; kept too, and
    logged to stderr, if the store cannot be read or written (a login works all the same)."""
    source = _source(request)
    client = _client(request)
    try:
        store = source.get()
        if store is not None:
            store.record_action(admin, action, target, detail=detail, client=client)
            return
    except FedFaceError as exc:
        logger.error("console audit log: cannot write %s by %r from %s to the run store (%s: %s); kept until it can be",
                     action, admin, client, type(exc).__name__, exc)
        source.defer(admin, action, target, detail=detail, client=client, why="while the run store could not be written")
        return
    source.defer(admin, action, target, detail=detail, client=client)


# --- login -------------------------------------------------------------------------------------


def _login_page(request: Request, error: str | None = None, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = _render(request, "login", {"error": error}, cursor=encode_cursor(ZERO), status=status)
    response.headers.update(headers or {})
    return response


def _admin_file(request: Request) -> auth.AdminFile:
    return request.app.state.admin  # type: ignore[no-any-return]


def _sessions(request: Request) -> auth.Sessions:
    return request.app.state.sessions  # type: ignore[no-any-return]


def login_form(request: Request) -> Response:
    """The login page; it sets the session's pre-login CSRF token."""
    if _sessions(request).current(request.session, _admin_file(request).fingerprint()) is not None:
        return RedirectResponse("/runs", status_code=303)
    return _login_page(request)


async def login(request: Request) -> Response:
    """Check the form's CSRF token, count the attempt against the rate limit, then check the
    password (in a thread: ~0.2 s); a right one takes the count back and opens a session."""
    form = await _form(request)
    if isinstance(form, Response):
        return _login_page(request, "The login form expired: please try again.", status=403)
    user = form.get("username", "")[:MAX_USER]
    password = form.get("password", "")[:MAX_PASSWORD]
    limiter: auth.LoginLimiter = request.app.state.limiter
    attempt = limiter.reserve(_client(request), user)
    if isinstance(attempt, int):
        return _login_page(request, f"Too many failed logins: try again in {attempt} s.", status=429,
                           headers={"Retry-After": str(attempt)})
    try:
        admin, fingerprint = await run_in_threadpool(_admin_file(request).current)
    except KeyFileError as exc:
        limiter.cancel(attempt)
        logger.error("console login impossible: %s", exc)
        return _login_page(request, "The console's admin file cannot be read: see the console's log.", status=500)
    if not await run_in_threadpool(auth.verify_password, admin, user, password):
        await run_in_threadpool(_audit, request, user or "(none)", "login-failed", None, "wrong user name or password")
        return _login_page(request, "Wrong user name or password.", status=401)
    limiter.succeeded(attempt)
    _sessions(request).start(request.session, admin.user, fingerprint)
    await run_in_threadpool(_audit, request, admin.user, "login")
    return RedirectResponse("/runs", status_code=303)


async def logout(request: Request) -> Response:
    """End the session (CSRF-checked; every copy of its cookie stops working) and log it."""
    form = await _form(request)
    if isinstance(form, Response):
        return form
    await run_in_threadpool(_audit, request, _user(request), "logout")
    _sessions(request).end(request.session)
    return RedirectResponse("/login", status_code=303)


# --- pages -------------------------------------------------------------------------------------


def home(request: Request) -> Response:
    """``/``: the runs page."""
    return RedirectResponse("/runs", status_code=303)


def runs_page(request: Request) -> Response:
    """Every run: status, data, strategy, epsilon, start and end, progress."""
    store, cursor = _open(request)
    rows = queries.run_rows(store) if store is not None else []
    return _render(request, "runs", {"rows": rows, "has_store": store is not None}, cursor=cursor)


def run_page(request: Request, run_id: str) -> Response:
    """One run: its summary, the round timeline and the metric chart; the stop button while it runs."""
    store, cursor = _open(request)
    if store is None:
        return _missing(request, "run", f"run {run_id}", cursor)
    try:
        run, rows = queries.run_timeline(store, run_id)
    except RunDirError:
        return _missing(request, "run", f"run {run_id}", cursor)
    info = next((r for r in queries.run_rows(store) if r.run.run_id == run_id), None)
    context = {
        "run": run,
        "info": info,
        "rows": rows,
        "stop": store.stop_requested(run_id),
        "chart": views.metrics_chart(rows, queries.metric_series(rows)),
        "columns": views.timeline_metrics(run.config, rows),
        "notice": _notice(request, run_id),
    }
    return _render(request, "run", context, cursor=cursor)


def sites_page(request: Request) -> Response:
    """Every site seen in the store: rounds joined and refused, policy, suspension."""
    store, cursor = _open(request)
    rows = queries.site_rows(store) if store is not None else []
    site = request.query_params.get("site")
    known = {r.site for r in rows}
    context = {"rows": rows, "has_store": store is not None, "notice": _notice(request, site if site in known else None)}
    return _render(request, "sites", context, cursor=cursor)


def privacy_page(request: Request) -> Response:
    """Each site's epsilon over the run's rounds against its budget, per run and lifetime: the
    privacy report's own figures (:func:`privacy_report_for_run`)."""
    store, cursor = _open(request)
    runs = queries.run_rows(store) if store is not None else []
    wanted = request.query_params.get("run") or (runs[0].run.run_id if runs else None)
    context: dict[str, Any] = {"runs": runs, "run_id": wanted, "report": None, "error": None, "chart": None, "accuracy": None,
                               "has_store": store is not None,
                               # the report's rounding, toward more privacy loss: a noise multiplier
                               # down, a sample rate up (as `fedface report privacy` writes them)
                               "sig_down": lambda value: format_up(value, 4, down=True),
                               "sig_up": lambda value: format_up(value, 4)}
    if store is not None and wanted is not None:
        if wanted not in {r.run.run_id for r in runs}:
            return _missing(request, "privacy", f"run {wanted}", cursor)
        settings = _settings(request)
        try:
            report = privacy_report_for_run(_source(request).path, run_id=wanted, ledger_dir=settings.ledger_dir)
        except FedFaceError as exc:
            context["error"] = f"{type(exc).__name__}: {exc}"
        else:
            context.update(report=report, chart=views.epsilon_chart(report), caption=views.epsilon_caption(report),
                           accuracy=views.accuracy_chart(report))
    return _render(request, "privacy", context, cursor=cursor)


def gallery_page(request: Request) -> Response:
    """Template counts per site and version of the encrypted gallery (never a template)."""
    _, cursor = _open(request)
    directory = _settings(request).gallery
    context: dict[str, Any] = {"directory": str(directory) if directory else None, "gallery": None, "error": None,
                               "sites": [], "events": []}
    if directory is not None:
        try:
            gallery = queries.gallery_rows(directory)
        except TemplateError as exc:
            context["error"] = str(exc)
        else:
            per_site: Counter[str] = Counter()
            for v in gallery["versions"]:
                per_site[str(v["site"])] += int(v["templates"])
            events = Counter((str(e["kind"]), str(e["outcome"])) for e in gallery["events"])
            context.update(gallery=gallery, sites=sorted(per_site.items()), events=sorted(events.items()))
    return _render(request, "gallery", context, cursor=cursor)


def audit_page(request: Request) -> Response:
    """The audit log, newest first."""
    store, cursor = _open(request)
    rows = queries.audit_rows(store) if store is not None else []
    return _render(request, "audit", {"rows": rows, "has_store": store is not None}, cursor=cursor)


# --- actions -----------------------------------------------------------------------------------


async def _action_store(request: Request, back: str) -> tuple[RunStore, dict[str, str]] | Response:
    """The run store an action writes to and the form, once the form's CSRF token is checked;
    else the response (403, or back to the ``back`` page when there is no store yet)."""
    form = await _form(request)
    if isinstance(form, Response):
        return form
    store = _source(request).get()
    return _redirect(request, back, {"notice": "no-store"}) if store is None else (store, form)


async def stop_run(request: Request) -> Response:
    """Ask the server to stop a running run before its next round."""
    got = await _action_store(request, "runs_page")
    if isinstance(got, Response):
        return got
    store, _ = got
    run_id = request.path_params["run_id"]
    try:
        await run_in_threadpool(lambda: store.record_action(_user(request), "stop-run", run_id, client=_client(request)))
    except RunDirError:
        return _redirect(request, "runs_page", {"notice": "no-run"})
    except ConfigError:
        return _redirect(request, "run_page", {"notice": "not-running"}, run_id=run_id)
    return _redirect(request, "run_page", {"notice": "stop-requested"}, run_id=run_id)


async def _site_action(request: Request, action: AdminActionKind) -> Response:
    """Suspend or resume the site the form's ``site`` field names (any name a site reported)."""
    got = await _action_store(request, "sites_page")
    if isinstance(got, Response):
        return got
    store, form = got
    site = form.get("site", "")[:MAX_SITE]

    def act() -> str:
        if not site or site not in {r.site for r in queries.site_rows(store)}:
            return "unknown-site"
        suspended = site in store.suspended_sites()
        if action == "suspend-site" and suspended:
            return "already-suspended"
        if action == "resume-site" and not suspended:
            return "not-suspended"
        store.record_action(_user(request), action, site, client=_client(request))
        return "suspended" if action == "suspend-site" else "resumed"

    notice = await run_in_threadpool(act)
    return _redirect(request, "sites_page", {"notice": notice, "site": site})


async def suspend_site(request: Request) -> Response:
    """Suspend a site: the server does not sample it until it is resumed."""
    return await _site_action(request, "suspend-site")


async def resume_site(request: Request) -> Response:
    """Resume a suspended site."""
    return await _site_action(request, "resume-site")


async def events(request: Request) -> Response:
    """The live feed (:mod:`.feed`): from ``Last-Event-ID`` when the browser resumes, else from
    the cursor the page was rendered at (``?after=``), else from now; it ends with the session
    (logout, expiry, a replaced administrator), checked before each poll."""
    last = request.headers.get("last-event-id")
    if last is None:
        last = request.query_params.get("after")
    settings = _settings(request)
    session: auth.Session = request.state.session  # LoginRequired checked it
    sessions, admin = _sessions(request), _admin_file(request)

    def alive() -> bool:
        return sessions.alive(session.sid, admin.fingerprint())

    return EventSourceResponse(change_events(_source(request), last, poll_s=settings.poll_s, alive=alive), ping=15)


async def error_page(request: Request, exc: Exception) -> Response:
    """A fedface error while serving (an unreadable run store ...): its one line inside the
    page layout, as a 500 (only the line for ``/events`` and a POST)."""
    line = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    logger.error("console: %s", line)
    if request.method != "GET" or request.url.path == "/events":
        return PlainTextResponse(line, status_code=500)
    return _render(request, "error", {"error": line}, cursor=encode_cursor(ZERO), status=500)


def add_routes(app: FastAPI) -> None:
    """Register the console's routes on ``app``, and :func:`error_page` for every fedface error."""
    app.add_exception_handler(FedFaceError, error_page)
    get, post = ["GET"], ["POST"]
    for path, endpoint, methods in (
        ("/", home, get),
        ("/login", login_form, get),
        ("/login", login, post),
        ("/logout", logout, post),
        ("/runs", runs_page, get),
        ("/runs/{run_id}", run_page, get),
        ("/runs/{run_id}/stop", stop_run, post),
        ("/sites", sites_page, get),
        ("/sites/suspend", suspend_site, post),
        ("/sites/resume", resume_site, post),
        ("/privacy", privacy_page, get),
        ("/gallery", gallery_page, get),
        ("/audit", audit_page, get),
        ("/events", events, get),
    ):
        app.add_api_route(path, endpoint, methods=methods, name=endpoint.__name__, include_in_schema=False)


__all__ = ["MAX_SITE", "NAV", "NOTICES", "add_routes", "error_page"]
