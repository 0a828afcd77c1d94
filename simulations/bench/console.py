"""`fedface bench console`: what the admin console and the privacy report cost on a real run.

On a copy of a real run store (``--store``, a `fedface simulate` run directory; without it, a
3-site x 3-round simulation on ORL is made first), never the original (a login writes the audit
log), and with the sites' ledgers the run directory names:

- the **baseline**: the store reads one page needs, made directly (``runs()``, ``rounds()``,
  ``site_reports()``, ``receipts()``), in milliseconds;
- each console page served in-process through its ASGI app (starlette's TestClient after a
  real login: routing, session, CSRF token, queries, templates, headers), in milliseconds, and
  as a ratio to the baseline: ``/runs``, ``/runs/RUN``, ``/sites``, ``/privacy?run=RUN``,
  ``/audit``;
- building the privacy report (:func:`~fedface.server.reports.privacy.privacy_report_for_run`:
  every site's ledger composed, checked against the run store and the receipts) and rendering
  it as JSON, Markdown, CSV and HTML (two matplotlib charts per report), in seconds.

Medians of ``--repeat`` runs after one warm-up each. Network time is not included: a browser
adds its own round trip and Chart.js drawing.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fedface.common.errors import RunDirError
from fedface.simulations.console import err_console, print_json, setup_logging, user_errors

PASSWORD = "bench-console-password"


def _median_s(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up: imports, template compilation, SQLite page cache
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _copy_store(run_dir: Path, into: Path) -> Path:
    """A consistent copy of the run store (SQLite's backup API: safe while a run writes) and its
    ledgers.json, so that the console's login and audit rows never touch the original."""
    source = run_dir / "runs.sqlite"
    if not source.is_file():
        raise RunDirError(f"no run store at {source}: pass --store a `fedface simulate` run directory")
    into.mkdir(parents=True, exist_ok=True)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(into / "runs.sqlite")
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    if (run_dir / "ledgers.json").is_file():
        shutil.copy2(run_dir / "ledgers.json", into / "ledgers.json")
    return into


def console(
    store: Annotated[Optional[Path], typer.Option("--store", help="A `fedface simulate` run directory (default: a 3 x 3 simulation on ORL made first).")] = None,
    data: Annotated[Path, typer.Option("--data", help="Faces for the simulation made without --store.")] = Path("../shared/data/orl"),
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Timed repetitions of each measurement (the median is reported).")] = 5,
) -> None:
    """Console pages and privacy reports on a real run: milliseconds per page against the store reads it needs."""
    setup_logging(quiet=True)
    with user_errors(), tempfile.TemporaryDirectory(prefix="fedface-bench-console-") as tmp:
        work = Path(tmp)
        if store is None:
            from fedface.simulations.bench.common import scenario_config
            from fedface.simulations.simulate import run_federated

            cfg = scenario_config("federated.toml").with_overrides(
                {"federation.sites": 3, "federation.rounds": 3, "data.root": str(data.resolve())}
            )
            err_console.print("bench console: a 3-site x 3-round simulation first (about 30 s)")
            run_federated(cfg, out_dir=work / "run", ledger_dir=work / "ledgers")
            store = work / "run"
        figures = _measure(_copy_store(store.resolve(), work / "copy"), repeat)
    for key, value in figures.items():
        if isinstance(value, float):
            err_console.print(f"{key:<28} {value:10.4g}")
    print_json(figures)


def _measure(run_dir: Path, repeat: int) -> dict[str, Any]:
    from fedface.server.console import auth
    from fedface.server.console.app import create_app
    from fedface.server.console.sources import Settings
    from fedface.server.reports.privacy import privacy_report_for_run
    from fedface.server.reports.render import render_report
    from fedface.server.store import RunStore

    with warnings.catch_warnings():  # Starlette 1.x warns that its TestClient will move (third-party)
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    with RunStore(run_dir / "runs.sqlite", create=False) as store:
        runs = store.runs()
        if not runs:
            raise RunDirError(f"the run store of {run_dir} holds no run")
        run_id = runs[-1].run_id
        sites = runs[-1].sites
        rounds = runs[-1].rounds_done

        def reads() -> None:
            store.runs()
            store.rounds(run_id)
            store.site_reports(run_id=run_id)
            store.receipts(run_id=run_id)

        baseline_ms = _median_s(reads, repeat) * 1000

    admin_dir = run_dir.parent / "admin"
    auth.init_admin(admin_dir, user="admin", password=PASSWORD)
    figures: dict[str, Any] = {"run_id": run_id, "sites": sites, "rounds": rounds, "repeat": repeat, "store_reads_ms": baseline_ms}
    settings = Settings(store=run_dir, admin_dir=admin_dir)
    with TestClient(create_app(settings), base_url="http://127.0.0.1", follow_redirects=False) as client:
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
        assert token is not None, "the login page has no CSRF token"
        login = client.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": token.group(1)})
        if login.status_code != 303:
            raise RuntimeError(f"bench console: the login was refused ({login.status_code})")
        for name, path in (("runs", "/runs"), ("run", f"/runs/{run_id}"), ("sites", "/sites"), ("privacy", f"/privacy?run={run_id}"), ("audit", "/audit")):

            def get(path: str = path) -> None:
                response = client.get(path)
                if response.status_code != 200:
                    raise RuntimeError(f"bench console: {path} answered {response.status_code}")

            ms = _median_s(get, repeat) * 1000
            figures[f"page_{name}_ms"] = ms
            figures[f"page_{name}_over_reads"] = ms / baseline_ms
    report: dict[str, Any] = {}

    def build() -> None:
        report.update(privacy_report_for_run(run_dir, run_id=run_id))

    figures["report_build_s"] = _median_s(build, repeat)
    for fmt in ("json", "md", "csv", "html"):
        figures[f"report_render_{fmt}_s"] = _median_s(lambda fmt=fmt: render_report(report, fmt), repeat)
    figures["report_problems"] = sum(len(s["problems"]) for s in report["sites"]) + len(report.get("problems", []))
    json.dumps(figures)  # every figure is plain JSON
    return figures


__all__ = ["console"]
