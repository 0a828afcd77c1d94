"""Unit tests of the admin web console (fedface.server.console) over HTTP, in process.

Starlette's TestClient drives the real app against a real run store filled through the
RunStore API (a running run with a refusal and a failure, a finished one) and a real admin
directory (argon2id; a cheap hasher for speed, given explicitly). Covered: login (right and
wrong password, its CSRF token), the rate limit (per address and name, per address, the
per-name slow-down, parallel guesses, its memory), server-side sessions (logout, expiry, a
replaced admin, a restart end them; a copied cookie is worth nothing after), nothing but
/login and /static without a session, CSRF on every POST, the Host check, the POST body's size
and type, the actions as the ServerApp sees them (stop, suspend, resume a site of any name),
the pages' stable hooks and numbers, the privacy page against the privacy report, an
unreadable store, the audit rows kept before the store exists, security headers, session
cookie flags, no secret in any page, the live feed (Last-Event-ID resume, a new round's
event, its end with the session), and the `fedface console` commands (no proxy headers,
--allowed-host).
"""

from __future__ import annotations

import asyncio
import hashlib
import html as html_lib
import json
import math
import re
import stat
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from argon2 import PasswordHasher
from typer.testing import CliRunner

from fedface.common import wire
from fedface.common.errors import KeyFileError
from fedface.common.privacy.accounting import format_epsilon
from fedface.server.console import auth
from fedface.server.console.app import CSP, create_app
from fedface.server.console.feed import change_events, encode_cursor, parse_cursor, start_cursor
from fedface.server.console.sources import Settings, StoreSource
from fedface.server.reports.privacy import privacy_report_for_run
from fedface.server.reports.sections import format_up
from fedface.server.store import Participation, RunStore
from fedface.simulations.cli import app as cli

with warnings.catch_warnings():  # Starlette 1.x warns that its TestClient will move to httpx2 (third-party)
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

PASSWORD = "correct horse battery staple"
CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)  # tests only: production uses the defaults
RUN, OLD = "run-live", "run-old"
SITES = ("site-a", "site-b", "site-c")
EPS = {"site-a": [0.1 + 0.2, 1.2345678901234567], "site-b": [2.0000000000000004], "site-c": [7.9999999999999982]}
POLICY = {"budget-epsilon": 10.0, "delta": 1e-5, "accountant": "rdp", "epsilon-per-run": None, "require-secagg": True,
          "min-peers": 3, "allow-non-private": False}
html_escape, html_unescape = html_lib.escape, html_lib.unescape
PAGES = ("/", "/runs", f"/runs/{RUN}", "/sites", f"/privacy?run={RUN}", "/gallery", "/audit")


def _spent(site: str, status: str, eps: float, **kw: Any) -> Participation:
    return Participation(site, status, delta=1e-5, accountant="rdp", epsilon=eps, budget_epsilon=10.0,  # type: ignore[arg-type]
                         remaining=10.0 - eps, **kw)


def _fill(store: RunStore) -> None:
    """A finished run, then a running one: round 1 all answer; round 2 site-b refuses (budget
    exhausted), site-c fails (timeout)."""
    config = {"data": {"root": "/faces/orl"}, "federation": {"strategy": "fedavg"}, "privacy": {"epsilon": 8.0}}
    store.start_run(OLD, config=config, sites=3, rounds=1, secagg=False, started_at="2026-05-09T09:00:00+00:00")
    store.record_round(OLD, 1, started_at="2026-05-09T09:01:00+00:00", seconds=3.0, sampled=list(SITES),
                       participation=[Participation(s, "answered", examples=10) for s in SITES], metrics={"verif_acc": 0.6})
    store.finish_run(OLD, status="completed")
    store.start_run(RUN, config=config, sites=3, rounds=3, secagg=True, started_at="2026-05-09T10:00:00+00:00")
    store.record_round(RUN, 1, started_at="2026-05-09T10:01:00+00:00", seconds=12.5, sampled=list(SITES), participation=[
        _spent("site-a", "answered", EPS["site-a"][0], examples=40), _spent("site-b", "answered", EPS["site-b"][0], examples=35),
        _spent("site-c", "answered", EPS["site-c"][0], examples=50)],
        metrics={"verif_acc": 0.71, "verif_auc": 0.8, "verif_eer": 0.25}, reports={
        s: {"policy": json.dumps(POLICY)} for s in SITES})
    store.record_round(RUN, 2, started_at="2026-05-09T10:02:00+00:00", seconds=11.0, sampled=list(SITES), participation=[
        _spent("site-a", "answered", EPS["site-a"][1], examples=40), Participation("site-b", "refused", reason="budget exhausted"),
        Participation("site-c", "failed", reason="timeout after 60 s")], metrics={"verif_acc": 0.74, "verif_auc": float("nan")})


@pytest.fixture(scope="module")
def admin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("admin")
    auth.init_admin(directory, user="admin", password=PASSWORD, hasher=CHEAP)
    return directory


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    with RunStore(tmp_path / "run" / "runs.sqlite") as store:
        _fill(store)
    yield tmp_path / "run"


def _settings(store: Path, admin_dir: Path, **kw: Any) -> Settings:
    return Settings(store=store, admin_dir=admin_dir, poll_s=0.01, allowed_hosts=("testserver",), **kw)


@pytest.fixture
def client(run_dir: Path, admin_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(run_dir, admin_dir)), follow_redirects=False) as c:
        yield c


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no csrf_token in the form"
    return match.group(1)


def _login(c: TestClient, password: str = PASSWORD, user: str = "admin") -> Any:
    token = _csrf(c.get("/login").text)
    return c.post("/login", data={"username": user, "password": password, "csrf_token": token})


def _store(run_dir: Path) -> RunStore:
    return RunStore(run_dir / "runs.sqlite", create=False)


# --- login -------------------------------------------------------------------------------------


def test_login_with_the_right_password_opens_a_session_and_is_audited(client: TestClient, run_dir: Path) -> None:
    response = _login(client)

    assert response.status_code == 303 and response.headers["location"] == "/runs"
    assert client.get("/runs").status_code == 200
    with _store(run_dir) as store:
        [action] = store.actions()
    assert (action.action, action.admin, action.client) == ("login", "admin", "testclient")


def test_a_wrong_password_is_401_audited_and_never_stored(client: TestClient, run_dir: Path) -> None:
    response = _login(client, password="not the password at all")

    assert response.status_code == 401
    assert 'id="login-error"' in response.text and 'data-page="login"' in response.text
    assert client.get("/runs").status_code == 303
    with _store(run_dir) as store:
        [action] = store.actions()
    assert (action.action, action.admin, action.detail) == ("login-failed", "admin", "wrong user name or password")
    assert "not the password" not in (run_dir / "runs.sqlite").read_bytes().decode("latin-1")


def test_failed_logins_are_rate_limited_with_retry_after(run_dir: Path, admin_dir: Path) -> None:
    with TestClient(create_app(_settings(run_dir, admin_dir, login_limit=3)), follow_redirects=False) as c:
        codes = [_login(c, password=f"wrong password {i}").status_code for i in range(3)]
        limited = _login(c)  # even the right password, once limited

    assert codes == [401, 401, 401]
    assert limited.status_code == 429
    assert 0 < int(limited.headers["retry-after"]) <= 300
    assert "Too many failed logins" in limited.text and 'id="login-error"' in limited.text


def test_the_limiter_holds_an_address_per_user_name_in_a_sliding_window() -> None:
    now = [0.0]
    limiter = auth.LoginLimiter(limit=2, window_s=60, clock=lambda: now[0])
    assert isinstance(limiter.reserve("10.0.0.1", "admin"), auth.Reservation)
    assert isinstance(limiter.reserve("10.0.0.1", "admin"), auth.Reservation)

    assert limiter.reserve("10.0.0.1", "admin") == 61  # that address, that user name
    assert isinstance(limiter.reserve("10.0.0.2", "admin"), auth.Reservation)  # another address is not locked out
    assert isinstance(limiter.reserve("10.0.0.1", "other"), auth.Reservation)  # nor another name from it
    now[0] = 60.0
    assert isinstance(limiter.reserve("10.0.0.1", "admin"), auth.Reservation)  # the failures left the window


def test_the_limiter_holds_one_address_over_every_user_name_and_an_ipv6_host_by_its_64() -> None:
    limiter = auth.LoginLimiter(limit=5, window_s=60, address_limit=3, clock=lambda: 0.0)
    for i in range(3):
        assert isinstance(limiter.reserve(f"2001:db8::{i + 1}", f"user-{i}"), auth.Reservation)

    assert limiter.reserve("2001:db8::ffff", "user-9") == 61  # the same /64: the same address
    assert isinstance(limiter.reserve("2001:db8:0:1::1", "user-9"), auth.Reservation)  # another /64
    assert auth.address_key("::ffff:10.0.0.1") == "10.0.0.1" and auth.address_key("testclient") == "testclient"


def test_the_limiter_only_slows_a_user_name_attacked_from_many_addresses() -> None:
    now = [0.0]
    limiter = auth.LoginLimiter(limit=5, window_s=300, user_limit=4, user_backoff_s=10, clock=lambda: now[0])
    for i in range(4):
        assert isinstance(limiter.reserve(f"198.51.100.{i}", "admin"), auth.Reservation)

    assert limiter.reserve("198.51.100.0", "admin") == 11  # an address that failed for it waits the back-off
    fresh = limiter.reserve("192.0.2.7", "admin")  # the administrator, from an address that never failed
    assert isinstance(fresh, auth.Reservation)
    limiter.succeeded(fresh)
    now[0] = 10.0
    assert isinstance(limiter.reserve("198.51.100.0", "admin"), auth.Reservation)  # slowed, not locked


def test_a_right_password_takes_its_reserved_attempt_back() -> None:
    limiter = auth.LoginLimiter(limit=2, window_s=60, clock=lambda: 0.0)
    first = limiter.reserve("10.0.0.1", "admin")
    assert isinstance(first, auth.Reservation)
    second = limiter.reserve("10.0.0.1", "admin")
    assert isinstance(second, auth.Reservation)

    limiter.succeeded(second)

    assert len(limiter) == 2  # the first failure still counts for the address and the name; the pair is forgotten
    assert isinstance(limiter.reserve("10.0.0.1", "admin"), auth.Reservation)
    assert isinstance(limiter.reserve("10.0.0.1", "admin"), auth.Reservation)


def test_the_limiter_sweeps_expired_keys_and_refuses_beyond_its_cap() -> None:
    now = [0.0]
    limiter = auth.LoginLimiter(limit=5, window_s=300, max_keys=100, clock=lambda: now[0])
    answers = [limiter.reserve(f"10.0.{i >> 8}.{i & 255}", f"user-{i:058d}") for i in range(1000)]  # forged names and addresses

    assert len(limiter) <= 100
    assert sum(isinstance(a, auth.Reservation) for a in answers) == 33  # three keys each: an address, a name, the pair
    assert all(isinstance(a, int) and 1 <= a <= 301 for a in answers[33:])
    now[0] = 10_000.0  # long after every window
    assert isinstance(limiter.reserve("10.9.9.9", "admin"), auth.Reservation)
    assert len(limiter) == 3


def _async_client(app: Any, address: str) -> Any:
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 50000)), base_url="http://testserver",
                             follow_redirects=False)


async def _async_login(c: Any, password: str = PASSWORD, user: str = "admin") -> Any:
    token = _csrf((await c.get("/login")).text)
    return await c.post("/login", data={"username": user, "password": password, "csrf_token": token})


def test_parallel_wrong_guesses_are_counted_before_their_password_is_checked(run_dir: Path, admin_dir: Path) -> None:
    app = create_app(_settings(run_dir, admin_dir))

    async def scenario() -> list[int]:
        async with _async_client(app, "198.51.100.1") as c:
            token = _csrf((await c.get("/login")).text)
            answers = await asyncio.gather(*[
                c.post("/login", data={"username": "admin", "password": f"guess-{i:08d}", "csrf_token": token}) for i in range(40)])
        return [a.status_code for a in answers]

    codes = asyncio.run(scenario())

    assert sorted(codes) == [401] * 5 + [429] * 35  # only the first five were checked
    with _store(run_dir) as store:
        assert [a.action for a in store.actions()] == ["login-failed"] * 5


def test_a_locked_out_address_does_not_lock_the_admin_out_from_another(run_dir: Path, admin_dir: Path) -> None:
    app = create_app(_settings(run_dir, admin_dir))

    async def scenario() -> tuple[list[int], int, int]:
        async with _async_client(app, "203.0.113.9") as attacker, _async_client(app, "192.0.2.7") as admin:
            codes = [(await _async_login(attacker, password=f"wrong password {i}")).status_code for i in range(6)]
            held = (await _async_login(attacker)).status_code  # even the right password, from that address
            return codes, held, (await _async_login(admin)).status_code

    codes, held, admin = asyncio.run(scenario())

    assert codes == [401] * 5 + [429] and held == 429
    assert admin == 303
    with _store(run_dir) as store:
        assert [(a.action, a.client) for a in store.actions()][0] == ("login", "192.0.2.7")


def test_the_login_form_needs_its_own_csrf_token(client: TestClient, run_dir: Path) -> None:
    client.get("/login")

    response = client.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": "forged"})

    assert response.status_code == 403
    assert client.get("/runs").status_code == 303
    with _store(run_dir) as store:
        assert store.actions() == []


def test_logout_ends_the_session(client: TestClient, run_dir: Path) -> None:
    _login(client)
    token = _csrf(client.get("/runs").text)

    assert client.post("/logout", data={"csrf_token": token}).headers["location"] == "/login"
    assert client.get("/runs").status_code == 303
    with _store(run_dir) as store:
        assert [a.action for a in store.actions()] == ["logout", "login"]


def _assert_the_session_is_dead(c: TestClient, token: str, run_dir: Path) -> None:
    """The session of ``c`` (its CSRF token ``token``) reads no page and suspends no site."""
    page = c.get("/sites")
    action = c.post("/sites/suspend", data={"csrf_token": token, "site": "site-a"})

    assert page.status_code == 303 and page.headers["location"] == "/login"
    assert action.status_code == 401
    with _store(run_dir) as store:
        assert store.suspended_sites() == {}


def test_a_copied_session_cookie_is_worth_nothing_after_logout(run_dir: Path, admin_dir: Path) -> None:
    app = create_app(_settings(run_dir, admin_dir))
    with TestClient(app, follow_redirects=False) as c:
        _login(c)
        token = _csrf(c.get("/sites").text)
        copied = c.cookies.get(auth.SESSION_COOKIE)
        c.post("/logout", data={"csrf_token": token})
    with TestClient(app, follow_redirects=False, cookies={auth.SESSION_COOKIE: copied}) as thief:
        _assert_the_session_is_dead(thief, token, run_dir)


@pytest.mark.parametrize(("user", "password"), [("root", "another long password"), ("admin", "a new password for admin")])
def test_replacing_the_admin_ends_every_session_of_the_old_one(run_dir: Path, tmp_path: Path, user: str, password: str) -> None:
    admin_dir = tmp_path / "admin"
    auth.init_admin(admin_dir, user="admin", password=PASSWORD, hasher=CHEAP)
    with TestClient(create_app(_settings(run_dir, admin_dir)), follow_redirects=False) as c:
        _login(c)
        token = _csrf(c.get("/sites").text)
        auth.init_admin(admin_dir, user=user, password=password, force=True, hasher=CHEAP)  # init-admin --force

        _assert_the_session_is_dead(c, token, run_dir)

        assert _login(c, password=password, user=user).status_code == 303  # the new administrator logs in
        assert c.get("/sites").status_code == 200


def test_a_restart_ends_every_session(run_dir: Path, admin_dir: Path) -> None:
    with TestClient(create_app(_settings(run_dir, admin_dir)), follow_redirects=False) as c:
        _login(c)
        cookie = c.cookies.get(auth.SESSION_COOKIE)
    with TestClient(create_app(_settings(run_dir, admin_dir)), follow_redirects=False, cookies={auth.SESSION_COOKIE: cookie}) as c:
        assert c.get("/runs").headers["location"] == "/login"  # sessions live in the process that opened them


# --- nothing without a session -----------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_every_page_redirects_to_the_login_without_a_session(client: TestClient, path: str) -> None:
    response = client.get(path)

    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    assert "run-live" not in response.text


def test_the_feed_and_every_action_answer_401_without_a_session(client: TestClient, run_dir: Path) -> None:
    assert client.get("/events").status_code == 401
    for path in (f"/runs/{RUN}/stop", "/sites/suspend", "/sites/resume", "/logout"):
        assert client.post(path, data={"csrf_token": "x", "site": "site-a"}).status_code == 401, path
    with _store(run_dir) as store:
        assert store.actions() == [] and store.suspended_sites() == {}


def test_the_login_page_and_static_files_are_served_without_a_session(client: TestClient) -> None:
    assert client.get("/login").status_code == 200
    assert client.get("/static/console.js").status_code == 200
    assert client.get("/static/htmx.min.js").status_code == 200


@pytest.mark.parametrize(("path", "site"), [(f"/runs/{RUN}/stop", None), ("/sites/suspend", "site-a"), ("/sites/resume", "site-b"),
                                            ("/logout", None)])
@pytest.mark.parametrize("token", [None, "", "forged"])
def test_a_post_with_a_bad_or_missing_csrf_token_is_403_and_changes_nothing(
    client: TestClient, run_dir: Path, path: str, site: str | None, token: str | None
) -> None:
    _login(client)
    with _store(run_dir) as store:
        store.record_action("admin", "suspend-site", "site-b")
    data = ({} if token is None else {"csrf_token": token}) | ({} if site is None else {"site": site})

    response = client.post(path, data=data)

    assert response.status_code == 403
    with _store(run_dir) as store:
        assert [a.action for a in store.actions()] == ["suspend-site", "login"]
        assert store.stop_requested(RUN) is None and set(store.suspended_sites()) == {"site-b"}
    assert client.get("/runs").status_code == 200  # still logged in


# --- actions -----------------------------------------------------------------------------------


def test_stop_run_records_the_request_the_running_server_sees(client: TestClient, run_dir: Path) -> None:
    _login(client)
    token = _csrf(client.get(f"/runs/{RUN}").text)
    assert 'id="stop-run"' in client.get(f"/runs/{RUN}").text

    response = client.post(f"/runs/{RUN}/stop", data={"csrf_token": token})

    assert response.status_code == 303 and response.headers["location"] == f"/runs/{RUN}?notice=stop-requested"
    with _store(run_dir) as store:  # what FedFaceRounds.filter_sampled asks before each round
        stop = store.stop_requested(RUN)
    assert stop is not None and (stop.admin, stop.client) == ("admin", "testclient")
    page = client.get(response.headers["location"]).text
    assert "Stop requested for run run-live" in page and 'id="stop-run"' not in page


def test_stopping_a_run_that_is_not_running_is_a_notice_not_an_error(client: TestClient, run_dir: Path) -> None:
    _login(client)
    token = _csrf(client.get("/runs").text)

    finished = client.post(f"/runs/{OLD}/stop", data={"csrf_token": token})
    unknown = client.post("/runs/nope/stop", data={"csrf_token": token})

    assert finished.headers["location"] == f"/runs/{OLD}?notice=not-running"
    assert "is not running" in client.get(finished.headers["location"]).text
    assert unknown.headers["location"] == "/runs?notice=no-run"
    with _store(run_dir) as store:
        assert [a.action for a in store.actions()] == ["login"]


def test_suspend_then_resume_a_site(client: TestClient, run_dir: Path) -> None:
    _login(client)
    token = _csrf(client.get("/sites").text)

    suspended = client.post("/sites/suspend", data={"csrf_token": token, "site": "site-b"})
    with _store(run_dir) as store:
        assert set(store.suspended_sites()) == {"site-b"}
    page = client.get(suspended.headers["location"]).text
    again = client.post("/sites/suspend", data={"csrf_token": token, "site": "site-b"})
    resumed = client.post("/sites/resume", data={"csrf_token": token, "site": "site-b"})

    assert suspended.headers["location"] == "/sites?notice=suspended&site=site-b"
    row = re.search(r'<tr data-site="site-b">(.*?)</tr>', page, re.S).group(1)  # type: ignore[union-attr]
    assert re.search(r'form method="post" action="/sites/resume" class="resume-site">.*?name="site" value="site-b"', row, re.S)
    assert again.headers["location"].startswith("/sites?notice=already-suspended")
    assert resumed.headers["location"].startswith("/sites?notice=resumed")
    with _store(run_dir) as store:
        assert store.suspended_sites() == {}
        actions = store.actions()
    assert [(a.action, a.target, a.client) for a in actions[:2]] == [
        ("resume-site", "site-b", "testclient"), ("suspend-site", "site-b", "testclient")]


def test_an_unknown_site_cannot_be_suspended(client: TestClient, run_dir: Path) -> None:
    _login(client)
    token = _csrf(client.get("/sites").text)

    response = client.post("/sites/suspend", data={"csrf_token": token, "site": "site-z"})
    missing = client.post("/sites/suspend", data={"csrf_token": token})

    assert response.headers["location"].startswith("/sites?notice=unknown-site")
    assert missing.headers["location"].startswith("/sites?notice=unknown-site")
    with _store(run_dir) as store:
        assert store.suspended_sites() == {}


@pytest.mark.parametrize("name", ["evil/x", "..", "a b?c=d#e", "%2e%2e"])
def test_a_site_is_suspended_and_resumed_whatever_name_it_chose(client: TestClient, run_dir: Path, name: str) -> None:
    with _store(run_dir) as store:
        store.record_round(RUN, 3, started_at="2026-05-09T10:03:00+00:00", seconds=1.0, sampled=[name],
                           participation=[Participation(name, "answered", examples=1)], metrics={})
    _login(client)
    html = client.get("/sites").text
    row = html[html.index(f'<tr data-site="{html_escape(name)}">'):]
    form = re.search(r'<form method="post" action="([^"]+)" class="suspend-site">.*?name="site" value="([^"]*)"', row, re.S)
    assert form is not None

    suspended = client.post(form.group(1), data={"csrf_token": _csrf(html), "site": html_unescape(form.group(2))})
    with _store(run_dir) as store:
        after_suspend = set(store.suspended_sites())
    resumed = client.post("/sites/resume", data={"csrf_token": _csrf(html), "site": name})

    assert form.group(1) == "/sites/suspend"
    assert suspended.status_code == 303 and suspended.headers["location"].startswith("/sites?notice=suspended&site=")
    assert after_suspend == {name}
    assert f"Site {html_escape(name)} suspended" in client.get(suspended.headers["location"]).text
    assert resumed.headers["location"].startswith("/sites?notice=resumed")
    with _store(run_dir) as store:
        assert store.suspended_sites() == {}


# --- pages -------------------------------------------------------------------------------------


def test_the_runs_page_lists_each_run_with_its_hooks(client: TestClient) -> None:
    _login(client)

    html = client.get("/runs").text

    assert 'data-page="runs"' in html and 'id="runs-table"' in html
    rows = re.findall(r'<tr data-run-id="([^"]+)">(.*?)</tr>', html, re.S)
    assert [r for r, _ in rows] == [RUN, OLD]  # newest first
    live = rows[0][1]
    assert re.search(r'data-field="status"><span class="badge badge-running">running<', live)
    assert re.search(r'data-field="rounds-done" class="num">2<', live)
    assert '<progress class="progress" max="3" value="2">' in live


def test_the_run_page_shows_the_timeline_refusals_and_chart_data(client: TestClient) -> None:
    _login(client)

    html = client.get(f"/runs/{RUN}").text

    assert 'data-page="run"' in html and 'id="timeline"' in html
    rounds = dict(re.findall(r'<tr data-round="(\d+)"[^>]*>(.*?)</tr>', html, re.S))
    assert sorted(rounds) == ["1", "2"]
    assert "budget exhausted" in rounds["2"] and "timeout after 60 s" in rounds["2"]
    assert re.search(r'data-field="dropouts">1<', rounds["2"])  # the failed site
    chart = json.loads(re.search(r'<script type="application/json" id="chart-metrics-data">(.*?)</script>', html, re.S).group(1))
    assert '<canvas id="chart-metrics"' in html
    by_key = {d["key"]: d["data"] for d in chart["datasets"]}
    assert by_key["verif_acc"] == [0.71, 0.74] and by_key["verif_auc"] == [0.8, None]  # NaN as null


def test_an_expression_run_page_shows_and_charts_expression_metrics(run_dir: Path, admin_dir: Path) -> None:
    # Arrange: a federated expression run (fedface simulate --task expression) reports no verification
    with _store(run_dir) as store:
        store.start_run("expr", config={"training": {"task": "expression"}}, sites=3, rounds=2, secagg=True,
                        started_at="2026-05-09T11:00:00+00:00")
        mechanism = {wire.M_NOISE: 1.1, wire.M_SAMPLE_RATE: 0.1, wire.M_STEPS: 100, wire.M_CLIP: 1.0}
        for rnd, (acc, f1) in enumerate(((0.41, 0.35), (0.47, 0.4)), start=1):
            store.record_round("expr", rnd, started_at=f"2026-05-09T11:0{rnd}:00+00:00", seconds=90.0, sampled=list(SITES),
                               participation=[_spent(s, "answered", 1.5 * rnd, examples=2500) for s in SITES],
                               metrics={"expression_acc": acc, "expression_macro_f1": f1}, reports={s: dict(mechanism) for s in SITES})

    with TestClient(create_app(_settings(run_dir, admin_dir)), follow_redirects=False) as c:
        _login(c)
        html = c.get("/runs/expr").text
        identity = c.get(f"/runs/{RUN}").text
        privacy = html_unescape(c.get("/privacy?run=expr").text)

    # its timeline's columns are the expression figures, not empty verification columns
    rounds = dict(re.findall(r'<tr data-round="(\d+)"[^>]*>(.*?)</tr>', html, re.S))
    assert 'data-field="expression_acc" data-value="0.47"' in rounds["2"]
    assert 'data-field="verif_acc"' not in html and ">Macro-F1<" in html
    chart = json.loads(re.search(r'<script type="application/json" id="chart-metrics-data">(.*?)</script>', html, re.S).group(1))
    by_key = {d["key"]: d["data"] for d in chart["datasets"]}
    assert by_key == {"expression_acc": [0.41, 0.47], "expression_macro_f1": [0.35, 0.4]}
    # an identity run keeps its verification columns
    assert 'data-field="verif_acc"' in identity and 'data-field="expression_acc"' not in identity
    # before its first round, a run's config says which columns it will fill
    from fedface.server.console.views import EXPRESSION_TIMELINE_METRICS, TIMELINE_METRICS, timeline_metrics

    assert timeline_metrics({"training": {"task": "expression"}}, []) == EXPRESSION_TIMELINE_METRICS
    assert timeline_metrics({}, []) == TIMELINE_METRICS
    # the privacy page plots and names the expression figures against epsilon
    accuracy = json.loads(re.search(r'id="chart-accuracy-epsilon-data">(.*?)</script>', privacy, re.S).group(1))
    assert [d["key"] for d in accuracy["datasets"]] == ["expression_acc", "expression_macro_f1"]
    assert "the server's expression accuracy and macro-F1 on held-out images" in privacy and "verification accuracy and AUC" not in privacy


def test_an_unknown_run_is_404_not_an_error(client: TestClient) -> None:
    _login(client)

    response = client.get("/runs/nope")

    assert response.status_code == 404 and "There is no run nope" in response.text


def test_htmx_gets_only_the_live_fragment(client: TestClient) -> None:
    _login(client)

    fragment = client.get(f"/runs/{RUN}", headers={"HX-Request": "true"}).text

    assert fragment.lstrip().startswith('<section id="run" class="live"')
    assert "<html" not in fragment and 'hx-trigger="fedface:update from:body' in fragment


def test_the_sites_page_shows_joins_refusals_policy_and_actions(client: TestClient) -> None:
    _login(client)

    html = client.get("/sites").text

    rows = dict(re.findall(r'<tr data-site="([^"]+)">(.*?)</tr>', html, re.S))
    assert sorted(rows) == list(SITES)
    assert "budget exhausted" in rows["site-b"] and 'class="suspend-site"' in rows["site-b"]
    assert re.search(r'data-field="rounds-joined">3<', rows["site-a"])  # one in each run, two in the live one
    assert "min-peers</span> 3" in rows["site-c"]
    assert f'value="{_csrf(html)}"' in rows["site-a"]


def test_the_privacy_page_shows_the_privacy_reports_figures(client: TestClient, run_dir: Path) -> None:
    _login(client)
    report = privacy_report_for_run(run_dir / "runs.sqlite", run_id=RUN)

    html = client.get(f"/privacy?run={RUN}").text

    assert 'data-page="privacy"' in html and '<canvas id="chart-epsilon"' in html
    for site in report["sites"]:
        row = re.search(rf'<tr data-site="{site["site"]}">(.*?)</tr>', html, re.S).group(1)  # type: ignore[union-attr]
        life = re.search(r'data-field="epsilon-lifetime" class="num" data-value="([^"]+)">([^<]+)<', row)
        assert life and float(life.group(1)) == site["epsilon"]["lifetime"]
        assert life.group(2) == format_epsilon(site["epsilon"]["lifetime"], rounding="up")
        left = re.search(r'data-field="remaining" class="num" data-value="([^"]+)">([^<]+)<', row)
        assert left and float(left.group(1)) == site["budget"]["remaining"]
        assert left.group(2) == format_epsilon(site["budget"]["remaining"], rounding="down")
        assert 'data-field="epsilon-run"' in row
    assert {s["site"]: s["epsilon"]["lifetime"] for s in report["sites"]} == {site: eps[-1] for site, eps in EPS.items()}
    assert re.search(r'id="chart-epsilon-caption">Solid: a site\'s lifetime epsilon after each round; dashed: its budget\.<', html.replace("&#39;", "'"))


def test_the_mechanism_table_rounds_the_sample_rate_up_and_the_noise_down(run_dir: Path, admin_dir: Path) -> None:
    # a sample rate of 1/3 and a noise multiplier of 2/3: neither has a short decimal
    q, sigma = 1 / 3, 2 / 3
    with _store(run_dir) as store:
        store.start_run("mech", config={}, sites=3, rounds=1, secagg=True, started_at="2026-05-09T12:00:00+00:00")
        mechanism = {wire.M_NOISE: sigma, wire.M_SAMPLE_RATE: q, wire.M_STEPS: 30, wire.M_CLIP: 1.0}
        store.record_round("mech", 1, started_at="2026-05-09T12:01:00+00:00", seconds=60.0, sampled=list(SITES),
                           participation=[_spent(s, "answered", 1.0, examples=90) for s in SITES],
                           metrics={"verif_acc": 0.8}, reports={s: dict(mechanism) for s in SITES})

    with TestClient(create_app(_settings(run_dir, admin_dir)), follow_redirects=False) as c:
        _login(c)
        html = c.get("/privacy?run=mech").text

    for site in SITES:
        row = re.search(rf'<tr data-mechanism-site="{site}">(.*?)</tr>', html, re.S).group(1)  # type: ignore[union-attr]
        rate = re.search(r'data-field="sample-rate" class="num" data-value="([^"]+)">([^<]+)<', row)
        assert rate and float(rate.group(1)) == q  # exact in data-value
        assert rate.group(2) == "0.3334" == format_up(q, 4)  # shown rounded up: more privacy loss, never less
        noise = re.search(r'class="num" data-value="([^"]+)">([^<]+)<', row)
        assert noise and float(noise.group(1)) == sigma and noise.group(2) == "0.6666"  # rounded down


def test_the_epsilon_caption_says_which_sites_have_no_budget_line(run_dir: Path) -> None:
    from fedface.server.console.views import epsilon_caption, epsilon_chart

    report = privacy_report_for_run(run_dir / "runs.sqlite", run_id=RUN)
    n = len(report["sites"])
    lines = [d for d in epsilon_chart(report)["datasets"] if d.get("budget")]
    assert lines and epsilon_caption(report).endswith("dashed: its budget.")

    report["sites"][0]["budget"]["epsilon"] = None  # none set
    report["sites"][1]["budget"]["epsilon"] = math.inf  # no limit: no line either
    assert len([d for d in epsilon_chart(report)["datasets"] if d.get("budget")]) == (1 if n > 2 else 0)
    assert f"(2 of {n} sites have no finite budget, so no line)" in epsilon_caption(report)

    for site in report["sites"]:
        site["budget"]["epsilon"] = None
    assert not [d for d in epsilon_chart(report)["datasets"] if d.get("budget")]
    assert epsilon_caption(report).endswith("no site has a finite budget, so no budget line is drawn.")

    for site in report["sites"]:  # no round yet: no line at all, budget or not
        site["budget"]["epsilon"], site["rounds"] = 8.0, []
    assert not epsilon_chart(report)["datasets"] or all(not any(v is not None for v in d["data"]) for d in epsilon_chart(report)["datasets"])
    assert epsilon_caption(report).endswith("no round has reported a spend yet, so nothing is drawn.")


def test_the_audit_page_lists_the_actions(client: TestClient) -> None:
    _login(client, password="a wrong password")
    _login(client)

    html = client.get("/audit").text

    assert re.findall(r'<tr data-action="([^"]+)">', html) == ["login", "login-failed"]
    assert 'id="audit-table"' in html


def test_the_gallery_page_says_when_there_is_none(client: TestClient, run_dir: Path, admin_dir: Path, tmp_path: Path) -> None:
    _login(client)
    assert "start the console with" in client.get("/gallery").text
    with TestClient(create_app(_settings(run_dir, admin_dir, gallery=tmp_path / "empty")), follow_redirects=False) as c:
        _login(c)
        html = c.get("/gallery").text
    assert 'data-page="gallery"' in html and "no gallery at" in html


def _small_gallery(root: Path) -> Path:
    """A real encrypted gallery: site-a enrolls 3 people (8-d templates) through the gallery's HTTP API."""
    from fedface.client.enroll import TemplateClient
    from fedface.client.gallery_client import GalleryClient
    from fedface.common.crypto import keyfiles as kf
    from fedface.common.crypto.envelope import new_signing_key
    from fedface.server.gallery import Gallery
    from fedface.server.keyholder import KeyHolder
    from fedface.server.services import KeyHolderLink, gallery_app, keyholder_app

    kf.create_template_keys(root / "holder", dim=8)
    pair = kf.create_signing_key(root / "site", "site-a")
    for registry in ("gallery-sites", "holder-sites"):
        (root / registry).mkdir()
        kf.SiteKeys(root / registry).register("site-a", pair.public_key)
    public, secret = kf.load_template_context(root / "holder"), kf.load_template_context(root / "holder", root / "holder")
    server_key = new_signing_key()
    holder = KeyHolder(root / "kh", secret, kf.SiteKeys(root / "holder-sites"), server_key.public_key(), seed=0)
    gallery = Gallery(root / "gallery", public, kf.SiteKeys(root / "gallery-sites"), signing_key=server_key, threshold=0.5,
                      keyholder=KeyHolderLink(TestClient(keyholder_app(holder))))
    templates = np.random.default_rng(0).normal(size=(3, 8))
    site = GalleryClient("http://testserver", TemplateClient("site-a", kf.load_signing_key(pair.private_key), public),
                         client=TestClient(gallery_app(gallery)), wire_log=root / "wire.jsonl")
    site.enroll(["ann", "bob", "cy"], (templates / np.linalg.norm(templates, axis=1, keepdims=True)).astype(np.float32), "enc-1")
    gallery.close()
    holder.close()
    return root / "gallery"


def test_the_gallery_page_shows_counts_per_site_and_version_only(run_dir: Path, admin_dir: Path, tmp_path: Path) -> None:
    directory = _small_gallery(tmp_path / "g")
    with TestClient(create_app(_settings(run_dir, admin_dir, gallery=directory)), follow_redirects=False) as c:
        _login(c)
        html = c.get("/gallery").text

    assert 'id="gallery-templates">3<' in html
    row = re.search(r'<tr data-site="site-a">(.*?)</tr>', html, re.S).group(1)  # type: ignore[union-attr]
    assert re.search(r'data-field="templates">3<', row) and "enc-1" in row
    for name in ("ann", "bob", "cy"):
        assert f">{name}<" not in html and f'"{name}"' not in html  # no identity, no template


def test_a_store_that_appears_later_is_picked_up_with_the_logins_before_it(tmp_path: Path, admin_dir: Path) -> None:
    run_dir = tmp_path / "later"
    with TestClient(create_app(_settings(run_dir, admin_dir)), follow_redirects=False) as c:
        _login(c, password="a wrong password")
        _login(c)  # no store yet: both kept until it appears
        before = c.get("/runs").text
        with RunStore(run_dir / "runs.sqlite") as store:
            _fill(store)
        after = c.get("/runs").text
        with _store(run_dir) as store:
            actions = store.actions()

    assert "No runs yet" in before
    assert f'data-run-id="{RUN}"' in after
    assert [a.action for a in actions] == ["login", "login-failed"]
    assert actions[1].detail.startswith("wrong user name or password; before the run store existed, at 20")  # type: ignore[union-attr]


def test_audit_rows_beyond_the_deferred_limit_are_counted_in_one_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedface.server.console import sources

    monkeypatch.setattr(sources, "MAX_DEFERRED", 3)
    source = StoreSource(tmp_path / "later")
    for i in range(3):
        source.defer(f"first-{i}", "login-failed", detail="wrong user name or password", client="10.0.0.1")
    for i in range(5):
        source.defer(f"later-{i}", "login-failed" if i < 4 else "login", client="10.0.0.2")
    assert source.deferred() == (3, 5)
    with RunStore(tmp_path / "later" / "runs.sqlite"):
        pass

    source.get()
    with _store(tmp_path / "later") as store:
        actions = store.actions()
    source.close()

    assert [a.admin for a in reversed(actions)] == ["first-0", "first-1", "first-2", sources.CONSOLE_ADMIN]  # the first ones, then the count
    summary = actions[0]
    assert summary.action == "login-failed" and summary.detail is not None
    assert summary.detail.startswith("5 more audit-log rows from before the run store could be written were not kept (only the first 3 were)")
    assert summary.detail.endswith("login-failed \u00d74, login \u00d71")
    assert source.deferred() == (0, 0)


def test_the_console_never_creates_a_missing_store(tmp_path: Path, admin_dir: Path) -> None:
    with TestClient(create_app(_settings(tmp_path / "absent", admin_dir)), follow_redirects=False) as c:
        _login(c)
        for path in ("/runs", "/sites", "/privacy", "/audit", "/runs/x"):
            assert c.get(path).status_code in (200, 404)

    assert not (tmp_path / "absent").exists()


# --- headers, cookies, secrets -----------------------------------------------------------------


def test_pages_carry_the_strict_csp_and_no_store(client: TestClient) -> None:
    _login(client)
    for path in ("/login", "/runs", f"/runs/{RUN}", "/sites"):
        headers = client.get(path).headers
        assert headers["content-security-policy"] == CSP
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "frame-ancestors 'none'" in CSP
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["cache-control"] == "no-store"
    assert client.get("/static/console.css").headers["cache-control"] == "no-cache"


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1:8765", True), ("localhost:8765", True), ("LOCALHOST", True), ("[::1]:8765", True), ("[::1]", True),
    ("console.example.org:8443", True), ("a.fed.example.org", True), ("evil.example", False), ("127.0.0.1.evil.example", False),
    ("fed.example.org.evil", False), ("[::2]:8765", False), ("", False)])
def test_only_the_consoles_own_host_names_are_answered(run_dir: Path, admin_dir: Path, host: str, allowed: bool) -> None:
    settings = Settings(store=run_dir, admin_dir=admin_dir, allowed_hosts=("console.example.org", "*.fed.example.org"))
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8765", follow_redirects=False) as c:
        response = c.get("/login", headers={"host": host})

    assert response.status_code == (200 if allowed else 400)
    assert response.headers["content-security-policy"] == CSP
    if not allowed:
        assert "--allowed-host" in response.text and "csrf_token" not in response.text


def test_a_post_is_refused_before_parsing_unless_a_small_url_encoded_form(client: TestClient, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette import formparsers  # starlette's form parsers (python-multipart underneath)

    parsed: list[str] = []
    for parser in (formparsers.MultiPartParser, formparsers.FormParser):
        real = parser.parse

        async def spy(self: Any, _real: Any = real) -> Any:
            parsed.append(type(self).__name__)
            return await _real(self)

        monkeypatch.setattr(parser, "parse", spy)
    token = _csrf(client.get("/login").text)
    fields = {"username": "admin", "password": PASSWORD, "csrf_token": token}

    upload = client.post("/login", data=fields, files={"f": ("x.bin", b"\0" * 100, "application/octet-stream")})
    big = client.post("/login", data=fields | {"pad": "x" * 9000})
    streamed = client.post("/login", content=(b"pad=" + b"x" * 1000 for _ in range(10)),
                           headers={"content-type": "application/x-www-form-urlencoded"})
    untyped = client.post("/login", content=b"username=admin")
    assert parsed == []  # refused before any parser ran
    logged_in = client.post("/login", data=fields)

    assert (upload.status_code, big.status_code, streamed.status_code, untyped.status_code) == (415, 413, 413, 415)
    assert logged_in.status_code == 303 and parsed == ["FormParser"]
    with _store(run_dir) as store:
        assert [a.action for a in store.actions()] == ["login"]


def test_no_page_has_inline_script_or_style(client: TestClient) -> None:
    _login(client)
    for path in PAGES[1:]:
        html = client.get(path).text
        assert " style=" not in html and "<style" not in html, path
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
        assert all('src="/static/' in attrs or 'type="application/json"' in attrs for attrs, _ in scripts), path
        assert not re.search(r"\son[a-z]+=", html), path


def test_no_page_shows_the_password_hash_or_a_key(client: TestClient, admin_dir: Path) -> None:
    _login(client)
    admin = json.loads((admin_dir / "admin.json").read_text())
    key = (admin_dir / "session.key").read_bytes()

    for path in PAGES[1:] + ("/login",):
        html = client.get(path).text
        assert admin["hash"] not in html and "$argon2" not in html, path
        assert key.hex() not in html and "PRIVATE KEY" not in html and "<img" not in html, path


def test_the_session_cookie_is_httponly_samesite_strict_and_expires(run_dir: Path, admin_dir: Path) -> None:
    with TestClient(create_app(_settings(run_dir, admin_dir, session_hours=2, https=True)), follow_redirects=False) as c:
        login = _login(c)
        cookie = login.headers["set-cookie"]

    assert login.headers["strict-transport-security"] == "max-age=31536000"

    assert cookie.startswith(f"{auth.SESSION_COOKIE}=")
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "secure" in flags and "max-age=7200" in flags
    assert "admin" not in json.dumps(flags[1:])  # the value is the signed session, nothing else


def test_a_login_older_than_the_session_lifetime_is_refused(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    _login(client)
    assert client.get("/runs").status_code == 200
    later = time.time() + 8 * 3600 + 5

    monkeypatch.setattr(time, "time", lambda: later)

    assert client.get("/runs").headers["location"] == "/login"
    assert client.get("/events").status_code == 401


def test_the_cookie_holds_only_a_session_id_and_the_csrf_token_the_rest_stays_on_the_server() -> None:
    now = [100.0]
    sessions = auth.Sessions(max_age_s=60, limit=2, clock=lambda: now[0])
    cookie: dict[str, Any] = {"csrf": "pre-login", "other": 1}

    session = sessions.start(cookie, "admin", "fingerprint-1")

    assert sorted(cookie) == ["csrf", "sid"] and cookie["sid"] == session.sid and cookie["csrf"] != "pre-login"
    assert sessions.current(cookie, "fingerprint-1") == session and session.expires_at == 160.0
    assert sessions.current(dict(cookie), None) is None and sessions.current(cookie, "fingerprint-1") == session  # admin file unreadable: refused, kept
    assert sessions.current(dict(cookie), "fingerprint-2") is None  # another administrator now: ended for good
    assert sessions.current(cookie, "fingerprint-1") is None and cookie == {}
    replaced = sessions.start(cookie, "admin", "fingerprint-1")
    later = sessions.start(cookie, "admin", "fingerprint-1")  # logging in again ends the cookie's earlier session
    assert not sessions.alive(replaced.sid, "fingerprint-1") and sessions.alive(later.sid, "fingerprint-1")
    now[0] = 160.0
    assert sessions.current(cookie, "fingerprint-1") is None and not sessions.alive(later.sid, "fingerprint-1")  # expired
    first, second, third = ({} for _ in range(3))
    for c in (first, second, third):
        sessions.start(c, "admin", "fingerprint-1")
    assert len(sessions) == 2 and sessions.current(first, "fingerprint-1") is None  # beyond the limit the oldest ends


def test_the_admin_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    auth.init_admin(tmp_path, user="admin", password=PASSWORD, hasher=CHEAP)
    watched = auth.AdminFile(tmp_path, auth.load_session_key(tmp_path))
    before = watched.fingerprint()

    auth.init_admin(tmp_path, user="admin", password=PASSWORD, force=True, hasher=CHEAP)  # the same name and password
    after = watched.fingerprint()
    (tmp_path / auth.ADMIN_FILE).write_text("{}")

    assert before is not None and after is not None and before != after  # a new hash (salt) and time: a new admin
    assert watched.fingerprint() is None
    with pytest.raises(KeyFileError):
        watched.load()


# --- the live feed -----------------------------------------------------------------------------


async def _take(
    source: StoreSource, last_event_id: str | None, n: int, during: Any = None, wait_s: float = 2.0
) -> list[dict[str, Any]]:
    """The first ``n`` events of the feed (fewer if ``wait_s`` passes first); ``during`` is
    called after the first."""
    out: list[dict[str, Any]] = []
    stream = change_events(source, last_event_id, poll_s=0.01)
    try:
        with anyio.move_on_after(wait_s):
            async for event in stream:
                out.append(event)
                if len(out) == n:
                    break
                if during is not None and len(out) == 1:
                    during()
    finally:
        await stream.aclose()
    return out


def test_cursors_encode_as_event_ids_and_malformed_ones_start_from_now() -> None:
    assert encode_cursor((3, 2, 1, 0)) == "3-2-1-0" and parse_cursor("3-2-1-0") == (3, 2, 1, 0)
    for bad in (None, "", "1-2-3", "a-b-c-d", "1-2-3-4-5", "-1-2-3-4"):
        assert parse_cursor(bad) is None
        assert start_cursor((5, 5, 5, 5), bad) == (5, 5, 5, 5)
    assert start_cursor((5, 5, 5, 5), "1-2-3-4") == (1, 2, 3, 4)
    assert start_cursor((5, 5, 5, 5), "9-0-0-0") == (5, 5, 5, 5)  # another store's: from now


def test_the_feed_resumes_just_after_the_last_event_id(run_dir: Path) -> None:
    source = StoreSource(run_dir)
    with _store(run_dir) as store:
        before = store.cursor()
        store.record_action("admin", "suspend-site", "site-a")
        store.record_action("admin", "resume-site", "site-a")
        after = store.cursor()

    events = asyncio.run(_take(source, encode_cursor(before), 3, wait_s=0.3))
    source.close()

    assert [e["event"] for e in events] == ["action", "action"]  # both, nothing earlier, nothing again
    assert events[0]["id"] == encode_cursor((before[0], before[1], before[2] + 1, before[3]))
    assert events[-1]["id"] == encode_cursor(after)
    assert json.loads(events[0]["data"]) == {"kind": "action", "run_id": "site-a"}


def test_the_feed_without_an_id_or_with_a_bad_one_starts_from_now(run_dir: Path) -> None:
    source = StoreSource(run_dir)

    assert asyncio.run(_take(source, None, 1, wait_s=0.3)) == []
    assert asyncio.run(_take(source, "garbage", 1, wait_s=0.3)) == []  # never a replay of everything
    source.close()


def test_a_new_round_produces_a_round_event(run_dir: Path) -> None:
    source = StoreSource(run_dir)
    writer = _store(run_dir)
    writer.record_action("admin", "login")  # the first event lets _take write the round mid-stream

    def record() -> None:
        writer.record_round(RUN, 3, started_at="2026-05-09T10:03:00+00:00", seconds=9.0, sampled=["site-a"],
                            participation=[Participation("site-a", "answered", examples=40)], metrics={"verif_acc": 0.8})

    start = encode_cursor((*writer.cursor()[:2], writer.cursor()[2] - 1, writer.cursor()[3]))
    events = asyncio.run(_take(source, start, 2, during=record))
    writer.close()
    source.close()

    assert [e["event"] for e in events] == ["action", "round"]
    assert json.loads(events[1]["data"]) == {"kind": "round", "run_id": RUN}
    assert parse_cursor(events[1]["id"])[1] > parse_cursor(events[0]["id"])[1]  # type: ignore[index]


def test_the_feed_ends_with_the_session(run_dir: Path) -> None:
    source = StoreSource(run_dir)

    async def drain() -> list[dict[str, Any]]:
        return [e async for e in change_events(source, "0-0-0-0", poll_s=0.01, alive=lambda: False)]

    assert asyncio.run(drain()) == []  # the session is over: not even the backlog
    source.close()


def test_an_open_feed_ends_when_its_session_is_logged_out(run_dir: Path, admin_dir: Path) -> None:
    app = create_app(_settings(run_dir, admin_dir))

    async def scenario() -> tuple[int, str, int]:
        async with _async_client(app, "192.0.2.7") as c:
            await _async_login(c)
            token = _csrf((await c.get("/runs")).text)
            stream = asyncio.ensure_future(c.get("/events", params={"after": "0-0-0-0"}))  # returns once the stream ends
            await asyncio.sleep(0.3)
            assert not stream.done()
            logout = await c.post("/logout", data={"csrf_token": token})
            with anyio.fail_after(5):
                events = await stream
            return logout.status_code, events.text, (await c.get("/events")).status_code

    logout, text, again = asyncio.run(scenario())

    assert logout == 303
    assert "event: action" in text  # it streamed while the session lived
    assert again == 401  # and the reconnection is refused


@pytest.mark.parametrize("kind", ["garbage", "another sqlite file"])
def test_an_unreadable_run_store_lets_the_admin_in_and_shows_its_one_line_in_the_layout(
    tmp_path: Path, admin_dir: Path, kind: str
) -> None:
    import sqlite3

    bad = tmp_path / "run" / "runs.sqlite"
    bad.parent.mkdir()
    if kind == "garbage":
        bad.write_bytes(b"not a database at all" * 10)
    else:
        with sqlite3.connect(bad) as conn:
            conn.execute("CREATE TABLE t (x)")
    with TestClient(create_app(_settings(bad.parent, admin_dir)), follow_redirects=False, raise_server_exceptions=False) as c:
        login = _login(c)
        pages = {path: c.get(path) for path in ("/runs", "/sites", f"/runs/{RUN}", "/privacy", "/audit")}
        fragment = c.get("/runs", headers={"HX-Request": "true"})
        bad.unlink()  # the operator puts a run store there
        with RunStore(bad) as store:
            _fill(store)
        recovered = c.get("/audit")
        with _store(bad.parent) as store:
            actions = store.actions()

    assert login.status_code == 303  # the audit row waited for the store
    for path, response in pages.items():
        assert response.status_code == 500, path
        assert 'data-page="error"' in response.text and 'class="nav"' in response.text, path  # the normal layout
        line = re.search(r'<p id="store-error"[^>]*>([^<]*)</p>', response.text).group(1)  # type: ignore[union-attr]
        assert line.startswith("RunDirError: ") and str(bad) in line and "\n" not in line, path
    assert fragment.status_code == 500 and fragment.text.lstrip().startswith('<section id="error" class="live"')
    assert recovered.status_code == 200 and 'data-page="audit"' in recovered.text
    assert [a.action for a in actions] == ["login"]
    assert actions[0].detail.startswith("while the run store could not be written, at 20")  # type: ignore[union-attr]


def test_the_feed_waits_for_a_store_and_then_sends_all_of_it(tmp_path: Path) -> None:
    source = StoreSource(tmp_path / "later")

    def create() -> None:
        with RunStore(tmp_path / "later" / "runs.sqlite") as store:
            store.start_run("r", config={}, sites=1, rounds=1, secagg=False)

    async def scenario() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, create)
        return await _take(source, "0-0-0-0", 1)

    events = asyncio.run(scenario())
    source.close()

    assert [(e["event"], json.loads(e["data"])["run_id"]) for e in events] == [("event", "r")]


def test_the_feed_waits_out_an_unreadable_store_and_then_sends_its_replacement(tmp_path: Path) -> None:
    bad = tmp_path / "run" / "runs.sqlite"
    bad.parent.mkdir()
    bad.write_bytes(b"not a database at all" * 10)
    source = StoreSource(tmp_path / "run")

    def replace() -> None:
        bad.unlink()
        with RunStore(bad) as store:
            store.start_run("r", config={}, sites=1, rounds=1, secagg=False)

    async def scenario() -> list[dict[str, Any]]:
        asyncio.get_running_loop().call_later(0.1, replace)
        return await _take(source, "0-0-0-0", 1)  # what an error page's feed asks: from the start

    events = asyncio.run(scenario())
    source.close()

    assert [(e["event"], json.loads(e["data"])["run_id"]) for e in events] == [("event", "r")]


# --- the commands ------------------------------------------------------------------------------


def test_init_admin_writes_a_private_argon2id_hash_and_session_key(tmp_path: Path) -> None:
    password = tmp_path / "pw"
    password.write_text(PASSWORD + "\n")
    target = tmp_path / "admin"

    done = CliRunner().invoke(cli, ["console", "init-admin", "--admin-dir", str(target), "--password-file", str(password)])

    assert done.exit_code == 0, done.output
    record = json.loads((target / "admin.json").read_text())
    assert record["user"] == "admin" and record["hash"].startswith("$argon2id$") and PASSWORD not in json.dumps(record)
    assert PasswordHasher().verify(record["hash"], PASSWORD)
    for name in ("admin.json", "session.key"):
        assert stat.S_IMODE((target / name).stat().st_mode) == 0o600
    assert len((target / "session.key").read_bytes()) == auth.SESSION_KEY_BYTES


def test_init_admin_refuses_an_existing_admin_and_keeps_the_session_key_on_force(
    tmp_path: Path, admin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "admin"
    auth.init_admin(target, user="admin", password=PASSWORD, hasher=CHEAP)
    key = (target / "session.key").read_bytes()
    monkeypatch.setenv("FEDFACE_CONSOLE_PASSWORD", "another long password")

    refused = CliRunner().invoke(cli, ["console", "init-admin", "--admin-dir", str(target)])
    forced = CliRunner().invoke(cli, ["console", "init-admin", "--admin-dir", str(target), "--user", "root", "--force"])

    assert refused.exit_code == 3
    assert refused.output.strip().splitlines()[-1] == f"ConfigError: {target / 'admin.json'} already holds the console admin; pass --force to replace it"
    assert forced.exit_code == 0, forced.output
    assert auth.load_admin(target).user == "root" and (target / "session.key").read_bytes() == key


def test_init_admin_refuses_a_short_password_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDFACE_CONSOLE_PASSWORD", "short")

    done = CliRunner().invoke(cli, ["console", "init-admin", "--admin-dir", str(tmp_path / "a")])

    assert done.exit_code == 3
    assert done.output.strip() == "ConfigError: the console password must have at least 12 characters, got 5"
    assert not (tmp_path / "a" / "admin.json").exists()


def test_serve_refuses_an_uninitialised_admin_dir(tmp_path: Path) -> None:
    done = CliRunner().invoke(cli, ["console", "serve", "--store", str(tmp_path / "run"), "--admin-dir", str(tmp_path / "none")])

    assert done.exit_code == 13
    line = done.output.strip()
    assert line.startswith("KeyFileError: no console admin at ") and "`fedface console init-admin --admin-dir" in line
    assert len(line.splitlines()) == 1


def test_serve_runs_uvicorn_with_a_short_shutdown_and_warns_off_loopback_without_tls(
    tmp_path: Path, admin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    monkeypatch.setattr("fedface.simulations.commands.console._check_port", lambda host, port: None)  # nothing listens
    args = ["console", "serve", "--store", str(tmp_path / "run"), "--admin-dir", str(admin_dir)]

    local = CliRunner().invoke(cli, args)
    exposed = CliRunner().invoke(cli, [*args, "--host", "0.0.0.0", "--port", "9000"])
    half_tls = CliRunner().invoke(cli, [*args, "--tls-cert", str(tmp_path / "c.pem")])

    assert local.exit_code == 0 and "warning" not in local.output
    assert exposed.exit_code == 0 and "plain HTTP" in exposed.output and "--allowed-host" in exposed.output
    assert [(c["host"], c["port"], c["timeout_graceful_shutdown"]) for c in calls] == [("127.0.0.1", 8765, 1), ("0.0.0.0", 9000, 1)]
    assert half_tls.exit_code == 3 and "pass both --tls-cert and --tls-key" in half_tls.output


def test_serve_never_believes_x_forwarded_for(tmp_path: Path, admin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    calls: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setattr("fedface.simulations.commands.console._check_port", lambda host, port: None)  # nothing listens
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")

    done = CliRunner().invoke(cli, ["console", "serve", "--store", str(tmp_path / "run"), "--admin-dir", str(admin_dir)])

    assert done.exit_code == 0, done.output
    [(app, kw)] = calls
    assert kw["proxy_headers"] is False and kw["forwarded_allow_ips"] == ""
    config = uvicorn.Config(app, ws="none", **kw)
    config.load()
    assert not isinstance(config.loaded_app, ProxyHeadersMiddleware)  # uvicorn's default would wrap it: 127.0.0.1 trusted


def test_serve_answers_the_allowed_hosts_and_refuses_a_bad_one(tmp_path: Path, admin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    apps: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    # 10.1.2.3 is not this machine's: nothing listens, only the host names are looked at
    monkeypatch.setattr("fedface.simulations.commands.console._check_port", lambda host, port: None)
    args = ["console", "serve", "--store", str(tmp_path / "run"), "--admin-dir", str(admin_dir), "--host", "10.1.2.3"]

    named = CliRunner().invoke(cli, [*args, "--allowed-host", "Console.Example.org", "--allowed-host", "[2001:db8::1]",
                                     "--allowed-host", "*.fed.example.org"])
    bad = CliRunner().invoke(cli, [*args, "--allowed-host", "https://console.example.org:8443"])

    assert named.exit_code == 0, named.output
    assert apps[0].state.settings.trusted_hosts == ("10.1.2.3", "127.0.0.1", "localhost", "::1", "console.example.org", "2001:db8::1",
                                                     "*.fed.example.org")
    assert bad.exit_code == 3 and "--allowed-host takes a host name" in bad.output and len(apps) == 1


def test_the_vendored_scripts_are_the_ones_vendored_md_names() -> None:
    static = Path(__file__).resolve().parents[2] / "server" / "console" / "static"
    table = (static / "VENDORED.md").read_text(encoding="utf-8")

    for name in ("htmx.min.js", "chart.umd.min.js"):
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}`"))
        assert hashlib.sha256((static / name).read_bytes()).hexdigest() in row, name
