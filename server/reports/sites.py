"""The site objects of a privacy report (:mod:`fedface.server.reports.privacy`), one per site
of a run or data set of a ledger, each from the evidence at hand:

:func:`run_site_from_ledger`
    A site of a run whose ledger is reachable: every figure from the ledger (sessions, spend,
    budget), each of the run's rounds held to the bit against what the run store recorded and
    the site reported (epsilon, delta, accountant, images, mechanism), and the store's receipts
    held against the ledger.
:func:`run_site_from_store`
    A site of a run from the run store alone: the mechanism and spend as the site reported them,
    the run's epsilon composed here from the reported mechanism, the receipts' signatures and
    figures checked.
:func:`ledger_site`
    A data set of a site's own ledger: every session of every run.

Every disagreement is a line in the site's ``problems``; :func:`finish_site` adds the sections
computed from the figures and the statement.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fedface.common import wire
from fedface.common.errors import ConfigError
from fedface.common.privacy.ledger import PrivacyLedger, Session
from fedface.server.queries import RoundRow, SpendPoint
from fedface.server.reports import evidence
from fedface.server.reports.sections import (
    UNIT_OF_PRIVACY,
    accountant_section,
    budget_section,
    compose,
    delta_vs_n,
    group_privacy,
    mechanism_section,
    rounds_text,
    statement,
)
from fedface.server.run_records import Participation
from fedface.server.site_reports import SiteReport

FROM_STORE = "the server's run store, as the site reported it"
_T = TypeVar("_T")


def spend_of(book: PrivacyLedger, dataset: str, problems: list[str]) -> tuple[float | None, float | None, str | None]:
    """(lifetime epsilon, delta, accountant) of a data set's spend; ``None`` each, and a problem, when it cannot be composed."""
    try:
        spend = book.spend(dataset)
    except ConfigError as exc:
        problems.append(str(exc))
        return None, None, None
    return spend.epsilon, spend.delta, spend.accountant


# --- sessions and rounds -----------------------------------------------------------------------


def session_dict(s: Session) -> dict[str, Any]:
    """A ledger session as the report lists it (the mechanism flattened)."""
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


def reported_session(report: SiteReport, point: SpendPoint | None, examples: int | None) -> dict[str, Any]:
    """A charged round as the site reported it (calibration delta and secure mode are not
    reported; without a spend ``point``, the epsilon after it is not known either)."""
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
        "epsilon_after": None if point is None else point.epsilon,
        "epsilon_delta": None if point is None else point.delta,
        "accountant": None if point is None else point.accountant,
        "created_at": report.recorded_at,
    }


def run_epsilons(
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


def runs_list(sessions: Sequence[dict[str, Any]], run_eps: Sequence[float | None]) -> list[dict[str, Any]]:
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


def round_entry(
    *, run_id: str, round_: int | None, lifetime: float | None, run_eps: float | None, status: str,
    recorded_at: str | None, source: str, budget: float | None, remaining: float | None,
) -> dict[str, Any]:
    """One entry of a site's ``rounds``: its spend after the round, and where that came from."""
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


def finish_site(site: dict[str, Any], *, run: dict[str, Any] | None, generated_at: str) -> dict[str, Any]:
    """The sections computed from a site's figures, its problems gathered, and its statement."""
    eps, delta = site["epsilon"]["lifetime"], site["delta"]
    site["delta_vs_1_over_n"] = delta_vs_n(delta, site["mechanism"]["examples"])
    site["group_privacy"] = group_privacy(
        eps, delta, site["people"].get("max_images_per_person"), site["mechanism"]["examples"]
    )
    site["problems"] = [*site["problems"], *site["receipts"]["problems"]]
    site["statement"] = statement(site, run=run, generated_at=generated_at)
    return site


def site_object(
    site: str,
    *,
    dataset: str,
    figures_from: str,
    people: dict[str, Any],
    sessions: Sequence[dict[str, Any]],
    unreported: Sequence[int] = (),
    accountant: str | None,
    delta: float | None,
    epsilon: dict[str, Any],
    budget: dict[str, Any],
    rounds: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    receipts: dict[str, Any],
    ledger: dict[str, Any],
    problems: list[str],
) -> dict[str, Any]:
    """A site object from its figures (:func:`finish_site` adds what is computed from them);
    ``unreported``: the run's charged rounds whose mechanism is not known (not in ``sessions``)."""
    return {
        "site": site,
        "dataset": dataset,
        "unit_of_privacy": UNIT_OF_PRIVACY,
        "figures_from": figures_from,
        "people": people,
        "mechanism": mechanism_section(sessions, unreported=unreported),
        "accountant": accountant_section(accountant),
        "delta": delta,
        "epsilon": epsilon,
        "budget": budget,
        "rounds": rounds,
        "runs": runs,
        "receipts": receipts,
        "ledger": ledger,
        "problems": problems,
    }


# --- a site of a run, from its ledger ----------------------------------------------------------


def _round_problems(where: str, p: Participation, s: dict[str, Any], rep: SiteReport | None) -> list[str]:
    """What the run store recorded of one round (``p``) and what the site reported (``rep``),
    against the ledger's session of it (``s``): every figure to the bit."""
    problems = []
    if p.epsilon is None:
        if p.status == wire.ANSWERED:
            problems.append(f"{where}: the run store records no epsilon, the ledger's session {s['session_id']} {s['epsilon_after']!r}")
    else:
        if not evidence.same_bits(p.epsilon, s["epsilon_after"]):
            problems.append(
                f"{where}: the run store records epsilon {p.epsilon!r}, the ledger's session {s['session_id']} "
                f"{s['epsilon_after']!r}"
            )
        if not evidence.same_bits(p.delta, s["epsilon_delta"]) or p.accountant != s["accountant"]:
            problems.append(
                f"{where}: the run store records delta {p.delta!r} ({p.accountant}), the ledger {s['epsilon_delta']!r} ({s['accountant']})"
            )
    if p.examples != s["examples"]:
        problems.append(f"{where}: the run store records {p.examples} images, the ledger {s['examples']}")
    for key in ("noise_multiplier", "sample_rate", "steps", "max_grad_norm"):
        value = None if rep is None else getattr(rep, key)
        if value is not None and not evidence.same_bits(value, s[key]):
            problems.append(f"{where}: the site reported {key} {value!r}, the ledger records {s[key]!r}")
    return problems


def run_site_from_ledger(
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
    """A site of run ``run_id`` from its ledger (data set ``dataset``), held against the run
    store's rounds (``rows``), the site's reports by round, and the receipts the store keeps
    (``stored``; ``reported``: the store's epsilon of each (run, round) of the site)."""
    problems: list[str] = []
    state = evidence.integrity(book)
    if state != "ok":
        problems.append(f"ledger integrity: {state}")
    if dataset not in book.datasets():
        problems.append(f"the ledger {book.path} holds no data set {dataset!r}")
    every = [session_dict(s) for s in book.sessions(dataset)]
    lifetime, delta, acct = spend_of(book, dataset, problems)
    budget = book.budget(dataset)
    run_eps = run_epsilons(every, delta, acct, problems, per_round=run_id)
    mine = [(s, e) for s, e in zip(every, run_eps, strict=True) if s["run_id"] == run_id]
    part = {row.round: p for row in rows for p in row.participation if p.site == site}
    started = {row.round: row.started_at for row in rows}
    budget_eps = budget.epsilon if budget is not None else None
    rounds = []
    for s, eps in mine:
        p = part.get(s["round"])
        status = p.status if p is not None else "charged; round not recorded in the run store"
        rounds.append(round_entry(
            run_id=run_id, round_=s["round"], lifetime=s["epsilon_after"], run_eps=eps, status=status,
            recorded_at=s["created_at"], source="ledger", budget=budget_eps,
            remaining=None if budget_eps is None else max(0.0, budget_eps - s["epsilon_after"]),
        ))
        if p is not None:
            problems += _round_problems(f"round {s['round']}", p, s, reports.get(s["round"]))
    charged = {s["round"] for s, _ in mine}
    for rnd, p in sorted(part.items()):
        if rnd in charged or p.epsilon is None:
            continue
        if p.status == wire.ANSWERED:
            problems.append(f"round {rnd}: the run store records a private round with epsilon {p.epsilon!r}, the ledger no session of it")
        rounds.append(round_entry(
            run_id=run_id, round_=rnd, lifetime=p.epsilon, run_eps=None, status=p.status + (f" ({p.reason})" if p.reason else ""),
            recorded_at=started.get(rnd), source="run store", budget=p.budget_epsilon, remaining=p.remaining,
        ))
    rounds.sort(key=lambda r: r["round"])
    latest = [p for _, p in sorted(part.items()) if p.budget_epsilon is not None]
    if latest and not evidence.same_bits(latest[-1].budget_epsilon, budget_eps):
        problems.append(f"the site last reported budget epsilon {latest[-1].budget_epsilon!r}, its ledger's budget is {budget_eps!r}")
    runs = runs_list(every, run_eps)
    return site_object(
        site, dataset=dataset, figures_from=f"the site's privacy ledger {book.path}", people=people,
        sessions=[s for s, _ in mine], accountant=acct, delta=delta,
        epsilon={"run": mine[-1][1] if mine else 0.0, "lifetime": lifetime, "sessions": len(every), "runs": len(runs)},
        budget=budget_section(budget_eps, budget.delta if budget is not None else None, lifetime),
        rounds=rounds, runs=runs,
        receipts=evidence.stored_receipts_with_ledger(stored, book, key_dir=book.path.parent, reported=reported),
        ledger={"path": str(book.path), "integrity": state}, problems=problems,
    )


# --- a site of a run, from the run store alone -------------------------------------------------


def in_time_order(items: Sequence[_T], when: Callable[[_T], str]) -> list[_T]:
    """``items`` in the order of their ISO-8601 times ``when(item)``, the given order between
    equal times (text order if a time does not parse: the store writes them all in UTC)."""

    def moment(text: str) -> dt.datetime:
        at = dt.datetime.fromisoformat(text)
        return at if at.tzinfo is not None else at.replace(tzinfo=dt.timezone.utc)

    try:
        keys: list[Any] = [moment(when(item)) for item in items]
    except (TypeError, ValueError):
        keys = [str(when(item)) for item in items]
    return [items[i] for i in sorted(range(len(items)), key=lambda i: (keys[i], i))]


def _where(pt: SpendPoint) -> str:
    return f"run {pt.run_id} round {pt.round}, {pt.recorded_at}"


def spend_decreases(ordered: Sequence[SpendPoint]) -> list[str]:
    """A problem for each time a site's reported lifetime epsilon went down (``ordered``: its
    points in recorded-time order): a spend only grows, so its ledger was rolled back, reset or
    replaced, or a report is wrong."""
    problems = []
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if cur.epsilon >= prev.epsilon:
            continue
        changed = ""
        if not evidence.same_bits(cur.delta, prev.delta) or cur.accountant != prev.accountant:
            changed = f"; it reported them at delta {prev.delta!r} ({prev.accountant}) and {cur.delta!r} ({cur.accountant})"
        problems.append(
            f"the site's reported lifetime epsilon went down, from {prev.epsilon!r} ({_where(prev)}) to {cur.epsilon!r} "
            f"({_where(cur)}){changed}: a spend only grows, so its ledger was rolled back, reset or replaced, or a report "
            "is wrong; the lifetime shown is the largest it reported"
        )
    return problems


def largest_spend(ordered: Sequence[SpendPoint]) -> SpendPoint | None:
    """The point of the largest reported lifetime epsilon (the latest of equal ones)."""
    top = None
    for pt in ordered:
        if top is None or pt.epsilon >= top.epsilon:
            top = pt
    return top


def _has_mechanism(rep: SiteReport) -> bool:
    return rep.noise_multiplier is not None and rep.sample_rate is not None and rep.steps is not None


def charged_sessions(
    ordered: Sequence[SpendPoint], reports: Sequence[SiteReport], part: dict[int, Participation], *, run_id: str
) -> tuple[list[dict[str, Any]], dict[str, list[int]], list[str]]:
    """Every round the store knows the site was charged for, of every run: one it answered with
    a spend, or one it reported a mechanism for. Returns the sessions of those with a reported
    mechanism (noise multiplier, sample rate, steps), in recorded-time order; per run, the
    charged rounds without one (their run's epsilon cannot be composed); and the problems of
    run ``run_id``'s rounds."""
    rep_of = {(r.run_id, r.round): r for r in reports}
    charged = [((pt.run_id, pt.round), pt) for pt in ordered if pt.status == wire.ANSWERED]
    spent = {(pt.run_id, pt.round) for pt in ordered}
    charged += [((r.run_id, r.round), None) for r in reports if _has_mechanism(r) and (r.run_id, r.round) not in spent]
    sessions: list[dict[str, Any]] = []
    unreported: dict[str, list[int]] = {}
    problems: list[str] = []
    for (run, rnd), pt in charged:
        rep = rep_of.get((run, rnd))
        if rep is None or not _has_mechanism(rep):
            unreported.setdefault(run, []).append(rnd)
            continue
        p = part.get(rnd) if run == run_id else None
        sessions.append(reported_session(rep, pt, p.examples if p is not None else None))
        if pt is None and run == run_id:
            problems.append(f"round {rnd}: the site reported the mechanism of a charged round, but no epsilon after it")
    mine = sorted(unreported.get(run_id, []))
    if mine:
        problems.append(
            f"{rounds_text(mine)} of run {run_id} charged the site's budget (it answered with a spend), but "
            "its report names no mechanism (noise multiplier, sample rate and steps): this run's epsilon cannot be composed "
            "and is unknown"
        )
    ordered_sessions = in_time_order(sessions, lambda x: x["created_at"])  # when the server recorded each report
    return ordered_sessions, {run: sorted(rounds) for run, rounds in unreported.items()}, problems


def run_site_from_store(
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
    """A site of run ``run_id`` from the run store alone: its spend ``points`` (every run), its
    reports (every run: the mechanism of each charged round) and the receipts the store keeps;
    ``ledger_note`` says why no ledger was read.

    The lifetime epsilon is the largest the site reported (a spend only grows; each time it went
    down in recorded-time order is a problem). A run's epsilon is composed from the mechanism of
    every round it was charged for, or unknown (``None``) when one of them is not reported:
    never a figure of part of its rounds."""
    problems = list(extra_problems)
    part = {row.round: p for row in rows for p in row.participation if p.site == site}
    started = {row.round: row.started_at for row in rows}
    # in the order the rounds were recorded: the store lists runs by their start, so a run
    # resumed after a later one started would otherwise come before the later run's spend
    ordered = in_time_order(points, lambda pt: pt.recorded_at)
    problems += spend_decreases(ordered)
    top = largest_spend(ordered)
    delta, acct = (top.delta, top.accountant) if top is not None else (None, None)
    lifetime = top.epsilon if top is not None else None
    sessions, unreported, found = charged_sessions(ordered, reports, part, run_id=run_id)
    problems += found
    run_eps = run_epsilons(sessions, delta, acct, problems, per_round=run_id)
    # after a charged round without its mechanism, the run's epsilon is not known
    run_eps = [
        None if any(rnd <= s["round"] for rnd in unreported.get(s["run_id"], ())) else eps
        for s, eps in zip(sessions, run_eps, strict=True)
    ]
    eps_of = {(s["run_id"], s["round"]): e for s, e in zip(sessions, run_eps, strict=True)}
    run_sessions = [s for s in sessions if s["run_id"] == run_id]
    rounds = []
    for pt in ordered:
        if pt.run_id != run_id:
            continue
        p = part.get(pt.round)
        reason = f" ({p.reason})" if p is not None and p.reason else ""
        rounds.append(round_entry(
            run_id=run_id, round_=pt.round, lifetime=pt.epsilon, run_eps=eps_of.get((run_id, pt.round)),
            status=pt.status + reason, recorded_at=started.get(pt.round, pt.recorded_at), source="run store",
            budget=pt.budget_epsilon, remaining=pt.remaining,
        ))
    rounds.sort(key=lambda r: r["round"])
    budget_eps = top.budget_epsilon if top is not None else None
    budget = budget_section(budget_eps, delta if budget_eps is not None else None, lifetime)
    if top is not None and top.remaining is not None and not evidence.same_bits(budget["remaining"], top.remaining):
        problems.append(f"the site reported remaining {top.remaining!r}, but its budget minus its spend is {budget['remaining']!r}")
    runs = runs_list(sessions, run_eps)
    for entry in runs:
        if entry["run_id"] in unreported:
            entry["epsilon"] = None
    if run_id in unreported:
        this_run = None
    else:
        this_run = eps_of[(run_id, run_sessions[-1]["round"])] if run_sessions else 0.0
    return site_object(
        site, dataset=site, figures_from=FROM_STORE, people=people, sessions=run_sessions, unreported=unreported.get(run_id, ()),
        accountant=acct, delta=delta, epsilon={"run": this_run, "lifetime": lifetime, "sessions": None, "runs": None},
        budget=budget, rounds=rounds, runs=runs,
        receipts=evidence.stored_receipts_alone(stored, reported=reported),
        ledger={"path": None, "integrity": ledger_note}, problems=problems,
    )


# --- a data set of a site's own ledger ---------------------------------------------------------


def ledger_site(book: PrivacyLedger, dataset: str, *, state: str, receipts: dict[str, Any], count: int) -> dict[str, Any]:
    """One data set of a ledger report: every session of every run; ``state`` the ledger's
    integrity, ``receipts`` the ledger-wide receipts check, ``count`` this data set's receipts."""
    problems = [] if state == "ok" else [f"ledger integrity: {state}"]
    every = [session_dict(s) for s in book.sessions(dataset)]
    lifetime, delta, acct = spend_of(book, dataset, problems)
    budget = book.budget(dataset)
    budget_eps = budget.epsilon if budget is not None else None
    run_eps = run_epsilons(every, delta, acct, problems, per_round=None)
    rounds = [
        round_entry(
            run_id=s["run_id"], round_=s["round"], lifetime=s["epsilon_after"], run_eps=e, status="charged",
            recorded_at=s["created_at"], source="ledger", budget=budget_eps,
            remaining=None if budget_eps is None else max(0.0, budget_eps - s["epsilon_after"]),
        )
        for s, e in zip(every, run_eps, strict=True)
    ]
    runs = runs_list(every, run_eps)
    people = {"identities": None, "max_images_per_person": None, "source": "unknown: a ledger records images, not people"}
    return site_object(
        dataset, dataset=dataset, figures_from=f"the site's privacy ledger {book.path}", people=people, sessions=every,
        accountant=acct, delta=delta,
        epsilon={"run": None, "lifetime": lifetime, "sessions": len(every), "runs": len(runs)},
        budget=budget_section(budget_eps, budget.delta if budget is not None else None, lifetime),
        rounds=rounds, runs=runs, receipts={**receipts, "count": count, "problems": list(receipts["problems"])},
        ledger={"path": str(book.path), "integrity": state}, problems=problems,
    )


__all__ = [
    "FROM_STORE",
    "charged_sessions",
    "finish_site",
    "in_time_order",
    "largest_spend",
    "ledger_site",
    "reported_session",
    "round_entry",
    "run_epsilons",
    "run_site_from_ledger",
    "run_site_from_store",
    "runs_list",
    "session_dict",
    "site_object",
    "spend_decreases",
    "spend_of",
]
