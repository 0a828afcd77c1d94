"""The run store's SQLite schema: its tables, indexes and append-only triggers (:mod:`fedface.server.store`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

from fedface.server.run_records import PARTICIPATION_STATUSES, RUN_STATUSES, EventKind

SCHEMA_VERSION = 1
APPLICATION = "fedface-run-store"

APPEND_ONLY_TABLES = ("meta", "events", "rounds", "sampled", "participation", "metrics")
_FIXED_RUN_COLUMNS = ("run_id", "started_at", "sites", "secagg", "config")


def _in(values: Sequence[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)  # module constants only, never user input


SCHEMA: tuple[str, ...] = (
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
        for table in APPEND_ONLY_TABLES
        for verb in ("UPDATE", "DELETE")
    ),
    "CREATE TRIGGER IF NOT EXISTS runs_no_delete BEFORE DELETE ON runs "
    "BEGIN SELECT RAISE(ABORT, 'fedface run store runs cannot be deleted'); END",
    f"CREATE TRIGGER IF NOT EXISTS runs_fixed_columns BEFORE UPDATE OF {', '.join(_FIXED_RUN_COLUMNS)} ON runs "
    "BEGIN SELECT RAISE(ABORT, 'fedface run store: a run''s id, start, sites, secagg and config are fixed'); END",
)
TABLES = frozenset({"meta", "runs", "events", "rounds", "sampled", "participation", "metrics"})


__all__ = ["APPEND_ONLY_TABLES", "APPLICATION", "SCHEMA", "SCHEMA_VERSION", "TABLES"]
