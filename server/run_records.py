"""The run store's records (what its queries return) and the checks of what is written
(:mod:`fedface.server.store`): runs, rounds, participation, spend and events, and the
validation of timestamps, run ids, sampled sites, participation rows and metrics."""

from __future__ import annotations

import datetime as dt
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from fedface.common.errors import ConfigError
from fedface.common.wire import Status

RunStatus = Literal["running", "completed", "failed", "stopped"]
ParticipationStatus = Status  # defined once, in fedface.common.wire
EventKind = Literal["started", "resumed", "completed", "failed", "stopped"]

RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
"""Statuses of a run: ``running`` until :meth:`RunStore.finish_run` sets one of the others."""
PARTICIPATION_STATUSES: tuple[str, ...] = get_args(ParticipationStatus)
"""What a sampled site did in a round."""
FINISH_STATUSES: tuple[str, ...] = ("completed", "failed", "stopped")
"""Statuses :meth:`RunStore.finish_run` accepts."""

RUN_FIELDS = ("run_id", "status", "started_at", "finished_at", "sites", "rounds_planned", "secagg", "config", "error")
PARTICIPATION_FIELDS = (
    "site",
    "status",
    "reason",
    "examples",
    "train_s",
    "epsilon",
    "delta",
    "accountant",
    "budget_epsilon",
    "remaining",
)




# --- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Participation:
    """What one sampled site did in one round, with the privacy figures it reported.

    ``status`` is ``answered`` (an update was aggregated), ``refused`` (the site declined, e.g.
    ``reason="budget exhausted"``; a reason is required) or ``failed`` (an error or a timeout).
    ``epsilon`` is the site's total spend after the round as its ledger composes it, at
    ``delta`` with ``accountant``; ``budget_epsilon`` and ``remaining`` are its budget and what
    is left of it. Figures the site did not report are ``None``. ``train_s`` is the site's local
    training time in seconds.
    """

    site: str
    status: ParticipationStatus
    reason: str | None = None
    examples: int = 0
    train_s: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    budget_epsilon: float | None = None
    remaining: float | None = None


@dataclass(frozen=True)
class RoundRecord:
    """One recorded round of a run.

    ``sampled`` lists the sites asked, in the order given; ``participation`` has one entry per
    site that the server heard about (a subset of ``sampled``, in the order given).
    ``seconds`` is the round's wall time; ``metrics`` are the server's (e.g. verification
    accuracy after aggregation), NaN where the value was undefined.
    """

    round: int
    started_at: str
    seconds: float
    sampled: list[str]
    participation: list[Participation]
    metrics: dict[str, float]
    checkpoint: str | None

    @property
    def answered(self) -> int:
        """Number of sites whose update was aggregated."""
        return sum(p.status == "answered" for p in self.participation)

    @property
    def refused(self) -> int:
        """Number of sites that refused the round (e.g. budget exhausted)."""
        return sum(p.status == "refused" for p in self.participation)

    @property
    def failed(self) -> int:
        """Number of sites that failed (error or timeout)."""
        return sum(p.status == "failed" for p in self.participation)

    @property
    def unreported(self) -> list[str]:
        """Sampled sites without a participation entry, in sampling order."""
        reported = {p.site for p in self.participation}
        return [site for site in self.sampled if site not in reported]


@dataclass(frozen=True)
class RunSummary:
    """A run's plan and state. ``rounds_done`` counts the recorded rounds."""

    run_id: str
    status: RunStatus
    started_at: str
    finished_at: str | None
    sites: int
    rounds_planned: int
    rounds_done: int
    secagg: bool
    config: dict[str, Any]
    error: str | None


@dataclass(frozen=True)
class SiteSpend:
    """A site's latest reported privacy spend in a run: the figures of ``round``, the last round
    in which the site reported an epsilon, and its ``status`` there."""

    site: str
    round: int
    status: ParticipationStatus
    epsilon: float
    delta: float | None
    accountant: str | None
    budget_epsilon: float | None
    remaining: float | None


@dataclass(frozen=True)
class RunEvent:
    """A start, resume or finish of a run. ``round`` is the last recorded round at that moment;
    ``detail`` is the error of a finish, if any."""

    run_id: str
    at: str
    event: EventKind
    round: int
    detail: str | None


# --- the store ---------------------------------------------------------------------------------



def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def as_utc(name: str, value: str | dt.datetime) -> str:
    """``value`` (ISO-8601 text or a datetime, with a UTC offset) as UTC ISO-8601 text."""
    moment = value
    if isinstance(value, str):
        text = value.strip()
        try:
            moment = dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
        except ValueError:
            raise ConfigError(f"{name} must be an ISO-8601 timestamp, got {value!r}") from None
    if not isinstance(moment, dt.datetime):
        raise ConfigError(f"{name} must be an ISO-8601 timestamp, got {value!r}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ConfigError(f"{name} must carry a UTC offset (e.g. +00:00), got {value!r}")
    return moment.astimezone(dt.timezone.utc).isoformat(timespec="microseconds")


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_run_id(run_id: object) -> None:
    if not isinstance(run_id, str) or not run_id:
        raise ConfigError(f"run_id must be a non-empty string, got {run_id!r}")


def config_json(run_id: str, config: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(config), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"config of run {run_id!r} is not JSON-serialisable ({exc}); pass e.g. model_dump(mode='json')"
        ) from exc


def as_sequence(value: object, name: str, problems: list[str]) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        problems.append(f"{name} must be a list, got {type(value).__name__}")
        return []
    return list(value)


def check_sampled(sampled: object, problems: list[str]) -> list[str]:
    sites = as_sequence(sampled, "sampled", problems)
    bad = [s for s in sites if not isinstance(s, str) or not s]
    if bad:
        problems.append(f"sampled sites must be non-empty strings, got {bad[0]!r}")
        return []
    repeated = sorted({s for s in sites if sites.count(s) > 1})
    if repeated:
        problems.append(f"sampled names sites {', '.join(map(repr, repeated))} more than once")
    return list(dict.fromkeys(sites))


def participation_row(p: object, position: int, sampled: list[str], problems: list[str]) -> tuple[Any, ...] | None:
    """The participation row values after ``position`` (same order as PARTICIPATION_FIELDS)."""
    if not isinstance(p, Participation):
        problems.append(f"participation entries must be Participation, got {type(p).__name__}")
        return None
    where = f"participation of site {p.site!r}"
    before = len(problems)
    if not isinstance(p.site, str) or not p.site:
        problems.append(f"participation site must be a non-empty string, got {p.site!r}")
    elif p.site not in sampled:
        problems.append(f"{where}: the site was not sampled")
    if p.status not in PARTICIPATION_STATUSES:
        problems.append(f"{where}: status must be one of {', '.join(PARTICIPATION_STATUSES)}, got {p.status!r}")
    if p.reason is not None and not isinstance(p.reason, str):
        problems.append(f"{where}: reason must be a string or None, got {p.reason!r}")
    elif p.status == "refused" and not p.reason:
        problems.append(f"{where}: a refusal needs a reason (e.g. 'budget exhausted')")
    if not is_int(p.examples) or p.examples < 0:
        problems.append(f"{where}: examples must be an integer >= 0, got {p.examples!r}")
    if p.train_s is not None and (not is_real(p.train_s) or not math.isfinite(p.train_s) or p.train_s < 0):
        problems.append(f"{where}: train_s must be a finite number >= 0 or None, got {p.train_s!r}")
    for name in ("epsilon", "budget_epsilon", "remaining"):
        value = getattr(p, name)
        if value is not None and (not is_real(value) or math.isnan(value) or value < 0):
            problems.append(f"{where}: {name} must be a number >= 0 or None, got {value!r}")
    if p.delta is not None and (not is_real(p.delta) or not 0 <= p.delta <= 1):
        problems.append(f"{where}: delta must be in [0, 1] or None, got {p.delta!r}")
    if p.accountant is not None and (not isinstance(p.accountant, str) or not p.accountant):
        problems.append(f"{where}: accountant must be a non-empty string or None, got {p.accountant!r}")
    if len(problems) > before:
        return None

    def real(value: float | None) -> float | None:
        return None if value is None else float(value)

    return (
        position,
        p.site,
        p.status,
        p.reason,
        int(p.examples),
        real(p.train_s),
        real(p.epsilon),
        real(p.delta),
        p.accountant,
        real(p.budget_epsilon),
        real(p.remaining),
    )


def check_metrics(metrics: object, problems: list[str]) -> list[tuple[str, float]]:
    if not isinstance(metrics, Mapping):
        problems.append(f"metrics must be a dict, got {type(metrics).__name__}")
        return []
    values = []
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            problems.append(f"metric names must be non-empty strings, got {key!r}")
        elif not is_real(value):
            problems.append(f"metric {key!r} must be a number, got {value!r}")
        else:
            values.append((key, float(value)))
    return values


def path_text(value: str | Path | None) -> str | None:
    return None if value is None else str(value)


def metric_value(value: float | None) -> float:
    return math.nan if value is None else float(value)



def summary_of(row: dict[str, Any], rounds_done: int) -> RunSummary:
    return RunSummary(
        run_id=row["run_id"],
        status=row["status"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        sites=row["sites"],
        rounds_planned=row["rounds_planned"],
        rounds_done=int(rounds_done),
        secagg=bool(row["secagg"]),
        config=json.loads(row["config"]),
        error=row["error"],
    )


def participation_of(values: Sequence[Any]) -> Participation:
    return Participation(**dict(zip(PARTICIPATION_FIELDS, values, strict=True)))



__all__ = [
    "FINISH_STATUSES",
    "PARTICIPATION_FIELDS",
    "PARTICIPATION_STATUSES",
    "RUN_FIELDS",
    "RUN_STATUSES",
    "EventKind",
    "Participation",
    "ParticipationStatus",
    "RoundRecord",
    "RunEvent",
    "RunStatus",
    "RunSummary",
    "SiteSpend",
    "as_sequence",
    "as_utc",
    "check_metrics",
    "check_run_id",
    "check_sampled",
    "config_json",
    "is_int",
    "is_real",
    "metric_value",
    "now_utc",
    "participation_of",
    "participation_row",
    "path_text",
    "summary_of",
]
