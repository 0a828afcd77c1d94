"""`fedface report privacy` end to end: a real `fedface simulate` of 3 sites x 3 rounds on ORL
(SecAgg+, DP-SGD at every site, each site's lifetime budget set by the scenario's
[site-policy]), then the run's report in every format through the CLI, held to the bit against
the sites' ledgers; and a site's own report from its ledger and the receipts the server exported.
"""

from __future__ import annotations

import base64
import csv
import gc
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from typer.testing import CliRunner

from fedface.common.privacy.accounting import compute_epsilon, format_epsilon
from fedface.common.privacy.ledger import PrivacyLedger
from fedface.simulations.cli import app

pytestmark = [
    pytest.mark.integration,
    # Ray's helper processes leave ResourceWarnings at shutdown (see tests/integration/test_simulate.py)
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

runner = CliRunner()
SITES = ["site-000", "site-001", "site-002"]
BUDGET = 25.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, orl_root: Path) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    scenario = tmp / "scenario.toml"
    scenario.write_text(tomli_w.dumps({
        "data": {"root": str(orl_root), "image-size": [32, 32]},
        "model": {"hidden-size": 8, "embedding-dim": 8, "downsample": 2},
        "evaluation": {"shift-tta": 0, "occlusion-box": 8},
        "training": {"batch-size": 16, "device": "cpu"},
        "federation": {"identities-per-site": 4, "test-identities": 10, "secagg": True},
        "site-policy": {"budget-epsilon": BUDGET},
    }))
    out = tmp / "run"
    result = runner.invoke(app, [
        "simulate", "-c", str(scenario), "--sites", "3", "--rounds", "3", "--epsilon", "6", "--out", str(out),
        "--ledger-dir", str(tmp / "ledgers"), "--format", "json", "-q",
    ])
    gc.collect()  # Ray's dropped Popen objects, under this module's warning filters
    assert result.exit_code == 0, result.stderr
    return out


def _report(*args: str) -> str:
    result = runner.invoke(app, ["report", "privacy", *args])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def _ledger(run: Path, site: str) -> Path:
    return Path(json.loads((run / "ledgers.json").read_text())["ledger_dir"]) / site / "ledger.sqlite"


def _truth(run: Path) -> dict[str, dict[str, Any]]:
    truth = {}
    for site in SITES:
        with PrivacyLedger(_ledger(run, site), create=False) as book:
            sessions = book.sessions(site)
            truth[site] = {"spend": book.spend(site), "sessions": sessions, "budget": book.budget(site)}
    return truth


def test_report_json_equals_the_ledgers_to_the_bit(run: Path) -> None:
    truth = _truth(run)

    report = json.loads(_report(str(run), "--format", "json"))

    assert report["schema"] == "fedface.privacy-report/1" and report["source"]["figures"] == "ledger"
    assert report["run"]["rounds_done"] == 3 and report["run"]["secagg"] is True
    assert [s["site"] for s in report["sites"]] == SITES
    for site in report["sites"]:
        t = truth[site["site"]]
        assert site["epsilon"]["lifetime"] == t["spend"].epsilon
        assert [r["epsilon_lifetime"] for r in site["rounds"]] == [s.epsilon_after for s in t["sessions"]]
        history = [s.mechanism.history_entry() for s in t["sessions"]]
        assert site["epsilon"]["run"] == compute_epsilon(history, delta=t["spend"].delta, accountant=t["spend"].accountant)
        assert site["budget"] == {"epsilon": BUDGET, "delta": t["budget"].delta, "remaining": t["spend"].remaining}
        assert site["mechanism"]["noise_multiplier"] == t["sessions"][0].mechanism.noise_multiplier
        assert site["mechanism"]["examples"] == t["sessions"][0].examples == 40
        assert site["people"] == {"identities": 4, "max_images_per_person": 10, "source": site["people"]["source"]}
        assert site["receipts"]["verified"] is True and site["receipts"]["count"] == 3
        assert site["ledger"]["integrity"] == "ok" and site["problems"] == []
    assert report["problems"] == []
    assert [p["round"] for p in report["accuracy_vs_epsilon"]] == [1, 2, 3]
    assert all(0.0 <= p["verif_acc"] <= 1.0 for p in report["accuracy_vs_epsilon"])


def test_every_text_format_shows_the_figures_rounded_the_safe_way(run: Path) -> None:
    truth = _truth(run)

    markdown = _report(str(run), "--format", "md")
    rows = list(csv.DictReader(io.StringIO(_report(str(run), "--format", "csv"))))
    html = _report(str(run), "--format", "html")

    for site, t in truth.items():
        shown, left = format_epsilon(t["spend"].epsilon, rounding="up"), format_epsilon(t["spend"].remaining, rounding="down")
        assert shown in markdown and left in markdown and f"<td>{shown}</td>" in html and f"<td>{left}</td>" in html
        mine = [r for r in rows if r["site"] == site]
        assert [float(r["epsilon_lifetime"]) for r in mine] == [s.epsilon_after for s in t["sessions"]]
        assert [r["epsilon_lifetime_display"] for r in mine] == [format_epsilon(s.epsilon_after) for s in t["sessions"]]
        assert {r["budget_epsilon"] for r in mine} == {repr(BUDGET)}
    assert not re.search(r"https?://", html)
    charts = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(charts) == len(SITES) + 1
    assert all(len(base64.b64decode(c)) > 10_000 for c in charts)  # drawn, not empty


def test_a_sites_own_report_checks_its_ledger_against_the_exported_receipts(run: Path, tmp_path: Path) -> None:
    receipts = tmp_path / "site-001.receipts.jsonl"
    exported = runner.invoke(app, ["privacy", "receipts", "--run-store", str(run / "runs.sqlite"), "--site", "site-001",
                                   "--out", str(receipts)])
    assert exported.exit_code == 0, exported.stderr
    truth = _truth(run)["site-001"]

    report = json.loads(_report("--ledger", str(_ledger(run, "site-001")), "--receipts", str(receipts), "--format", "json"))

    site = report["sites"][0]
    assert report["run"] is None and site["site"] == "site-001"
    assert site["receipts"]["checked"] is True and site["receipts"]["verified"] is True and site["receipts"]["count"] == 3
    assert site["epsilon"]["lifetime"] == truth["spend"].epsilon
    assert [r["epsilon_lifetime"] for r in site["rounds"]] == [s.epsilon_after for s in truth["sessions"]]


def test_a_sites_own_report_takes_its_receipts_from_the_export_of_every_site(run: Path, tmp_path: Path) -> None:
    every = tmp_path / "all.receipts.jsonl"
    exported = runner.invoke(app, ["privacy", "receipts", "--run-store", str(run / "runs.sqlite"), "--out", str(every)])
    assert exported.exit_code == 0, exported.stderr

    report = json.loads(_report("--ledger", str(_ledger(run, "site-001")), "--receipts", str(every), "--format", "json"))
    markdown = _report("--ledger", str(_ledger(run, "site-001")), "--receipts", str(every), "--format", "md")

    receipts = report["sites"][0]["receipts"]
    assert (receipts["verified"], receipts["count"], receipts["left_out"], receipts["problems"]) == (True, 3, 6, [])
    assert "6 receipts of other sites (data sets 'site-000', 'site-002') left out" in receipts["summary"]
    assert "| verified | yes |" in markdown and "| receipts | 3 |" in markdown


def test_one_site_of_one_run_to_a_file(run: Path, tmp_path: Path) -> None:
    run_id = json.loads(_report(str(run), "--format", "json"))["run"]["run_id"]
    out = tmp_path / "site-002.html"

    result = runner.invoke(app, ["report", "privacy", str(run), "--run", run_id, "--site", "site-002", "--format", "html",
                                 "--out", str(out)])

    assert result.exit_code == 0, result.stderr
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and "Site site-002" in text and "Site site-000" not in text
