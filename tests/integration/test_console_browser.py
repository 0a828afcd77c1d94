"""The admin console in a real browser, watching a real simulation, and one truth for privacy.

A console (``fedface console serve``, its own process) is started on a run directory that does
not exist yet; a headless Chromium (Debian's, driven by Playwright: ``.ci/run`` installs it)
logs in, opens the run's page and watches ``fedface simulate`` (3 sites x 3 rounds, a lifetime
budget per site) fill it without a reload. Then every page is opened and screenshotted (the
charts must hold data), the refusals are tried (a wrong password, no session, a bad CSRF
token), suspend and resume go to the audit log, and the privacy numbers are compared across
the sites' ledgers, ``fedface report privacy`` (every format) and the console's privacy page:
the same to the digit.

Screenshots go to ``$FEDFACE_TEST_ARTIFACTS/console`` (default ``test-artifacts/console``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fedface.common.privacy.accounting import format_epsilon
from fedface.common.privacy.ledger import PrivacyLedger

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
FEDFACE = str(Path(sys.executable).with_name("fedface"))
PASSWORD = "correct horse battery staple"
BUDGET = 30.0
SITES = ("site-000", "site-001", "site-002")
ARTIFACTS = Path(os.environ.get("FEDFACE_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts")) / "console"
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}
CHART_POINTS = """(selector) => {
  const canvas = document.querySelector(selector);
  const chart = canvas && window.Chart ? window.Chart.getChart(canvas) : null;
  return chart ? chart.data.datasets.reduce((n, d) => n + d.data.length, 0) : -1;
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the console exited with {proc.returncode}: {log.read_text()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the console did not answer {url} within {timeout} s")


@dataclass
class Live:
    base: str
    run_dir: Path
    ledger_dir: Path
    admin_dir: Path
    run_id: str
    rows_at_load: int
    reloaded: bool
    page: object  # a logged-in playwright Page
    console_errors: list[str]


def _shot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def _login(page: object, base: str, password: str = PASSWORD) -> None:
    page.goto(f"{base}/login")  # type: ignore[attr-defined]
    page.fill("input[name=username]", "admin")  # type: ignore[attr-defined]
    page.fill("input[name=password]", password)  # type: ignore[attr-defined]
    page.click("form [type=submit]")  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def live(browser: object, tmp_path_factory: pytest.TempPathFactory, orl_root: Path) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("console")
    admin_dir, run_dir, ledger_dir = root / "admin", root / "run", root / "ledgers"
    env = {**os.environ, **QUIET, "FEDFACE_LEDGER_DIR": str(ledger_dir)}
    password_file = root / "password"
    password_file.write_text(PASSWORD + "\n")
    init = subprocess.run(
        [FEDFACE, "console", "init-admin", "--admin-dir", str(admin_dir), "--password-file", str(password_file)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert init.returncode == 0, init.stderr
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = root / "console.log"  # a file, not a pipe: nobody reads a pipe while the test runs
    console_log = log.open("wb")
    console = subprocess.Popen(
        [FEDFACE, "console", "serve", "--store", str(run_dir), "--admin-dir", str(admin_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=console_log, env=env,
    )
    context = None
    sim = None
    sim_log = (root / "simulate.log").open("wb")
    try:
        _wait_for(f"{base}/login", console, log)
        context = browser.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        _login(page, base)
        page.wait_for_selector("main[data-page=runs]")

        scenario = root / "scenario.toml"
        packaged = (REPO_ROOT / "simulations" / "scenarios" / "federated.toml").read_text()
        scenario.write_text(packaged + f"\n[site-policy]\nbudget-epsilon = {BUDGET}\n")
        sim = subprocess.Popen(
            [FEDFACE, "simulate", "-c", str(scenario), "--data", str(orl_root), "--sites", "3", "--rounds", "3",
             "--out", str(run_dir), "--ledger-dir", str(ledger_dir), "--client-cpus", "0.5", "-q"],
            stdout=sim_log, stderr=sim_log, env=env,
        )
        # the run appears on the runs page without a reload (the store did not exist when it loaded)
        page.evaluate("() => { window.__fedfaceNoReload = true; }")
        row = page.wait_for_selector("#runs-table tr[data-run-id]", timeout=120_000)
        run_id = row.get_attribute("data-run-id")
        assert page.evaluate("() => window.__fedfaceNoReload === true")
        page.goto(f"{base}/runs/{run_id}")
        page.wait_for_selector("main[data-page=run]")
        rows_at_load = page.locator("#timeline tr[data-round]").count()
        page.evaluate("() => { window.__fedfaceNoReload = true; }")
        page.wait_for_function("() => document.querySelectorAll('#timeline tr[data-round]').length === 3", timeout=240_000)
        reloaded = not page.evaluate("() => window.__fedfaceNoReload === true")
        assert sim.wait(timeout=240) == 0, (root / "simulate.log").read_text()
        yield Live(base, run_dir, ledger_dir, admin_dir, str(run_id), rows_at_load, reloaded, page, errors)
    finally:
        if sim is not None and sim.poll() is None:
            sim.kill()
            sim.wait()
        sim_log.close()
        if context is not None:
            context.close()
        console.terminate()
        try:
            console.wait(timeout=15)
        except subprocess.TimeoutExpired:
            console.kill()
            console.wait()
        console_log.close()


def test_the_run_fills_live_without_a_reload(live: Live) -> None:
    assert live.rows_at_load < 3, "the page loaded after the run had finished: nothing was watched live"
    assert not live.reloaded
    page = live.page
    page.wait_for_function(  # type: ignore[attr-defined]
        f"() => document.querySelector('#timeline') && document.body.innerText.includes('completed')", timeout=30_000
    )


def test_every_page_renders_with_its_charts_and_no_console_error(live: Live) -> None:
    page = live.page
    for name, path in (
        ("runs", "/runs"),
        ("run", f"/runs/{live.run_id}"),
        ("sites", "/sites"),
        ("privacy", f"/privacy?run={live.run_id}"),
        ("gallery", "/gallery"),
        ("audit", "/audit"),
    ):
        response = page.goto(live.base + path)  # type: ignore[attr-defined]
        assert response is not None and response.status == 200, f"{path}: {response.status if response else None}"
        page.wait_for_selector(f"main[data-page={name}]")  # type: ignore[attr-defined]
        page.wait_for_load_state("networkidle")  # type: ignore[attr-defined]
        if name == "run":
            assert page.evaluate(CHART_POINTS, "#chart-metrics") >= 3  # type: ignore[attr-defined]
        if name == "privacy":
            assert page.evaluate(CHART_POINTS, "#chart-epsilon") >= 3 * len(SITES)  # type: ignore[attr-defined]
        if name == "sites":
            assert page.locator("#sites-table tr[data-site]").count() == len(SITES)  # type: ignore[attr-defined]
        _shot(page, name)
    assert live.console_errors == []


def test_a_wrong_password_is_refused_and_audited(live: Live, browser: object) -> None:
    context = browser.new_context()  # type: ignore[attr-defined]
    try:
        page = context.new_page()
        _login(page, live.base, password="not the password at all")
        page.wait_for_selector("#login-error")
        assert page.locator("main[data-page=login]").count() == 1
        _shot(page, "login-refused")
        # still no session: every page sends it back to the login page
        page.goto(f"{live.base}/sites")
        assert page.locator("main[data-page=login]").count() == 1
    finally:
        context.close()
    live.page.goto(f"{live.base}/audit")  # type: ignore[attr-defined]
    assert live.page.locator("#audit-table tr[data-action=login-failed]").count() >= 1  # type: ignore[attr-defined]


def test_without_a_session_only_the_login_page_is_served(live: Live) -> None:
    with httpx.Client(base_url=live.base, follow_redirects=False, timeout=10) as client:
        for path in ("/", "/runs", f"/runs/{live.run_id}", "/sites", f"/privacy?run={live.run_id}", "/gallery", "/audit"):
            response = client.get(path)
            assert response.status_code in (302, 303, 307), path
            assert response.headers["location"].endswith("/login"), path
        assert client.get("/events").status_code == 401
        assert client.post("/sites/suspend", data={"csrf_token": "x", "site": SITES[0]}).status_code in (401, 403)
        login = client.get("/login")
        assert login.status_code == 200
        assert "default-src 'self'" in login.headers["content-security-policy"]


def test_a_bad_csrf_token_is_refused_and_changes_nothing(live: Live) -> None:
    request = live.page.context.request  # type: ignore[attr-defined]  # the logged-in session's cookies
    response = request.post(f"{live.base}/sites/suspend", form={"csrf_token": "forged", "site": SITES[0]}, max_redirects=0)
    assert response.status == 403
    response = request.post(f"{live.base}/runs/{live.run_id}/stop", form={}, max_redirects=0)
    assert response.status == 403
    live.page.goto(f"{live.base}/sites")  # type: ignore[attr-defined]
    assert live.page.locator("#sites-table form.resume-site").count() == 0  # type: ignore[attr-defined]  # nobody suspended
    live.page.goto(f"{live.base}/runs/{live.run_id}")  # type: ignore[attr-defined]
    assert "stopped" not in live.page.locator("#timeline").inner_text()  # type: ignore[attr-defined]


def test_suspend_and_resume_a_site_from_the_sites_page(live: Live) -> None:
    page = live.page
    page.goto(f"{live.base}/sites")  # type: ignore[attr-defined]
    page.click(f"#sites-table tr[data-site='{SITES[1]}'] form.suspend-site [type=submit]")  # type: ignore[attr-defined]
    page.wait_for_selector(f"#sites-table tr[data-site='{SITES[1]}'] form.resume-site")  # type: ignore[attr-defined]
    _shot(page, "sites-suspended")
    page.click(f"#sites-table tr[data-site='{SITES[1]}'] form.resume-site [type=submit]")  # type: ignore[attr-defined]
    page.wait_for_selector(f"#sites-table tr[data-site='{SITES[1]}'] form.suspend-site")  # type: ignore[attr-defined]
    page.goto(f"{live.base}/audit")  # type: ignore[attr-defined]
    for action in ("suspend-site", "resume-site", "login"):
        assert page.locator(f"#audit-table tr[data-action={action}]").count() >= 1, action  # type: ignore[attr-defined]
    _shot(page, "audit")


def test_no_page_shows_a_secret_an_image_or_an_embedding(live: Live) -> None:
    admin = json.loads((live.admin_dir / "admin.json").read_text())
    secrets = [admin["hash"], (live.admin_dir / "session.key").read_bytes().hex()]
    for site in SITES:
        secrets.append((live.ledger_dir.glob(f"*/{site}/receipt.key").__next__()).read_text().strip().splitlines()[1])
    page = live.page
    for path in ("/runs", f"/runs/{live.run_id}", "/sites", f"/privacy?run={live.run_id}", "/gallery", "/audit"):
        page.goto(live.base + path)  # type: ignore[attr-defined]
        html = page.content()  # type: ignore[attr-defined]
        assert "<img" not in html and "data:image" not in html, path
        assert "$argon2" not in html and "PRIVATE KEY" not in html, path
        for secret in secrets:
            assert secret not in html, path


def _ledgers(live: Live) -> dict[str, PrivacyLedger]:
    folder = json.loads((live.run_dir / "ledgers.json").read_text())["ledger_dir"]
    return {site: PrivacyLedger(Path(folder) / site / "ledger.sqlite", create=False) for site in SITES}


def _report(live: Live, fmt: str) -> str:
    done = subprocess.run(
        [FEDFACE, "report", "privacy", str(live.run_dir), "--format", fmt], capture_output=True, text=True, timeout=120,
        env={**os.environ, **QUIET},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_one_truth_ledger_report_and_console_agree_to_the_digit(live: Live) -> None:
    # the sites' ledgers: every session of this run, and the lifetime spend
    ledgers = _ledgers(live)
    truth = {}
    for site, ledger in ledgers.items():
        with ledger:
            sessions = [s for s in ledger.sessions(site) if s.run_id == live.run_id]
            spend = ledger.spend(site)
        assert len(sessions) == 3
        truth[site] = (spend.epsilon, [s.epsilon_after for s in sessions], spend.remaining)
        assert spend.budget is not None and spend.budget.epsilon == BUDGET

    # the report's JSON: exact floats, the same bits
    report = json.loads(_report(live, "json"))
    assert report["schema"].startswith("fedface.privacy-report/")
    by_site = {s["site"]: s for s in report["sites"]}
    assert sorted(by_site) == list(SITES)
    for site, (lifetime, after, remaining) in truth.items():
        assert by_site[site]["epsilon"]["lifetime"] == lifetime
        assert [r["epsilon_lifetime"] for r in by_site[site]["rounds"] if r["run_id"] == live.run_id] == after
        assert by_site[site]["budget"]["remaining"] == remaining
        assert by_site[site]["receipts"]["verified"] is True
        assert by_site[site]["problems"] == []

    # the console's privacy page: the exact value in data-value, the text rounded up (remaining down)
    page = live.page
    page.goto(f"{live.base}/privacy?run={live.run_id}")  # type: ignore[attr-defined]
    for site, (lifetime, _, remaining) in truth.items():
        row = page.locator(f"tr[data-site='{site}']").first  # type: ignore[attr-defined]
        cell = row.locator("td[data-field=epsilon-lifetime]")
        assert float(cell.get_attribute("data-value")) == lifetime
        assert cell.inner_text().strip() == format_epsilon(lifetime, rounding="up")
        rest = row.locator("td[data-field=remaining]")
        assert float(rest.get_attribute("data-value")) == remaining
        assert rest.inner_text().strip() == format_epsilon(remaining, rounding="down")

    # every other format carries the same figures, rounded the safe way
    markdown, html = _report(live, "md"), _report(live, "html")
    rows = list(csv.DictReader(io.StringIO(_report(live, "csv"))))
    for site, (lifetime, after, remaining) in truth.items():
        shown = format_epsilon(lifetime, rounding="up")
        assert shown in markdown and shown in html
        assert format_epsilon(remaining, rounding="down") in markdown
        mine = [r for r in rows if r["site"] == site and r["run_id"] == live.run_id]
        assert [float(r["epsilon_lifetime"]) for r in mine] == after
    assert not re.search(r"https?://", html), "the HTML report must open offline"
