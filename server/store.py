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

Split by concern: the tables, indexes and triggers are in :mod:`fedface.server.run_schema`, the
records the queries return and the checks of what is written in
:mod:`fedface.server.run_records` (re-exported here); this module is the store itself.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from fedface.common.errors import ConfigError, RunDirError
from fedface.common.sqlite_store import SQLiteStore
from fedface.server import admin_log, site_reports
from fedface.server.store_console import ConsoleRows
from fedface.server import receipts as receipts_table
from fedface.server.site_reports import SiteReport
from fedface.server.run_records import (
    FINISH_STATUSES,
    PARTICIPATION_FIELDS,
    PARTICIPATION_STATUSES,
    RUN_FIELDS,
    RUN_STATUSES,
    EventKind,
    Participation,
    RoundRecord,
    RunEvent,
    RunSummary,
    SiteSpend,
    as_sequence,
    as_utc,
    check_metrics,
    check_run_id,
    check_sampled,
    config_json,
    is_int,
    is_real,
    metric_value,
    now_utc,
    participation_of,
    participation_row,
    path_text,
    summary_of,
)
from fedface.server.run_schema import APPLICATION, SCHEMA, SCHEMA_VERSION, TABLES


class RunStore(ConsoleRows, SQLiteStore):
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
    SCHEMA = SCHEMA
    REQUIRED_TABLES = TABLES
    ERROR = RunDirError
    ELSEWHERE = "pass another run-store file (a run directory's runs.sqlite)"

    def _init_schema(self) -> None:
        super()._init_schema()
        # tables kept by their own modules (receipts, site reports, the console's audit log):
        # added to stores made before them too
        missing = [m for m, name in _OWN_TABLES if name not in self._tables()]
        if missing:
            with self._write() as conn:
                for module in missing:
                    module.ensure_schema(conn)

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
        check_run_id(run_id)
        problems = []
        if not isinstance(config, Mapping):
            problems.append(f"config must be a dict, got {type(config).__name__}")
        if not is_int(sites) or sites < 1:
            problems.append(f"sites must be an integer >= 1, got {sites!r}")
        if not is_int(rounds) or rounds < 1:
            problems.append(f"rounds must be an integer >= 1, got {rounds!r}")
        if not isinstance(secagg, bool):
            problems.append(f"secagg must be true or false, got {secagg!r}")
        if problems:
            raise ConfigError(f"cannot start run {run_id!r}: " + "; ".join(problems))
        config_text = config_json(run_id, config)
        start = as_utc("started_at", started_at) if started_at is not None else now_utc()
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
                (run_id, start, int(sites), int(rounds), int(secagg), config_text),
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
        check_run_id(run_id)
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
        reports: Mapping[str, Mapping[str, Any]] | None = None,
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
        reports
            What each site said about itself (:func:`fedface.server.site_reports.from_metrics`:
            its policy, the round's mechanism), kept in :mod:`fedface.server.site_reports`.

        Raises
        ------
        RunDirError
            When the run is not in the store.
        ConfigError
            When the round is already recorded, the run is not ``running``, or an argument is
            malformed (all problems named in one line).
        """
        check_run_id(run_id)
        problems: list[str] = []
        if not is_int(round) or round < 1:
            problems.append(f"round must be an integer >= 1, got {round!r}")
        start = None
        try:
            start = as_utc("started_at", started_at)
        except ConfigError as exc:
            problems.append(str(exc))
        if not is_real(seconds) or not math.isfinite(seconds) or seconds < 0:
            problems.append(f"seconds must be a finite number >= 0, got {seconds!r}")
        sites = check_sampled(sampled, problems)
        entries = as_sequence(participation, "participation", problems)
        rows = [participation_row(p, i, sites, problems) for i, p in enumerate(entries)]
        named = [row[1] for row in rows if row is not None]
        repeated = sorted({s for s in named if named.count(s) > 1})
        if repeated:
            problems.append(f"participation names sites {', '.join(map(repr, repeated))} more than once")
        values = check_metrics(metrics, problems)
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
                    (run_id, int(round), start, float(seconds), path_text(checkpoint), now_utc()),
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
                f"INSERT INTO participation (run_id, round, position, {', '.join(PARTICIPATION_FIELDS)}) "
                f"VALUES (?, ?, {', '.join('?' for _ in range(len(PARTICIPATION_FIELDS) + 1))})",
                [(run_id, int(round), *row) for row in rows if row is not None],
            )
            conn.executemany(
                "INSERT INTO metrics (run_id, round, position, key, value) VALUES (?, ?, ?, ?, ?)",
                [(run_id, int(round), i, key, None if math.isnan(v) else v) for i, (key, v) in enumerate(values)],
            )
            if receipts:
                receipts_table.insert(conn, run_id, int(round), receipts, now_utc())
            if reports:
                site_reports.insert(conn, run_id, int(round), reports, now_utc())

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
        check_run_id(run_id)
        if status not in FINISH_STATUSES:
            raise ConfigError(f"status must be one of {', '.join(FINISH_STATUSES)}, got {status!r}")
        if error is not None and not isinstance(error, str):
            raise ConfigError(f"error must be a string or None, got {type(error).__name__}")
        now = now_utc()
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
                f"SELECT {', '.join(f'r.{c}' for c in RUN_FIELDS)}, "
                "(SELECT COUNT(*) FROM rounds d WHERE d.run_id = r.run_id) FROM runs r ORDER BY r.started_at, r.run_id"
            ).fetchall()
        return [summary_of(dict(zip(RUN_FIELDS, row[:-1], strict=True)), row[-1]) for row in rows]

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
        return summary_of(row, done)

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
                f"SELECT round, {', '.join(PARTICIPATION_FIELDS)} FROM participation WHERE run_id = ? "
                "ORDER BY round, position",
                (run_id,),
            ):
                participation[rnd].append(participation_of(values))
            metrics: dict[int, dict[str, float]] = {r: {} for r, *_ in heads}
            for rnd, key, value in conn.execute(
                "SELECT round, key, value FROM metrics WHERE run_id = ? ORDER BY round, position", (run_id,)
            ):
                metrics[rnd][key] = metric_value(value)
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
        return [(rnd, metric_value(value)) for rnd, value in rows]

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
                f"SELECT round, {', '.join(PARTICIPATION_FIELDS)} FROM participation "
                "WHERE run_id = ? AND status = 'refused' ORDER BY round, position",
                (run_id,),
            ).fetchall()
        return [(rnd, participation_of(values)) for rnd, *values in rows]

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

    def site_reports(self, *, run_id: str | None = None, site: str | None = None) -> list[SiteReport]:
        """What the sites reported about themselves (policy, mechanism), in arrival order."""
        with self._read() as conn:
            return site_reports.select(conn, run_id=run_id, site=site)

    def node_names(self) -> dict[str, str]:
        """The site name each Flower node last reported, over every run (node id -> name)."""
        with self._read() as conn:
            return site_reports.node_names(conn)

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
        _event(conn, run_id, "resumed", at=now_utc())
        return last



# --- connection helpers ------------------------------------------------------------------------

_OWN_TABLES = ((receipts_table, "receipts"), (site_reports, "site_reports"), (admin_log, "admin_actions"))



def _run_row(conn: sqlite3.Connection, run_id: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {', '.join(RUN_FIELDS)} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return None if row is None else dict(zip(RUN_FIELDS, row, strict=True))


def _last_round(conn: sqlite3.Connection, run_id: str) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(round), 0) FROM rounds WHERE run_id = ?", (run_id,)).fetchone()[0])


def _event(conn: sqlite3.Connection, run_id: str, event: EventKind, *, at: str, detail: str | None = None) -> None:
    conn.execute(
        "INSERT INTO events (run_id, at, event, round, detail) VALUES (?, ?, ?, ?, ?)",
        (run_id, at, event, _last_round(conn, run_id), detail),
    )



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
