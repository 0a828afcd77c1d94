"""The server's run store: one SQLite file recording federated runs as they go.

A run store holds any number of *runs*. For each run it records the plan (sites, rounds,
SecAgg+, the configuration as JSON), its status, and one entry per federated round: when it
started and how long it took, the sites sampled, what each of them answered (answered, refused
and why, failed), each site's reported privacy spend (epsilon, delta, accountant, budget,
remaining), the server's metrics and the checkpoint written. The ServerApp writes it; the web
console and the privacy reports read it, also while a run is writing.

Writing
    Every write is one ``BEGIN IMMEDIATE`` transaction: :meth:`RunStore.record_round` commits a
    round's ``rounds`` row, its ``sampled``, ``participation`` and ``metrics`` rows together or
    not at all. A round can be recorded once.

Append-only
    Triggers abort every ``UPDATE`` and ``DELETE`` on ``meta``, ``events``, ``rounds``,
    ``sampled``, ``participation`` and ``metrics``. A ``runs`` row cannot be deleted; only its
    status, finish time, error and planned rounds change (through :meth:`RunStore.finish_run`
    and resuming), never its id, start time, sites, SecAgg+ flag or configuration. Each start,
    resume and finish is also appended to ``events``, so a resumed run keeps the error that
    stopped it.

Reading while a run writes
    The file is in WAL mode: readers (another :class:`RunStore` on the same file, in this or
    another process) see the last committed state while a writer holds its transaction, and
    each query method reads one consistent snapshot.

Values
    Floats are stored as SQLite ``REAL`` (IEEE double), exactly as given, never rounded. A NaN
    metric is stored as ``NULL`` and read back as NaN; privacy figures may not be NaN.
    Timestamps are UTC ISO-8601 with microseconds (``2026-05-09T07:35:25.123456+00:00``);
    timestamps given with another offset are converted to UTC, naive ones refused.

Durability: WAL journal with ``synchronous=FULL``, so a committed round survives a power cut.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import numbers
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from fedface.common.errors import ConfigError, RunDirError
from fedface.common.sqlite_store import SQLiteStore
from fedface.common.wire import Status
from fedface.server import receipts as receipts_table

RunStatus = Literal["running", "completed", "failed", "stopped"]
ParticipationStatus = Status  # defined once, in fedface.common.wire
EventKind = Literal["started", "resumed", "completed", "failed", "stopped"]

RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
"""Statuses of a run: ``running`` until :meth:`RunStore.finish_run` sets one of the others."""
PARTICIPATION_STATUSES: tuple[str, ...] = get_args(ParticipationStatus)
"""What a sampled site did in a round."""
FINISH_STATUSES: tuple[str, ...] = ("completed", "failed", "stopped")
"""Statuses :meth:`RunStore.finish_run` accepts."""

SCHEMA_VERSION = 1
APPLICATION = "fedface-run-store"

_APPEND_ONLY_TABLES = ("meta", "events", "rounds", "sampled", "participation", "metrics")
_FIXED_RUN_COLUMNS = ("run_id", "started_at", "sites", "secagg", "config")


def _in(values: Sequence[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)  # module constants only, never user input


_SCHEMA: tuple[str, ...] = (
    """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
)""",
    f"""
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY CHECK (length(run_id) > 0),
    status TEXT NOT NULL CHECK (status IN ({_in(RUN_STATUSES)})),
    started_at TEXT NOT NULL,
    finished_at TEXT,
    sites INTEGER NOT NULL CHECK (sites >= 1),
    rounds_planned INTEGER NOT NULL CHECK (rounds_planned >= 1),
    secagg INTEGER NOT NULL CHECK (secagg IN (0, 1)),
    config TEXT NOT NULL,
    error TEXT
)""",
    f"""
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    at TEXT NOT NULL,
    event TEXT NOT NULL CHECK (event IN ({_in(get_args(EventKind))})),
    round INTEGER NOT NULL,
    detail TEXT
)""",
    "CREATE INDEX IF NOT EXISTS events_by_run ON events (run_id, id)",
    """
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    round INTEGER NOT NULL CHECK (round >= 1),
    started_at TEXT NOT NULL,
    seconds REAL NOT NULL CHECK (seconds >= 0),
    checkpoint TEXT,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (run_id, round)
)""",
    """
CREATE TABLE IF NOT EXISTS sampled (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    position INTEGER NOT NULL,
    site TEXT NOT NULL CHECK (length(site) > 0),
    PRIMARY KEY (run_id, round, site),
    FOREIGN KEY (run_id, round) REFERENCES rounds (run_id, round)
)""",
    f"""
CREATE TABLE IF NOT EXISTS participation (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    position INTEGER NOT NULL,
    site TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ({_in(PARTICIPATION_STATUSES)})),
    reason TEXT,
    examples INTEGER NOT NULL CHECK (examples >= 0),
    train_s REAL,
    epsilon REAL,
    delta REAL,
    accountant TEXT,
    budget_epsilon REAL,
    remaining REAL,
    PRIMARY KEY (run_id, round, site),
    FOREIGN KEY (run_id, round) REFERENCES rounds (run_id, round),
    FOREIGN KEY (run_id, round, site) REFERENCES sampled (run_id, round, site)
)""",
    "CREATE INDEX IF NOT EXISTS participation_by_site ON participation (run_id, site, round)",
    """
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    position INTEGER NOT NULL,
    key TEXT NOT NULL CHECK (length(key) > 0),
    value REAL,
    PRIMARY KEY (run_id, round, key),
    FOREIGN KEY (run_id, round) REFERENCES rounds (run_id, round)
)""",
    "CREATE INDEX IF NOT EXISTS metrics_by_key ON metrics (run_id, key, round)",
    *(
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
        f"BEGIN SELECT RAISE(ABORT, 'fedface run store {table} rows are append-only'); END"
        for table in _APPEND_ONLY_TABLES
        for verb in ("UPDATE", "DELETE")
    ),
    "CREATE TRIGGER IF NOT EXISTS runs_no_delete BEFORE DELETE ON runs "
    "BEGIN SELECT RAISE(ABORT, 'fedface run store runs cannot be deleted'); END",
    f"CREATE TRIGGER IF NOT EXISTS runs_fixed_columns BEFORE UPDATE OF {', '.join(_FIXED_RUN_COLUMNS)} ON runs "
    "BEGIN SELECT RAISE(ABORT, 'fedface run store: a run''s id, start, sites, secagg and config are fixed'); END",
)
_TABLES = frozenset({"meta", "runs", "events", "rounds", "sampled", "participation", "metrics"})

_RUN_FIELDS = ("run_id", "status", "started_at", "finished_at", "sites", "rounds_planned", "secagg", "config", "error")
_PARTICIPATION_FIELDS = (
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


class RunStore(SQLiteStore):
    """The server's run store in one SQLite file (see the module docstring).

    Parameters
    ----------
    path
        The store file; parent directories are created. A missing or empty file becomes a new
        store unless ``create`` is false.
    create
        Whether a missing file may be created.

    Raises
    ------
    RunDirError
        When the file is missing (``create=False``), cannot be opened, is not SQLite, is not a
        fedface run store, or has a newer schema than this fedface understands.
    """

    KIND = "run store"
    APPLICATION = APPLICATION
    SCHEMA_VERSION = SCHEMA_VERSION
    SCHEMA = _SCHEMA
    REQUIRED_TABLES = _TABLES
    ERROR = RunDirError
    ELSEWHERE = "point the server at another run-store file"

    def _init_schema(self) -> None:
        super()._init_schema()
        # the sites' ledger receipts (fedface.server.receipts): added to stores made before them too
        if "receipts" not in self._tables():
            with self._write() as conn:
                receipts_table.ensure_schema(conn)

    # --- writing -------------------------------------------------------------------------------

    def start_run(
        self,
        run_id: str,
        *,
        config: Mapping[str, Any],
        sites: int,
        rounds: int,
        secagg: bool,
        started_at: str | dt.datetime | None = None,
        resume: bool = False,
    ) -> None:
        """Record a new run with status ``running``, or resume an existing one.

        Parameters
        ----------
        run_id
            The run's id, unique in the store.
        config
            The run's configuration, JSON-serialisable (e.g. a pydantic ``model_dump(mode="json")``).
        sites
            Number of sites in the federation (``>= 1``).
        rounds
            Rounds planned (``>= 1``).
        secagg
            Whether updates are aggregated with SecAgg+.
        started_at
            UTC ISO-8601 start time (or an aware datetime); default now.
        resume
            If the run exists, resume it instead of refusing: its status becomes ``running``
            again, its recorded rounds stay, ``rounds`` becomes its plan, and its original
            start time and configuration are kept. A missing run is started as usual.

        Raises
        ------
        RunDirError
            When ``run_id`` is already in the store and ``resume`` is false.
        ConfigError
            On a bad argument; when resuming with other ``sites`` or ``secagg`` than the run
            was started with, or with fewer ``rounds`` than it has recorded.
        """
        _check_run_id(run_id)
        problems = []
        if not isinstance(config, Mapping):
            problems.append(f"config must be a dict, got {type(config).__name__}")
        if not _is_int(sites) or sites < 1:
            problems.append(f"sites must be an integer >= 1, got {sites!r}")
        if not _is_int(rounds) or rounds < 1:
            problems.append(f"rounds must be an integer >= 1, got {rounds!r}")
        if not isinstance(secagg, bool):
            problems.append(f"secagg must be true or false, got {secagg!r}")
        if problems:
            raise ConfigError(f"cannot start run {run_id!r}: " + "; ".join(problems))
        config_json = _config_json(run_id, config)
        start = _utc("started_at", started_at) if started_at is not None else _now()
        with self._write() as conn:
            existing = _run_row(conn, run_id)
            if existing is not None:
                if not resume:
                    raise RunDirError(
                        f"run {run_id!r} already exists in run store {self.path} ({existing['status']}, "
                        f"{_last_round(conn, run_id)} rounds recorded); choose another run id or resume it"
                    )
                mismatch = []
                if existing["sites"] != sites:
                    mismatch.append(f"{existing['sites']} sites, not {sites}")
                if bool(existing["secagg"]) != secagg:
                    mismatch.append(f"secagg {'on' if existing['secagg'] else 'off'}")
                if mismatch:
                    raise ConfigError(
                        f"cannot resume run {run_id!r}: it was started with {' and '.join(mismatch)}; "
                        "resume it with the same federation or start a new run"
                    )
                self._resume(conn, run_id, rounds=int(rounds))
                return
            conn.execute(
                "INSERT INTO runs (run_id, status, started_at, finished_at, sites, rounds_planned, secagg, config, "
                "error) VALUES (?, 'running', ?, NULL, ?, ?, ?, ?, NULL)",
                (run_id, start, int(sites), int(rounds), int(secagg), config_json),
            )
            _event(conn, run_id, "started", at=start)

    def resume_run(self, run_id: str) -> int:
        """Mark a run ``running`` again (clearing its finish time and error) and return its last
        recorded round, ``0`` if none. Resume training from :meth:`last_checkpoint`.

        Raises
        ------
        RunDirError
            When the run is not in the store.
        """
        _check_run_id(run_id)
        with self._write() as conn:
            if _run_row(conn, run_id) is None:
                raise self._unknown(run_id)
            return self._resume(conn, run_id, rounds=None)

    def record_round(
        self,
        run_id: str,
        round: int,
        *,
        started_at: str | dt.datetime,
        seconds: float,
        sampled: Sequence[str],
        participation: Sequence[Participation],
        metrics: Mapping[str, float],
        checkpoint: str | Path | None = None,
        receipts: Mapping[str, str] | None = None,
    ) -> None:
        """Record one finished round in one transaction: all of it or nothing.

        Parameters
        ----------
        run_id
            A ``running`` run of the store.
        round
            The round number (``>= 1``); each round is recorded once.
        started_at
            UTC ISO-8601 time the round started (or an aware datetime).
        seconds
            The round's wall time (finite, ``>= 0``).
        sampled
            The sites asked, distinct, in sampling order.
        participation
            One entry per sampled site the server heard about (each in ``sampled``, at most
            once); a refusing site's entry has ``status="refused"`` and its ``reason``.
        metrics
            The server's metrics for the round; NaN values are kept as NaN.
        checkpoint
            The checkpoint written after the round, if any (write it before recording).
        receipts
            Each site's signed ledger receipt of the round (JSON text), checked and kept by
            :mod:`fedface.server.receipts`; a receipt that fails its checks is kept with the
            problem found.

        Raises
        ------
        RunDirError
            When the run is not in the store.
        ConfigError
            When the round is already recorded, the run is not ``running``, or an argument is
            malformed (all problems named in one line).
        """
        _check_run_id(run_id)
        problems: list[str] = []
        if not _is_int(round) or round < 1:
            problems.append(f"round must be an integer >= 1, got {round!r}")
        start = None
        try:
            start = _utc("started_at", started_at)
        except ConfigError as exc:
            problems.append(str(exc))
        if not _is_real(seconds) or not math.isfinite(seconds) or seconds < 0:
            problems.append(f"seconds must be a finite number >= 0, got {seconds!r}")
        sites = _check_sampled(sampled, problems)
        entries = _sequence(participation, "participation", problems)
        rows = [_participation_row(p, i, sites, problems) for i, p in enumerate(entries)]
        named = [row[1] for row in rows if row is not None]
        repeated = sorted({s for s in named if named.count(s) > 1})
        if repeated:
            problems.append(f"participation names sites {', '.join(map(repr, repeated))} more than once")
        values = _check_metrics(metrics, problems)
        if checkpoint is not None and not isinstance(checkpoint, (str, Path)):
            problems.append(f"checkpoint must be a path or None, got {checkpoint!r}")
        if problems:
            raise ConfigError(f"cannot record round {round!r} of run {run_id!r}: " + "; ".join(problems))
        with self._write() as conn:
            run = _run_row(conn, run_id)
            if run is None:
                raise self._unknown(run_id)
            if run["status"] != "running":
                raise ConfigError(
                    f"cannot record round {round} of run {run_id!r}: the run is {run['status']}; resume it first"
                )
            try:
                conn.execute(
                    "INSERT INTO rounds (run_id, round, started_at, seconds, checkpoint, recorded_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, int(round), start, float(seconds), _path(checkpoint), _now()),
                )
            except sqlite3.IntegrityError as exc:
                raise ConfigError(
                    f"round {round} of run {run_id!r} is already recorded ({exc}); rounds are recorded once"
                ) from exc
            conn.executemany(
                "INSERT INTO sampled (run_id, round, position, site) VALUES (?, ?, ?, ?)",
                [(run_id, int(round), i, site) for i, site in enumerate(sites)],
            )
            conn.executemany(
                f"INSERT INTO participation (run_id, round, position, {', '.join(_PARTICIPATION_FIELDS)}) "
                f"VALUES (?, ?, {', '.join('?' for _ in range(len(_PARTICIPATION_FIELDS) + 1))})",
                [(run_id, int(round), *row) for row in rows if row is not None],
            )
            conn.executemany(
                "INSERT INTO metrics (run_id, round, position, key, value) VALUES (?, ?, ?, ?, ?)",
                [(run_id, int(round), i, key, None if math.isnan(v) else v) for i, (key, v) in enumerate(values)],
            )
            if receipts:
                receipts_table.insert(conn, run_id, int(round), receipts, _now())

    def finish_run(
        self, run_id: str, *, status: Literal["completed", "failed", "stopped"], error: str | None = None
    ) -> None:
        """Set a running run's final status, its finish time (now) and its error, if any.

        Raises
        ------
        RunDirError
            When the run is not in the store.
        ConfigError
            On a status other than ``completed``, ``failed`` or ``stopped``, a non-string
            error, or a run that is not ``running`` (already finished).
        """
        _check_run_id(run_id)
        if status not in FINISH_STATUSES:
            raise ConfigError(f"status must be one of {', '.join(FINISH_STATUSES)}, got {status!r}")
        if error is not None and not isinstance(error, str):
            raise ConfigError(f"error must be a string or None, got {type(error).__name__}")
        now = _now()
        with self._write() as conn:
            run = _run_row(conn, run_id)
            if run is None:
                raise self._unknown(run_id)
            if run["status"] != "running":
                raise ConfigError(f"cannot finish run {run_id!r}: it is already {run['status']}")
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = ?, error = ? WHERE run_id = ?", (status, now, error, run_id)
            )
            _event(conn, run_id, status, at=now, detail=error)

    # --- reading -------------------------------------------------------------------------------

    def runs(self) -> list[RunSummary]:
        """Every run, oldest start first."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {', '.join(f'r.{c}' for c in _RUN_FIELDS)}, "
                "(SELECT COUNT(*) FROM rounds d WHERE d.run_id = r.run_id) FROM runs r ORDER BY r.started_at, r.run_id"
            ).fetchall()
        return [_summary(dict(zip(_RUN_FIELDS, row[:-1], strict=True)), row[-1]) for row in rows]

    def run(self, run_id: str) -> RunSummary:
        """One run's summary.

        Raises
        ------
        RunDirError
            When the run is not in the store.
        """
        with self._read() as conn:
            row = self._require(conn, run_id)
            done = conn.execute("SELECT COUNT(*) FROM rounds WHERE run_id = ?", (run_id,)).fetchone()[0]
        return _summary(row, done)

    def rounds(self, run_id: str) -> list[RoundRecord]:
        """A run's recorded rounds in round order, each with its sites and metrics.

        Raises
        ------
        RunDirError
            When the run is not in the store.
        """
        with self._read() as conn:
            self._require(conn, run_id)
            heads = conn.execute(
                "SELECT round, started_at, seconds, checkpoint FROM rounds WHERE run_id = ? ORDER BY round", (run_id,)
            ).fetchall()
            sampled: dict[int, list[str]] = {r: [] for r, *_ in heads}
            for rnd, site in conn.execute(
                "SELECT round, site FROM sampled WHERE run_id = ? ORDER BY round, position", (run_id,)
            ):
                sampled[rnd].append(site)
            participation: dict[int, list[Participation]] = {r: [] for r, *_ in heads}
            for rnd, *values in conn.execute(
                f"SELECT round, {', '.join(_PARTICIPATION_FIELDS)} FROM participation WHERE run_id = ? "
                "ORDER BY round, position",
                (run_id,),
            ):
                participation[rnd].append(_participation(values))
            metrics: dict[int, dict[str, float]] = {r: {} for r, *_ in heads}
            for rnd, key, value in conn.execute(
                "SELECT round, key, value FROM metrics WHERE run_id = ? ORDER BY round, position", (run_id,)
            ):
                metrics[rnd][key] = _metric(value)
        return [
            RoundRecord(
                round=rnd,
                started_at=started_at,
                seconds=seconds,
                sampled=sampled[rnd],
                participation=participation[rnd],
                metrics=metrics[rnd],
                checkpoint=checkpoint,
            )
            for rnd, started_at, seconds, checkpoint in heads
        ]

    def metric_series(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``(round, value)`` of one metric over a run's rounds, in round order (rounds without
        it are left out; an unknown key gives an empty list).

        Raises
        ------
        RunDirError
            When the run is not in the store.
        """
        with self._read() as conn:
            self._require(conn, run_id)
            rows = conn.execute(
                "SELECT round, value FROM metrics WHERE run_id = ? AND key = ? ORDER BY round", (run_id, key)
            ).fetchall()
        return [(rnd, _metric(value)) for rnd, value in rows]

    def site_spend(self, run_id: str) -> dict[str, SiteSpend]:
        """Each site's latest reported privacy spend in a run, by site name (sorted).

        For each site, the figures of the last round in which it reported an epsilon (answered
        or refused); sites that never reported one are left out.

        Raises
        ------
        RunDirError
            When the run is not in the store.
        """
        with self._read() as conn:
            self._require(conn, run_id)
            rows = conn.execute(
                "SELECT site, round, status, epsilon, delta, accountant, budget_epsilon, remaining "
                "FROM participation WHERE run_id = ? AND epsilon IS NOT NULL ORDER BY site, round",
                (run_id,),
            ).fetchall()
        latest: dict[str, SiteSpend] = {}
        for site, rnd, status, epsilon, delta, accountant, budget_epsilon, remaining in rows:
            latest[site] = SiteSpend(
                site=site,
                round=rnd,
                status=status,
                epsilon=epsilon,
                delta=delta,
                accountant=accountant,
                budget_epsilon=budget_epsilon,
                remaining=remaining,
            )
        return latest

    def refusals(self, run_id: str) -> list[tuple[int, Participation]]:
        """``(round, participation)`` of every refusal in a run, in round and reporting order.

        Raises
        ------
        RunDirError
            When the run is not in the store.
        """
        with self._read() as conn:
            self._require(conn, run_id)
            rows = conn.execute(
                f"SELECT round, {', '.join(_PARTICIPATION_FIELDS)} FROM participation "
                "WHERE run_id = ? AND status = 'refused' ORDER BY round, position",
                (run_id,),
            ).fetchall()
        return [(rnd, _participation(values)) for rnd, *values in rows]

    def receipts(self, *, site: str | None = None, run_id: str | None = None) -> list[receipts_table.StoredReceipt]:
        """The sites' ledger receipts in arrival order, of one site and/or one run (all runs by default)."""
        with self._read() as conn:
            return receipts_table.select(conn, site=site, run_id=run_id)

    def last_checkpoint(self, run_id: str) -> tuple[int, str] | None:
        """``(round, checkpoint)`` of the last round recorded with a checkpoint, or ``None``.

        Raises
        ------
        RunDirError
            When the run is not in the store.
        """
        with self._read() as conn:
            self._require(conn, run_id)
            row = conn.execute(
                "SELECT round, checkpoint FROM rounds WHERE run_id = ? AND checkpoint IS NOT NULL "
                "ORDER BY round DESC LIMIT 1",
                (run_id,),
            ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def events(self, run_id: str) -> list[RunEvent]:
        """A run's starts, resumes and finishes, in order.

        Raises
        ------
        RunDirError
            When the run is not in the store.
        """
        with self._read() as conn:
            self._require(conn, run_id)
            rows = conn.execute(
                "SELECT at, event, round, detail FROM events WHERE run_id = ? ORDER BY id", (run_id,)
            ).fetchall()
        return [RunEvent(run_id, at, event, rnd, detail) for at, event, rnd, detail in rows]

    # --- internals -----------------------------------------------------------------------------

    def _require(self, conn: sqlite3.Connection, run_id: str) -> dict[str, Any]:
        row = _run_row(conn, run_id)
        if row is None:
            raise self._unknown(run_id)
        return row

    def _unknown(self, run_id: str) -> RunDirError:
        return RunDirError(f"no run {run_id!r} in run store {self.path}; `runs()` lists the recorded runs")

    def _resume(self, conn: sqlite3.Connection, run_id: str, *, rounds: int | None) -> int:
        """Mark ``run_id`` running again (inside a write transaction); its last recorded round."""
        last = _last_round(conn, run_id)
        if rounds is None:
            conn.execute(
                "UPDATE runs SET status = 'running', finished_at = NULL, error = NULL WHERE run_id = ?", (run_id,)
            )
        else:
            if rounds < last:
                raise ConfigError(
                    f"cannot resume run {run_id!r} with {rounds} rounds: it has recorded {last} already"
                )
            conn.execute(
                "UPDATE runs SET status = 'running', finished_at = NULL, error = NULL, rounds_planned = ? "
                "WHERE run_id = ?",
                (rounds, run_id),
            )
        _event(conn, run_id, "resumed", at=_now())
        return last


# --- module helpers ----------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def _utc(name: str, value: str | dt.datetime) -> str:
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


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_run_id(run_id: object) -> None:
    if not isinstance(run_id, str) or not run_id:
        raise ConfigError(f"run_id must be a non-empty string, got {run_id!r}")


def _config_json(run_id: str, config: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(config), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"config of run {run_id!r} is not JSON-serialisable ({exc}); pass e.g. model_dump(mode='json')"
        ) from exc


def _sequence(value: object, name: str, problems: list[str]) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        problems.append(f"{name} must be a list, got {type(value).__name__}")
        return []
    return list(value)


def _check_sampled(sampled: object, problems: list[str]) -> list[str]:
    sites = _sequence(sampled, "sampled", problems)
    bad = [s for s in sites if not isinstance(s, str) or not s]
    if bad:
        problems.append(f"sampled sites must be non-empty strings, got {bad[0]!r}")
        return []
    repeated = sorted({s for s in sites if sites.count(s) > 1})
    if repeated:
        problems.append(f"sampled names sites {', '.join(map(repr, repeated))} more than once")
    return list(dict.fromkeys(sites))


def _participation_row(p: object, position: int, sampled: list[str], problems: list[str]) -> tuple[Any, ...] | None:
    """The participation row values after ``position`` (same order as _PARTICIPATION_FIELDS)."""
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
    if not _is_int(p.examples) or p.examples < 0:
        problems.append(f"{where}: examples must be an integer >= 0, got {p.examples!r}")
    if p.train_s is not None and (not _is_real(p.train_s) or not math.isfinite(p.train_s) or p.train_s < 0):
        problems.append(f"{where}: train_s must be a finite number >= 0 or None, got {p.train_s!r}")
    for name in ("epsilon", "budget_epsilon", "remaining"):
        value = getattr(p, name)
        if value is not None and (not _is_real(value) or math.isnan(value) or value < 0):
            problems.append(f"{where}: {name} must be a number >= 0 or None, got {value!r}")
    if p.delta is not None and (not _is_real(p.delta) or not 0 <= p.delta <= 1):
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


def _check_metrics(metrics: object, problems: list[str]) -> list[tuple[str, float]]:
    if not isinstance(metrics, Mapping):
        problems.append(f"metrics must be a dict, got {type(metrics).__name__}")
        return []
    values = []
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            problems.append(f"metric names must be non-empty strings, got {key!r}")
        elif not _is_real(value):
            problems.append(f"metric {key!r} must be a number, got {value!r}")
        else:
            values.append((key, float(value)))
    return values


def _path(value: str | Path | None) -> str | None:
    return None if value is None else str(value)


def _metric(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _run_row(conn: sqlite3.Connection, run_id: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {', '.join(_RUN_FIELDS)} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return None if row is None else dict(zip(_RUN_FIELDS, row, strict=True))


def _last_round(conn: sqlite3.Connection, run_id: str) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(round), 0) FROM rounds WHERE run_id = ?", (run_id,)).fetchone()[0])


def _event(conn: sqlite3.Connection, run_id: str, event: EventKind, *, at: str, detail: str | None = None) -> None:
    conn.execute(
        "INSERT INTO events (run_id, at, event, round, detail) VALUES (?, ?, ?, ?, ?)",
        (run_id, at, event, _last_round(conn, run_id), detail),
    )


def _summary(row: dict[str, Any], rounds_done: int) -> RunSummary:
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


def _participation(values: Sequence[Any]) -> Participation:
    return Participation(**dict(zip(_PARTICIPATION_FIELDS, values, strict=True)))


__all__ = [
    "APPLICATION",
    "FINISH_STATUSES",
    "PARTICIPATION_STATUSES",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "Participation",
    "RoundRecord",
    "RunEvent",
    "RunStore",
    "RunSummary",
    "SiteSpend",
]
