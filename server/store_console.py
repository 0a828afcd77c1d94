"""The run store's rows that the web console writes and follows: the admin actions (audit log,
stop a run, suspend or resume a site: :mod:`fedface.server.admin_log`) and the change feed its
server-sent events resume from. A mixin of :class:`~fedface.server.store.RunStore`, split out
by concern; the SQL of the actions is :mod:`fedface.server.admin_log`'s.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager

from fedface.common.errors import ConfigError, RunDirError
from fedface.server import admin_log
from fedface.server.admin_log import AdminAction, AdminActionKind
from fedface.server.run_records import now_utc

Cursor = tuple[int, int, int, int]
"""The last ids of ``events``, ``rounds`` (rowid), ``admin_actions`` and ``receipts``."""
CHANGE_KINDS = ("event", "round", "action", "receipt")


class ConsoleRows:
    """Audit log, actions and change feed (see the module docstring)."""

    _read: Callable[[], AbstractContextManager[sqlite3.Connection]]
    _write: Callable[[], AbstractContextManager[sqlite3.Connection]]
    _unknown: Callable[[str], RunDirError]

    def record_action(
        self, admin: str, action: AdminActionKind, target: str | None = None, *, detail: str | None = None, client: str | None = None
    ) -> AdminAction:
        """Append an admin action to the audit log; ``stop-run`` needs a running run of the store.

        Raises
        ------
        RunDirError
            When ``stop-run`` names a run that is not in the store.
        ConfigError
            When ``stop-run`` names a run that is not running, or a site action has no site.
        """
        with self._write() as conn:
            if action == "stop-run":
                row = conn.execute("SELECT status FROM runs WHERE run_id = ?", (str(target),)).fetchone()
                if row is None:
                    raise self._unknown(str(target))
                if row[0] != "running":
                    raise ConfigError(f"cannot stop run {target!r}: it is already {row[0]}")
            if action in ("suspend-site", "resume-site") and not target:
                raise ConfigError(f"{action} needs a site name")
            at = now_utc()
            row_id = admin_log.insert(conn, at=at, admin=admin, action=action, target=target, detail=detail, client=client)
        return AdminAction(row_id, at, admin, action, target, detail, client)

    def actions(self, *, after: int = 0, limit: int | None = None) -> list[AdminAction]:
        """The audit log, newest first: actions with an id above ``after``, at most ``limit``."""
        with self._read() as conn:
            return admin_log.select(conn, after=after, limit=limit)

    def suspended_sites(self) -> dict[str, AdminAction]:
        """The sites suspended now (not sampled), with the action that suspended each."""
        with self._read() as conn:
            return admin_log.suspended(conn)

    def stop_requested(self, run_id: str) -> AdminAction | None:
        """The admin's request to stop ``run_id``, if any."""
        with self._read() as conn:
            return admin_log.stop_request(conn, run_id)

    def cursor(self) -> Cursor:
        """Where the store's append-only rows end now: the last ids of ``events``, ``rounds``
        (rowid), ``admin_actions`` and ``receipts``. Any write moves it forward (the console's
        server-sent events resume from it)."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT (SELECT COALESCE(MAX(id), 0) FROM events), (SELECT COALESCE(MAX(rowid), 0) FROM rounds), "
                "(SELECT COALESCE(MAX(id), 0) FROM admin_actions), (SELECT COALESCE(MAX(id), 0) FROM receipts)"
            ).fetchone()
        return (int(row[0]), int(row[1]), int(row[2]), int(row[3]))

    def changes(self, after: Cursor) -> list[tuple[str, str | None, int]]:
        """``(kind, run_id, row id)`` of each append-only row past ``after`` (a :meth:`cursor`),
        oldest first within each kind: ``event`` (a run started, resumed or finished),
        ``round`` (a round recorded), ``action`` (an admin action), ``receipt``."""
        with self._read() as conn:
            out: list[tuple[str, str | None, int]] = []
            for kind, sql in (
                ("event", "SELECT run_id, id FROM events WHERE id > ? ORDER BY id"),
                ("round", "SELECT run_id, rowid FROM rounds WHERE rowid > ? ORDER BY rowid"),
                ("action", "SELECT target, id FROM admin_actions WHERE id > ? ORDER BY id"),
                ("receipt", "SELECT run_id, id FROM receipts WHERE id > ? ORDER BY id"),
            ):
                index = CHANGE_KINDS.index(kind)
                out.extend((kind, run_id, int(row_id)) for run_id, row_id in conn.execute(sql, (after[index],)))
        return out


__all__ = ["CHANGE_KINDS", "ConsoleRows", "Cursor"]
