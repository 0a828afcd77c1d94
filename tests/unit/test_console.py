"""Unit tests of the admin web console (fedface.server.console) over HTTP, in process.

Starlette's TestClient drives the real app against a real run store filled through the
RunStore API (a running run with a refusal and a failure, a finished one) and a real admin
directory (argon2id; a cheap hasher for speed, given explicitly). Covered: login (right and
wrong password, rate limit, its CSRF token), nothing but /login and /static without a session,
CSRF on every POST, the actions as the ServerApp sees them (stop, suspend, resume), the pages'
stable hooks and numbers, the privacy page against the privacy report, security headers,
session cookie flags and expiry, no secret in any page, the live feed (Last-Event-ID resume,
a new round's event), and the `fedface console` commands.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
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

from fedface.common.privacy.accounting import format_epsilon
from fedface.server.console import auth
from fedface.server.console.app import CSP, create_app
from fedface.server.console.feed import change_events, encode_cursor, parse_cursor, start_cursor
from fedface.server.console.sources import Settings, StoreSource
from fedface.server.reports.privacy import privacy_report_for_run
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
    return Settings(store=store, admin_dir=admin_dir, poll_s=0.01, **kw)


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


def test_the_limiter_counts_per_client_and_per_user_in_a_sliding_window() -> None:
    now = [0.0]
    limiter = auth.LoginLimiter(limit=2, window_s=60, clock=lambda: now[0])
    limiter.failed("10.0.0.1", "admin")
    limiter.failed("10.0.0.2", "admin")

    assert limiter.retry_after("10.0.0.3", "admin") == 61  # the user name, from any address
    assert limiter.retry_after("10.0.0.1", "other") is None
    now[0] = 60.0
    assert limiter.retry_after("10.0.0.3", "admin") is None  # the failures left the window


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


# --- nothing without a session -----------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_every_page_redirects_to_the_login_without_a_session(client: TestClient, path: str) -> None:
    response = client.get(path)

    assert response.status_code == 303
    assert response.headers["location"] == "/login"
    assert "run-live" not in response.text


def test_the_feed_and_every_action_answer_401_without_a_session(client: TestClient, run_dir: Path) -> None:
    assert client.get("/events").status_code == 401
    for path in (f"/runs/{RUN}/stop", "/sites/site-a/suspend", "/sites/site-a/resume", "/logout"):
        assert client.post(path, data={"csrf_token": "x"}).status_code == 401, path
    with _store(run_dir) as store:
        assert store.actions() == [] and store.suspended_sites() == {}


def test_the_login_page_and_static_files_are_served_without_a_session(client: TestClient) -> None:
    assert client.get("/login").status_code == 200
    assert client.get("/static/console.js").status_code == 200
    assert client.get("/static/htmx.min.js").status_code == 200


@pytest.mark.parametrize("path", [f"/runs/{RUN}/stop", "/sites/site-a/suspend", "/sites/site-b/resume", "/logout"])
@pytest.mark.parametrize("token", [None, "", "forged"])
def test_a_post_with_a_bad_or_missing_csrf_token_is_403_and_changes_nothing(
    client: TestClient, run_dir: Path, path: str, token: str | None
) -> None:
    _login(client)
    with _store(run_dir) as store:
        store.record_action("admin", "suspend-site", "site-b")

    response = client.post(path, data={} if token is None else {"csrf_token": token})

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

    suspended = client.post("/sites/site-b/suspend", data={"csrf_token": token})
    with _store(run_dir) as store:
        assert set(store.suspended_sites()) == {"site-b"}
    page = client.get(suspended.headers["location"]).text
    again = client.post("/sites/site-b/suspend", data={"csrf_token": token})
    resumed = client.post("/sites/site-b/resume", data={"csrf_token": token})

    assert suspended.headers["location"] == "/sites?notice=suspended&site=site-b"
    assert re.search(r'<tr data-site="site-b">.*?form method="post" action="/sites/site-b/resume" class="resume-site"', page, re.S)
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

    response = client.post("/sites/site-z/suspend", data={"csrf_token": token})

    assert response.headers["location"].startswith("/sites?notice=unknown-site")
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


def test_the_session_holds_only_the_user_the_token_and_the_login_time() -> None:
    session: dict[str, Any] = {"csrf": "pre-login", "other": 1}

    auth.start_session(session, "admin", now=100.0)

    assert sorted(session) == ["csrf", "login_at", "user"] and session["csrf"] != "pre-login"
    assert auth.session_user(session, 60, now=150.0) == "admin"
    assert auth.session_user(session, 60, now=161.0) is None and session == {}


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
        return [e async for e in change_events(source, "0-0-0-0", poll_s=0.01, until=time.time() - 1)]

    assert asyncio.run(drain()) == []  # the session is over: not even the backlog
    source.close()


def test_an_unreadable_run_store_is_a_one_line_500(tmp_path: Path, admin_dir: Path) -> None:
    bad = tmp_path / "runs.sqlite"
    bad.write_bytes(b"not a database at all" * 10)
    with TestClient(create_app(_settings(bad, admin_dir)), follow_redirects=False, raise_server_exceptions=False) as c:
        _login(c)
        response = c.get("/runs")

    assert response.status_code == 500
    assert response.text.startswith("RunDirError: ") and "\n" not in response.text


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
    args = ["console", "serve", "--store", str(tmp_path / "run"), "--admin-dir", str(admin_dir)]

    local = CliRunner().invoke(cli, args)
    exposed = CliRunner().invoke(cli, [*args, "--host", "0.0.0.0", "--port", "9000"])
    half_tls = CliRunner().invoke(cli, [*args, "--tls-cert", str(tmp_path / "c.pem")])

    assert local.exit_code == 0 and "warning" not in local.output
    assert exposed.exit_code == 0 and "plain HTTP" in exposed.output
    assert [(c["host"], c["port"], c["timeout_graceful_shutdown"]) for c in calls] == [("127.0.0.1", 8765, 1), ("0.0.0.0", 9000, 1)]
    assert half_tls.exit_code == 3 and "pass both --tls-cert and --tls-key" in half_tls.output


def test_the_vendored_scripts_are_the_ones_vendored_md_names() -> None:
    static = Path(__file__).resolve().parents[2] / "server" / "console" / "static"
    table = (static / "VENDORED.md").read_text(encoding="utf-8")

    for name in ("htmx.min.js", "chart.umd.min.js"):
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}`"))
        assert hashlib.sha256((static / name).read_bytes()).hexdigest() in row, name
