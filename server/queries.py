"""The one query module the web console and the privacy reports read the run store through.

Pages and reports never touch SQL: they call these functions, which call the run store's
read methods (:class:`~fedface.server.store.RunStore`) and shape the rows into what a page
shows. Every number is the store's own (floats exactly as stored, never rounded here);
rounding for display is the renderer's, up for a spend and down for what remains
(:func:`~fedface.common.privacy.accounting.format_epsilon`).

What is here
    :func:`run_rows` (the runs page), :func:`run_timeline` and :func:`metric_series` (a run's
    page), :func:`site_rows` (the sites page), :func:`site_spend_series` (each site's epsilon
    over the rounds of the runs it joined, as the sites reported it), :func:`audit_rows`, and
    :func:`gallery_rows` (template counts only: no template, key or embedding is ever read).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedface.common import wire
from fedface.server.admin_log import AdminAction
from fedface.server.run_records import Participation, RoundRecord, RunSummary
from fedface.server.store import RunStore

#: The server's round metrics the run page charts, in this order (others are listed, not charted).
CHARTED_METRICS = (
    "verif_acc", "verif_auc", "verif_eer", "tar_at_far_1e-2", "tar_at_far_1e-3",
    "expression_acc", "expression_macro_f1",  # an expression run's (fedface simulate --task expression)
)


@dataclass(frozen=True)
class RunRow:
    """One run on the runs page: its summary, what it trains, and how far it is."""

    run: RunSummary
    data: str  # the data root's folder name (no path: the console may be shown to others)
    strategy: str
    epsilon: float | None  # the run's target epsilon per site (None: not private)
    last_round_at: str | None

    @property
    def progress(self) -> float:
        """Rounds recorded over rounds planned, in [0, 1]."""
        return min(1.0, self.run.rounds_done / self.run.rounds_planned) if self.run.rounds_planned else 0.0


@dataclass(frozen=True)
class RoundRow:
    """One round on a run's timeline.

    ``refused`` and ``failed`` count the sites by reason; ``unreported`` are sampled sites the
    server never heard from; ``dropouts`` = failed + unreported (the sites SecAgg+ had to
    recover from or lost). ``aborted``: the round ended without aggregating any update.
    """

    round: int
    started_at: str
    seconds: float
    sampled: int
    answered: int
    refused: dict[str, int]
    failed: dict[str, int]
    unreported: int
    dropouts: int
    aborted: bool
    secagg: bool
    metrics: dict[str, float]
    participation: list[Participation]


@dataclass(frozen=True)
class SiteRow:
    """One site on the sites page, over every run in the store."""

    site: str
    first_seen: str | None  # when the server first recorded a round the site was sampled in
    last_seen: str | None  # when the server last recorded an answer (or refusal) from it
    runs: int
    rounds_sampled: int
    rounds_joined: int  # answered (its update entered the sum)
    refused: dict[str, int]  # by reason
    failed: dict[str, int]  # by reason
    policy: dict[str, Any] | None  # the policy it last reported (wire.POLICY_FIELDS)
    policy_at: str | None
    suspended: AdminAction | None  # the console's suspension in force, if any
    epsilon: float | None  # the largest lifetime epsilon it reported (its data set's, every run: a spend only grows)
    delta: float | None
    budget_epsilon: float | None


@dataclass(frozen=True)
class SpendPoint:
    """A site's spend as reported after one round: ``epsilon`` its lifetime total (every run),
    ``status`` what it did in that round."""

    run_id: str
    round: int
    recorded_at: str
    epsilon: float
    delta: float | None
    accountant: str | None
    budget_epsilon: float | None
    remaining: float | None
    status: str


@dataclass(frozen=True)
class SiteSpendSeries:
    """Each point a site reported an epsilon, in store order (runs by start, then rounds)."""

    site: str
    points: list[SpendPoint] = field(default_factory=list)


def run_rows(store: RunStore) -> list[RunRow]:
    """Every run of the store, newest first."""
    out = []
    for run in reversed(store.runs()):
        cfg = run.config
        privacy = cfg.get("privacy", {})
        eps = privacy.get("epsilon")
        rounds = store.rounds(run.run_id) if run.rounds_done else []
        out.append(
            RunRow(
                run=run,
                data=Path(str(cfg.get("data", {}).get("root", ""))).name,
                strategy=str(cfg.get("federation", {}).get("strategy", "")),
                epsilon=float(eps) if isinstance(eps, (int, float)) and eps != float("inf") else None,
                last_round_at=rounds[-1].started_at if rounds else None,
            )
        )
    return out


def _round_row(record: RoundRecord, secagg: bool) -> RoundRow:
    refused = Counter(p.reason or "no reason given" for p in record.participation if p.status == wire.REFUSED)
    failed = Counter(p.reason or "no reason given" for p in record.participation if p.status == wire.FAILED)
    unreported = len(record.unreported)
    return RoundRow(
        round=record.round,
        started_at=record.started_at,
        seconds=record.seconds,
        sampled=len(record.sampled),
        answered=record.answered,
        refused=dict(refused),
        failed=dict(failed),
        unreported=unreported,
        dropouts=record.failed + unreported,
        aborted=record.answered == 0,
        secagg=secagg,
        metrics=record.metrics,
        participation=record.participation,
    )


def run_timeline(store: RunStore, run_id: str) -> tuple[RunSummary, list[RoundRow]]:
    """A run's summary and its rounds in order (RunDirError for an unknown run)."""
    run = store.run(run_id)
    return run, [_round_row(r, run.secagg) for r in store.rounds(run_id)]


def metric_series(rows: list[RoundRow]) -> dict[str, list[tuple[int, float]]]:
    """``(round, value)`` per metric key over a timeline, charted keys first (NaN kept)."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row.metrics if k not in keys)
    ordered = [k for k in CHARTED_METRICS if k in keys] + [k for k in keys if k not in CHARTED_METRICS]
    return {k: [(r.round, r.metrics[k]) for r in rows if k in r.metrics] for k in ordered}


def site_rows(store: RunStore) -> list[SiteRow]:
    """Every site the store has heard of (sampled, reported or suspended), by name."""
    seen: dict[str, dict[str, Any]] = {}

    def entry(site: str) -> dict[str, Any]:
        return seen.setdefault(
            site,
            {"first": None, "last": None, "runs": set(), "sampled": 0, "joined": 0, "refused": Counter(), "failed": Counter(),
             "epsilon": None, "delta": None, "budget": None, "at": ""},
        )

    for run in store.runs():
        for record in store.rounds(run.run_id):
            for site in record.sampled:
                e = entry(site)
                e["runs"].add(run.run_id)
                e["sampled"] += 1
                e["first"] = min(e["first"] or record.started_at, record.started_at)
            for p in record.participation:
                e = entry(p.site)
                e["last"] = max(e["last"] or "", record.started_at)  # runs are read by start: a resumed one comes first
                if p.status == wire.ANSWERED:
                    e["joined"] += 1
                elif p.status == wire.REFUSED:
                    e["refused"][p.reason or "no reason given"] += 1
                else:
                    e["failed"][p.reason or "no reason given"] += 1
                # the largest spend (the latest of equal ones), not the last in store order: the
                # store lists runs by start, and a run resumed after a later one spent last
                if p.epsilon is not None and (
                    e["epsilon"] is None or p.epsilon > e["epsilon"] or (p.epsilon == e["epsilon"] and record.started_at >= e["at"])
                ):
                    e["epsilon"], e["delta"], e["budget"], e["at"] = p.epsilon, p.delta, p.budget_epsilon, record.started_at
    policies: dict[str, tuple[dict[str, Any], str]] = {}
    for report in store.site_reports():
        entry(report.site)
        if report.policy is not None:
            policies[report.site] = (report.policy, report.recorded_at)
    suspended = store.suspended_sites()
    for site in suspended:
        entry(site)
    return [
        SiteRow(
            site=site,
            first_seen=e["first"],
            last_seen=e["last"],
            runs=len(e["runs"]),
            rounds_sampled=e["sampled"],
            rounds_joined=e["joined"],
            refused=dict(e["refused"]),
            failed=dict(e["failed"]),
            policy=policies.get(site, (None, None))[0],
            policy_at=policies.get(site, (None, None))[1],
            suspended=suspended.get(site),
            epsilon=e["epsilon"],
            delta=e["delta"],
            budget_epsilon=e["budget"],
        )
        for site, e in sorted(seen.items())
    ]


def site_spend_series(store: RunStore, *, run_id: str | None = None) -> dict[str, SiteSpendSeries]:
    """Each site's reported spend after every round it reported one (of one run, or of every
    run in the store), by site name. The epsilon is the site's lifetime total as its ledger
    composed it; the report (:mod:`fedface.server.reports`) checks it against the ledger and
    the signed receipts."""
    out: dict[str, SiteSpendSeries] = {}
    runs = [store.run(run_id)] if run_id is not None else store.runs()
    for run in runs:
        for record in store.rounds(run.run_id):
            for p in record.participation:
                if p.epsilon is None:
                    continue
                out.setdefault(p.site, SiteSpendSeries(p.site)).points.append(
                    SpendPoint(
                        run_id=run.run_id,
                        round=record.round,
                        recorded_at=record.started_at,
                        epsilon=p.epsilon,
                        delta=p.delta,
                        accountant=p.accountant,
                        budget_epsilon=p.budget_epsilon,
                        remaining=p.remaining,
                        status=p.status,
                    )
                )
    return dict(sorted(out.items()))


def audit_rows(store: RunStore, *, limit: int = 200) -> list[AdminAction]:
    """The console's audit log, newest first."""
    return store.actions(limit=limit)


def gallery_rows(directory: str | Path) -> dict[str, Any]:
    """Template counts per encrypted-gallery version and site (:func:`fedface.server.gallery.read_status`):
    counts and events only, never a template, key or embedding. TemplateError if there is no gallery."""
    from fedface.server.gallery import read_status  # SEAL is imported only when a gallery is shown

    status = read_status(directory)
    return {"templates": status["templates"], "versions": status["versions"], "events": status["events"]}


__all__ = [
    "CHARTED_METRICS",
    "RoundRow",
    "RunRow",
    "SiteRow",
    "SiteSpendSeries",
    "SpendPoint",
    "audit_rows",
    "gallery_rows",
    "metric_series",
    "run_rows",
    "run_timeline",
    "site_rows",
    "site_spend_series",
]
