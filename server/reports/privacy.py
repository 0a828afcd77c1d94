"""Privacy budget reports: what each site of a run, or each data set of a ledger, spent, as a
plain JSON-able dict (the report's JSON format, schema ``fedface.privacy-report/1``, which the
renderers and the console's privacy page show).

Two builders:

:func:`privacy_report_for_run`
    A run of a run store. Where the sites' ledgers are reachable (``--ledger-dir``, or the
    ``ledgers.json`` of a ``fedface simulate`` run directory) the mechanism and every epsilon
    come from each site's ledger, and are held against the run store's figures (to the bit)
    and the signed receipts it keeps; otherwise (a deployed server's store) from the run store
    alone, as the sites reported them, with the receipts' signatures and figures checked.
    Each site object names where its figures came from (``figures_from``).
:func:`privacy_report_for_ledger`
    A site's own report from its ledger file: every data set, every run it joined, the ledger's
    integrity, and the check against a receipts file when one is given.

The run store is read only through :mod:`fedface.server.queries` and the store's read
methods. Numbers are exact floats (never rounded); only text rounds, the safe way. No image,
embedding, key or identity name is ever read into a report: counts only.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedface.common import wire
from fedface.common.errors import ConfigError, LedgerError, RunDirError
from fedface.common.privacy.ledger import PrivacyLedger, Session
from fedface.server.queries import RoundRow, SpendPoint, run_timeline, site_spend_series
from fedface.server.reports import evidence
from fedface.server.reports.sections import (
    PROTECTIONS,
    SCHEMA,
    UNIT_OF_PRIVACY,
    accountant_section,
    budget_section,
    compose,
    delta_vs_n,
    group_privacy,
    mechanism_section,
    statement,
)
from fedface.server.run_records import RunSummary
from fedface.server.site_reports import SiteReport
from fedface.server.store import RunStore

STORE_FILE = "runs.sqlite"
LEDGERS_FILE = "ledgers.json"
LEDGER_FILE = "ledger.sqlite"
FROM_STORE = "the server's run store, as the site reported it"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _version() -> str | None:
    try:
        return importlib.metadata.version("fedface")
    except importlib.metadata.PackageNotFoundError:
        return None


def _envelope(kind: str, paths: dict[str, str | None], figures: str) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "generated_at": _now(),
        "fedface_version": _version(),
        "source": {"kind": kind, "figures": figures, "paths": paths},
        "protections": PROTECTIONS,
    }


# --- sessions and rounds -----------------------------------------------------------------------


def _session_dict(s: Session) -> dict[str, Any]:
    m = s.mechanism
    return {
        "session_id": s.id,
        "run_id": s.run_id,
        "round": s.round,
        "examples": s.examples,
        "noise_multiplier": m.noise_multiplier,
        "sample_rate": m.sample_rate,
        "steps": m.steps,
        "max_grad_norm": m.max_grad_norm,
        "delta": m.delta,
        "secure_mode": m.secure_mode,
        "epsilon_after": s.epsilon_after,
        "epsilon_delta": s.epsilon_delta,
        "accountant": s.epsilon_accountant,
        "created_at": s.created_at,
    }


def _reported_session(report: SiteReport, point: SpendPoint, examples: int | None) -> dict[str, Any]:
    """A charged round as the site reported it (calibration delta and secure mode are not reported)."""
    return {
        "session_id": None,
        "run_id": report.run_id,
        "round": report.round,
        "examples": examples,
        "noise_multiplier": report.noise_multiplier,
        "sample_rate": report.sample_rate,
        "steps": report.steps,
        "max_grad_norm": report.max_grad_norm,
        "delta": None,
        "secure_mode": None,
        "epsilon_after": point.epsilon,
        "epsilon_delta": point.delta,
        "accountant": point.accountant,
        "created_at": report.recorded_at,
    }


def _run_epsilons(
    sessions: Sequence[dict[str, Any]], delta: float | None, accountant: str | None, problems: list[str], *, per_round: str | None
) -> list[float | None]:
    """The run epsilon after each session (its run's sessions up to it composed at the site's
    delta): after every session of run ``per_round``, and after the last session of every other
    run (``None`` between: an accountant call is slow, and only the run's total is shown)."""
    last = {s["run_id"]: i for i, s in enumerate(sessions)}
    out: list[float | None] = []
    by_run: dict[str, list[dict[str, Any]]] = {}
    for i, s in enumerate(sessions):
        run = s["run_id"]
        by_run.setdefault(run, []).append(s)
        if run != per_round and i != last[run]:
            out.append(None)
            continue
        try:
            out.append(compose(by_run[run], delta=delta, accountant=accountant))
        except ValueError as exc:
            problems.append(f"cannot compose run {run} at delta {delta!r} ({accountant}): {exc}")
            out.append(None)
    return out


def _runs_list(sessions: Sequence[dict[str, Any]], run_eps: Sequence[float | None]) -> list[dict[str, Any]]:
    """Every run the sessions belong to, in order of first charge, with its own epsilon."""
    runs: dict[str, dict[str, Any]] = {}
    for s, eps in zip(sessions, run_eps, strict=True):
        entry = runs.setdefault(
            s["run_id"], {"run_id": s["run_id"], "sessions": 0, "first_at": s["created_at"], "last_at": None, "epsilon": None}
        )
        entry["sessions"] += 1
        entry["last_at"] = s["created_at"]
        entry["epsilon"] = eps
        entry["epsilon_lifetime_after"] = s["epsilon_after"]
    return list(runs.values())


def _round_entry(
    *, run_id: str, round_: int | None, lifetime: float | None, run_eps: float | None, status: str,
    recorded_at: str | None, source: str, budget: float | None, remaining: float | None,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "round": round_,
        "epsilon_lifetime": lifetime,
        "epsilon_run": run_eps,
        "budget_epsilon": budget,
        "remaining": remaining,
        "status": status,
        "recorded_at": recorded_at,
        "source": source,
    }


def _finish(site: dict[str, Any], *, run: dict[str, Any] | None, generated_at: str) -> dict[str, Any]:
    """The sections computed from a site's figures, its problems gathered, and its statement."""
    eps, delta = site["epsilon"]["lifetime"], site["delta"]
    site["delta_vs_1_over_n"] = delta_vs_n(delta, site["mechanism"]["examples"])
    site["group_privacy"] = group_privacy(eps, delta, site["people"].get("max_images_per_person"))
    site["problems"] = [*site["problems"], *site["receipts"]["problems"]]
    site["statement"] = statement(site, run=run, generated_at=generated_at)
    return site


def _site_base(site: str, dataset: str, figures_from: str, people: dict[str, Any]) -> dict[str, Any]:
    return {"site": site, "dataset": dataset, "unit_of_privacy": UNIT_OF_PRIVACY, "figures_from": figures_from, "people": people}


# --- a site of a run, from its ledger ----------------------------------------------------------


def _ledger_site(
    site: str,
    book: PrivacyLedger,
    *,
    run_id: str,
    dataset: str,
    rows: Sequence[RoundRow],
    reports: dict[int, SiteReport],
    stored: Sequence[Any],
    reported: dict[tuple[str, int], float],
    people: dict[str, Any],
) -> dict[str, Any]:
    problems: list[str] = []
    state = evidence.integrity(book)
    if state != "ok":
        problems.append(f"ledger integrity: {state}")
    if dataset not in book.datasets():
        problems.append(f"the ledger {book.path} holds no data set {dataset!r}")
    every = [_session_dict(s) for s in book.sessions(dataset)]
    try:
        spend = book.spend(dataset)
        lifetime, delta, acct, total = spend.epsilon, spend.delta, spend.accountant, spend.sessions
    except ConfigError as exc:
        problems.append(str(exc))
        lifetime, delta, acct, total = None, None, None, len(every)
    budget = book.budget(dataset)
    run_eps = _run_epsilons(every, delta, acct, problems, per_round=run_id)
    mine = [(s, e) for s, e in zip(every, run_eps, strict=True) if s["run_id"] == run_id]
    part = {row.round: p for row in rows for p in row.participation if p.site == site}
    started = {row.round: row.started_at for row in rows}
    budget_eps = budget.epsilon if budget is not None else None
    rounds = []
    for s, eps in mine:
        p = part.get(s["round"])
        where = f"round {s['round']}"
        status = p.status if p is not None else "charged; round not recorded in the run store"
        rounds.append(_round_entry(
            run_id=run_id, round_=s["round"], lifetime=s["epsilon_after"], run_eps=eps, status=status,
            recorded_at=s["created_at"], source="ledger", budget=budget_eps,
            remaining=None if budget_eps is None else max(0.0, budget_eps - s["epsilon_after"]),
        ))
        if p is None:
            continue
        if p.epsilon is None:
            if p.status == wire.ANSWERED:
                problems.append(f"{where}: the run store records no epsilon, the ledger's session {s['session_id']} {s['epsilon_after']!r}")
        elif not evidence.same_bits(p.epsilon, s["epsilon_after"]):
            problems.append(
                f"{where}: the run store records epsilon {p.epsilon!r}, the ledger's session {s['session_id']} "
                f"{s['epsilon_after']!r}"
            )
        if p.epsilon is not None and (not evidence.same_bits(p.delta, s["epsilon_delta"]) or p.accountant != s["accountant"]):
            problems.append(
                f"{where}: the run store records delta {p.delta!r} ({p.accountant}), the ledger {s['epsilon_delta']!r} ({s['accountant']})"
            )
        if p.examples != s["examples"]:
            problems.append(f"{where}: the run store records {p.examples} images, the ledger {s['examples']}")
        rep = reports.get(s["round"])
        if rep is not None:
            for key in ("noise_multiplier", "sample_rate", "steps", "max_grad_norm"):
                if getattr(rep, key) is not None and not evidence.same_bits(getattr(rep, key), s[key]):
                    problems.append(f"{where}: the site reported {key} {getattr(rep, key)!r}, the ledger records {s[key]!r}")
    charged = {s["round"] for s, _ in mine}
    for rnd, p in sorted(part.items()):
        if rnd in charged or p.epsilon is None:
            continue
        if p.status == wire.ANSWERED:
            problems.append(f"round {rnd}: the run store records a private round with epsilon {p.epsilon!r}, the ledger no session of it")
        rounds.append(_round_entry(
            run_id=run_id, round_=rnd, lifetime=p.epsilon, run_eps=None, status=p.status + (f" ({p.reason})" if p.reason else ""),
            recorded_at=started.get(rnd), source="run store", budget=p.budget_epsilon, remaining=p.remaining,
        ))
    rounds.sort(key=lambda r: r["round"])
    latest = [p for _, p in sorted(part.items()) if p.budget_epsilon is not None]
    if latest and not evidence.same_bits(latest[-1].budget_epsilon, budget_eps):
        problems.append(f"the site last reported budget epsilon {latest[-1].budget_epsilon!r}, its ledger's budget is {budget_eps!r}")
    run_sessions = [s for s, _ in mine]
    runs = _runs_list(every, run_eps)
    return {
        **_site_base(site, dataset, f"the site's privacy ledger {book.path}", people),
        "mechanism": mechanism_section(run_sessions),
        "accountant": accountant_section(acct),
        "delta": delta,
        "epsilon": {
            "run": mine[-1][1] if mine else 0.0,
            "lifetime": lifetime,
            "sessions": total,
            "runs": len(runs),
        },
        "budget": budget_section(budget_eps, budget.delta if budget is not None else None, lifetime),
        "rounds": rounds,
        "runs": runs,
        "receipts": evidence.stored_receipts_with_ledger(stored, book, key_dir=book.path.parent, reported=reported),
        "ledger": {"path": str(book.path), "integrity": state},
        "problems": problems,
    }


# --- a site of a run, from the run store alone -------------------------------------------------


def _store_site(
    site: str,
    *,
    run_id: str,
    rows: Sequence[RoundRow],
    reports: Sequence[SiteReport],
    points: Sequence[SpendPoint],
    stored: Sequence[Any],
    reported: dict[tuple[str, int], float],
    people: dict[str, Any],
    ledger_note: str,
    extra_problems: Sequence[str] = (),
) -> dict[str, Any]:
    problems = list(extra_problems)
    part = {row.round: p for row in rows for p in row.participation if p.site == site}
    started = {row.round: row.started_at for row in rows}
    last = points[-1] if points else None
    delta, acct = (last.delta, last.accountant) if last is not None else (None, None)
    lifetime = last.epsilon if last is not None else None
    # every charged round the store knows of, of every run (a report with a mechanism and a spend)
    every_part = {(pt.run_id, pt.round): pt for pt in points}
    sessions = []
    for rep in reports:
        pt = every_part.get((rep.run_id, rep.round))
        if rep.noise_multiplier is None or rep.sample_rate is None or rep.steps is None or pt is None:
            continue
        p = part.get(rep.round) if rep.run_id == run_id else None
        sessions.append(_reported_session(rep, pt, p.examples if p is not None else None))
    run_eps = _run_epsilons(sessions, delta, acct, problems, per_round=run_id)
    eps_of = {(s["run_id"], s["round"]): e for s, e in zip(sessions, run_eps, strict=True)}
    run_sessions = [s for s in sessions if s["run_id"] == run_id]
    rounds = []
    for pt in points:
        if pt.run_id != run_id:
            continue
        p = part.get(pt.round)
        reason = f" ({p.reason})" if p is not None and p.reason else ""
        rounds.append(_round_entry(
            run_id=run_id, round_=pt.round, lifetime=pt.epsilon, run_eps=eps_of.get((run_id, pt.round)),
            status=pt.status + reason, recorded_at=started.get(pt.round, pt.recorded_at), source="run store",
            budget=pt.budget_epsilon, remaining=pt.remaining,
        ))
    budget_eps = last.budget_epsilon if last is not None else None
    budget = budget_section(budget_eps, delta if budget_eps is not None else None, lifetime)
    if last is not None and last.remaining is not None and not evidence.same_bits(budget["remaining"], last.remaining):
        problems.append(f"the site reported remaining {last.remaining!r}, but its budget minus its spend is {budget['remaining']!r}")
    runs = _runs_list(sessions, run_eps)
    return {
        **_site_base(site, site, FROM_STORE, people),
        "mechanism": mechanism_section(run_sessions),
        "accountant": accountant_section(acct),
        "delta": delta,
        "epsilon": {
            "run": [eps_of[(s["run_id"], s["round"])] for s in run_sessions][-1] if run_sessions else 0.0,
            "lifetime": lifetime,
            "sessions": None,
            "runs": None,
        },
        "budget": budget,
        "rounds": rounds,
        "runs": runs,
        "receipts": evidence.stored_receipts_alone(stored, reported=reported),
        "ledger": {"path": None, "integrity": ledger_note},
        "problems": problems,
    }


# --- the run report ----------------------------------------------------------------------------


def _resolve_store(path: Path) -> tuple[Path, Path | None]:
    """(run store file, run directory or None) of a run directory or a run store file."""
    path = Path(path)
    if path.is_dir():
        store = path / STORE_FILE
        if not store.is_file():
            raise RunDirError(
                f"no run store ({STORE_FILE}) in {path}: pass the directory of a `fedface simulate` run or a "
                "deployed server's --run-dir, or the run store file itself"
            )
        return store, path
    if path.is_file():
        return path, path.parent if (path.parent / LEDGERS_FILE).is_file() or (path.parent / "partition.json").is_file() else None
    raise RunDirError(
        f"run directory {path} does not exist: pass the directory of a `fedface simulate` run (it holds {STORE_FILE}) "
        "or a run store file"
    )


def _pick_run(store: RunStore, run_id: str | None) -> RunSummary:
    runs = store.runs()
    if not runs:
        raise RunDirError(f"run store {store.path} holds no run yet: report on it once a run has started")
    if run_id is None:
        return runs[-1]
    for run in runs:
        if run.run_id == run_id:
            return run
    known = ", ".join(r.run_id for r in runs[-10:])
    raise RunDirError(f"no run {run_id!r} in run store {store.path} (its runs: {known}): pass --run with one of them")


def _ledger_root(run_dir: Path | None, ledger_dir: Path | None) -> tuple[Path | None, str]:
    """The folder of the sites' ledgers, and how it was found (or why there is none)."""
    if ledger_dir is not None:
        if not Path(ledger_dir).is_dir():
            raise LedgerError(
                f"ledger directory {ledger_dir} does not exist: pass the folder holding <site>/{LEDGER_FILE} "
                f"(the one a simulate run's {LEDGERS_FILE} names)"
            )
        return Path(ledger_dir), "given"
    if run_dir is None or not (run_dir / LEDGERS_FILE).is_file():
        return None, "not checked: no ledger here (a deployed server's store holds none); the figures are the sites' reports"
    try:
        return Path(json.loads((run_dir / LEDGERS_FILE).read_text(encoding="utf-8"))["ledger_dir"]), LEDGERS_FILE
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"cannot read {run_dir / LEDGERS_FILE} ({exc}): pass --ledger-dir DIR") from None


def _run_section(run: RunSummary, sites: Sequence[str]) -> dict[str, Any]:
    privacy = run.config.get("privacy", {})
    target = privacy.get("epsilon")
    return {
        "run_id": run.run_id,
        "status": run.status,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "rounds_planned": run.rounds_planned,
        "rounds_done": run.rounds_done,
        "secagg": run.secagg,
        "sites": run.sites,
        "site_names": list(sites),
        "target_epsilon": float(target) if isinstance(target, (int, float)) and math.isfinite(target) else None,
        "error": run.error,
    }


def _metric(metrics: dict[str, float], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None or math.isnan(value) else value


def _accuracy_vs_epsilon(rows: Sequence[RoundRow], sites: Sequence[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        here = [r for s in sites for r in s["rounds"] if r["run_id"] == run_id and r["round"] == row.round]
        life = [r["epsilon_lifetime"] for r in here if r["epsilon_lifetime"] is not None]
        runs = [r["epsilon_run"] for r in here if r["epsilon_run"] is not None]
        out.append({
            "round": row.round,
            "verif_acc": _metric(row.metrics, "verif_acc"),
            "verif_auc": _metric(row.metrics, "verif_auc"),
            "max_epsilon_lifetime": max(life, default=None),
            "max_epsilon_run": max(runs, default=None),
        })
    return out


def privacy_report_for_run(
    store_path: Path, *, run_id: str | None = None, site: str | None = None, ledger_dir: Path | None = None
) -> dict[str, Any]:
    """The privacy report of one run: one object per site of the run (see the module docstring).

    Parameters
    ----------
    store_path
        A run store file (``runs.sqlite``) or a run directory holding one.
    run_id
        The run; ``None``: the store's latest.
    site
        Only this site; ``None``: every site the run sampled or heard from.
    ledger_dir
        The folder of the sites' ledgers (``<ledger_dir>/<site>/ledger.sqlite``); ``None``: the
        one a simulate run directory's ``ledgers.json`` names, else none (run store figures).

    Raises
    ------
    RunDirError
        When there is no such directory or run store, the store holds no run, or no run ``run_id``.
    ConfigError
        When ``site`` is not a site of the run.
    LedgerError
        When ``ledger_dir`` is given but missing, or a site's ledger is not a fedface ledger.
    """
    store_file, run_dir = _resolve_store(store_path)
    root, how = _ledger_root(run_dir, ledger_dir)
    generated = _now()
    with RunStore(store_file, create=False) as store:
        run = _pick_run(store, run_id)
        _, rows = run_timeline(store, run.run_id)
        reports = store.site_reports(run_id=run.run_id)
        sampled = {name for record in store.rounds(run.run_id) for name in record.sampled}
        names = sorted({*sampled, *(p.site for r in rows for p in r.participation), *(x.site for x in reports)})
        if site is not None:
            if site not in names:
                raise ConfigError(
                    f"site {site!r} is not a site of run {run.run_id} (its sites: {', '.join(names) or 'none yet'}): "
                    "pass --site with one of them"
                )
            names = [site]
        series = site_spend_series(store)
        people, people_source = evidence.people_of_run(run_dir, run.config.get("data", {}))
        sites = []
        for name in names:
            points = series[name].points if name in series else []
            reported = {(pt.run_id, pt.round): pt.epsilon for pt in points}
            stored = store.receipts(site=name)
            who = {"identities": None, "max_images_per_person": None, **people.get(name, {}), "source": people_source}
            if name not in people and people:
                who["source"] = f"unknown: {name} is not a site of the run directory's partition"
            path = None if root is None else root / name / LEDGER_FILE
            if path is not None and path.is_file():
                dataset = next((json.loads(s.receipt).get("dataset") for s in stored if s.problem_kind is None), name)
                with PrivacyLedger(path, create=False) as book:
                    entry = _ledger_site(
                        name, book, run_id=run.run_id, dataset=str(dataset), rows=rows,
                        reports={x.round: x for x in reports if x.site == name}, stored=stored, reported=reported, people=who,
                    )
            else:
                missing = [] if path is None else [f"no ledger at {path} ({how}): figures from the run store"]
                entry = _store_site(
                    name, run_id=run.run_id, rows=rows, reports=store.site_reports(site=name), points=points,
                    stored=stored, reported=reported, people=who, extra_problems=missing,
                    ledger_note=how if path is None else f"not checked: no ledger at {path}",
                )
            sites.append(entry)
        run_part = _run_section(run, names)
    for entry in sites:
        _finish(entry, run=run_part, generated_at=generated)
    figures = {s["figures_from"] == FROM_STORE for s in sites}
    report = _envelope(
        "run",
        {"run_store": str(store_file), "run_dir": None if run_dir is None else str(run_dir),
         "ledger_dir": None if root is None else str(root), "ledger": None, "receipts": None},
        "run store" if figures == {True} else "ledger" if figures == {False} else "ledger and run store",
    )
    report["generated_at"] = generated
    report.update(
        run=run_part,
        sites=sites,
        accuracy_vs_epsilon=_accuracy_vs_epsilon(rows, sites, run.run_id),
        problems=[f"{s['site']}: {p}" for s in sites for p in s["problems"]],
    )
    return report


# --- the ledger report -------------------------------------------------------------------------


def privacy_report_for_ledger(ledger_path: Path, *, site: str | None = None, receipts_path: Path | None = None) -> dict[str, Any]:
    """A site's own privacy report from its ledger file: one object per data set.

    Parameters
    ----------
    ledger_path
        The site's ledger (``ledger.sqlite``).
    site
        Only this data set (a simulated site's data set is its name); ``None``: every one.
    receipts_path
        A receipts file exported by ``fedface privacy receipts``, checked against the ledger
        under the ``receipt.pub`` beside it; ``None``: "not checked: no receipts given".

    Raises
    ------
    LedgerError
        When the file is missing or not a fedface ledger, or ``receipts_path`` is not a file.
    ConfigError
        When ``site`` is not a data set of the ledger.
    """
    path = Path(ledger_path)
    if not path.is_file():
        raise LedgerError(f"no privacy ledger at {path}: pass --ledger with a site's ledger file (ledger.sqlite)")
    generated = _now()
    with PrivacyLedger(path, create=False) as book:
        state = evidence.integrity(book)
        names = book.datasets()
        if site is not None:
            if site not in names:
                raise ConfigError(
                    f"data set {site!r} is not in privacy ledger {path} (its data sets: {', '.join(map(repr, names)) or 'none'}): "
                    "pass --site with one of them"
                )
            names = [site]
        receipts, checked = evidence.receipts_file(book, receipts_path)
        sites = []
        for name in names:
            problems = [] if state == "ok" else [f"ledger integrity: {state}"]
            every = [_session_dict(s) for s in book.sessions(name)]
            try:
                spend = book.spend(name)
                lifetime, delta, acct = spend.epsilon, spend.delta, spend.accountant
            except ConfigError as exc:
                problems.append(str(exc))
                lifetime, delta, acct = None, None, None
            budget = book.budget(name)
            budget_eps = budget.epsilon if budget is not None else None
            run_eps = _run_epsilons(every, delta, acct, problems, per_round=None)
            rounds = [
                _round_entry(
                    run_id=s["run_id"], round_=s["round"], lifetime=s["epsilon_after"], run_eps=e, status="charged",
                    recorded_at=s["created_at"], source="ledger", budget=budget_eps,
                    remaining=None if budget_eps is None else max(0.0, budget_eps - s["epsilon_after"]),
                )
                for s, e in zip(every, run_eps, strict=True)
            ]
            runs = _runs_list(every, run_eps)
            mine = {**checked, "count": sum(r.dataset == name for r in receipts), "problems": list(checked["problems"])}
            sites.append({
                **_site_base(name, name, f"the site's privacy ledger {path}", {
                    "identities": None, "max_images_per_person": None,
                    "source": "unknown: a ledger records images, not people",
                }),
                "mechanism": mechanism_section(every),
                "accountant": accountant_section(acct),
                "delta": delta,
                "epsilon": {"run": None, "lifetime": lifetime, "sessions": len(every), "runs": len(runs)},
                "budget": budget_section(budget_eps, budget.delta if budget is not None else None, lifetime),
                "rounds": rounds,
                "runs": runs,
                "receipts": mine,
                "ledger": {"path": str(path), "integrity": state},
                "problems": problems,
            })
    for entry in sites:
        _finish(entry, run=None, generated_at=generated)
    report = _envelope(
        "ledger",
        {"run_store": None, "run_dir": None, "ledger_dir": None, "ledger": str(path),
         "receipts": None if receipts_path is None else str(receipts_path)},
        "ledger",
    )
    report["generated_at"] = generated
    report.update(
        run=None, sites=sites, accuracy_vs_epsilon=None,
        problems=[f"{s['site']}: {p}" for s in sites for p in s["problems"]],
    )
    return report


__all__ = ["FROM_STORE", "LEDGERS_FILE", "LEDGER_FILE", "STORE_FILE", "privacy_report_for_ledger", "privacy_report_for_run"]
