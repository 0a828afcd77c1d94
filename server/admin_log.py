"""The console's audit log, which is also how its actions reach the running server.

Every admin action of the web console (:mod:`fedface.server.console`) is appended to the run
store's ``admin_actions`` table (append-only like the rest of the store): logins, failed logins
and logouts, and the three actions that change a federation:

- ``stop-run``: the server stops the run before its next round (:class:`~fedface.server.app.FedFaceRounds`
  asks :func:`stop_request` each round) and finishes it as ``stopped``;
- ``suspend-site`` / ``resume-site``: a suspended site is not sampled until it is resumed
  (the latest of the two for a site applies).

The server reads these rows, the console writes them: the same file, no other channel.
Kept apart from :mod:`fedface.server.store`; the store calls these inside its transactions.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Final, Literal, get_args

AdminActionKind = Literal["login", "login-failed", "logout", "stop-run", "suspend-site", "resume-site"]
ACTIONS: Final = get_args(AdminActionKind)

SCHEMA: tuple[str, ...] = (
    f"""
CREATE TABLE IF NOT EXISTS admin_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    admin TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ({", ".join(f"'{a}'" for a in ACTIONS)})),
    target TEXT,
    detail TEXT,
    client TEXT
)""",
    "CREATE INDEX IF NOT EXISTS admin_actions_by_target ON admin_actions (action, target, id)",
    *(
        f"CREATE TRIGGER IF NOT EXISTS admin_actions_no_{verb.lower()} BEFORE {verb} ON admin_actions "
        "BEGIN SELECT RAISE(ABORT, 'fedface run store admin_actions rows are append-only'); END"
        for verb in ("UPDATE", "DELETE")
    ),
)
_FIELDS = ("id", "at", "admin", "action", "target", "detail", "client")


@dataclass(frozen=True)
class AdminAction:
    """One audit-log row: who did what to which run or site, when (UTC), and from where."""

    id: int
    at: str
    admin: str
    action: AdminActionKind
    target: str | None
    detail: str | None
    client: str | None


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Give a run store the admin_actions table (new stores, and stores from before it)."""
    for statement in SCHEMA:
        conn.execute(statement)


def insert(
    conn: sqlite3.Connection, *, at: str, admin: str, action: AdminActionKind, target: str | None, detail: str | None, client: str | None
) -> int:
    """Append one action (inside the store's write transaction); its id."""
    if action not in ACTIONS:
        raise ValueError(f"admin action must be one of {', '.join(ACTIONS)}, got {action!r}")
    cur = conn.execute(
        "INSERT INTO admin_actions (at, admin, action, target, detail, client) VALUES (?, ?, ?, ?, ?, ?)",
        (at, admin, action, target, detail, client),
    )
    return int(cur.lastrowid or 0)


def select(conn: sqlite3.Connection, *, after: int = 0, limit: int | None = None) -> list[AdminAction]:
    """Actions with an id above ``after``, newest first (at most ``limit``)."""
    sql = f"SELECT {', '.join(_FIELDS)} FROM admin_actions WHERE id > ? ORDER BY id DESC"
    args: list[int] = [after]
    if limit is not None:
        sql += " LIMIT ?"
        args.append(limit)
    return [AdminAction(*row) for row in conn.execute(sql, args)]


def suspended(conn: sqlite3.Connection) -> dict[str, AdminAction]:
    """The sites suspended now (latest suspend-site without a later resume-site), by site."""
    latest: dict[str, AdminAction] = {}
    for row in conn.execute(
        f"SELECT {', '.join(_FIELDS)} FROM admin_actions WHERE action IN ('suspend-site', 'resume-site') ORDER BY id"
    ):
        action = AdminAction(*row)
        if action.target is not None:
            latest[action.target] = action
    return {site: a for site, a in sorted(latest.items()) if a.action == "suspend-site"}


def stop_request(conn: sqlite3.Connection, run_id: str) -> AdminAction | None:
    """The first stop-run action for ``run_id`` since the run last started or resumed (a stopped
    run that is resumed runs again), or ``None``."""
    since = conn.execute(
        "SELECT COALESCE(MAX(at), '') FROM events WHERE run_id = ? AND event IN ('started', 'resumed')", (run_id,)
    ).fetchone()[0]
    row = conn.execute(
        f"SELECT {', '.join(_FIELDS)} FROM admin_actions WHERE action = 'stop-run' AND target = ? AND at >= ? "
        "ORDER BY id LIMIT 1",
        (run_id, since),
    ).fetchone()
    return None if row is None else AdminAction(*row)


__all__ = ["ACTIONS", "SCHEMA", "AdminAction", "AdminActionKind", "ensure_schema", "insert", "select", "stop_request", "suspended"]
