"""The server's copy of the sites' signed ledger receipts (:mod:`fedface.common.privacy.receipts`).

Each private round a site answers carries the signed receipt of its ledger charge. The server
keeps every one in its run store (table ``receipts``, append-only like the rest of the store),
checked on arrival:

- the signature holds, under the receipt key this site name used first in this store (a
  receipt signed by another key is recorded with the problem, not trusted);
- it can follow the site's previous receipt for the same ledger and data set: same ledger, its
  chains not gone back, its epsilon not gone down (``check_receipt_follows``). A site whose
  ledger was rolled back, replaced or emptied between rounds or runs shows up here, while the
  run goes on: the problem is recorded beside the receipt and logged.

The receipts go back to a site with :func:`export_receipts` (``fedface server receipts``), and
the site checks its ledger against them (``fedface privacy verify --receipts``).

Kept apart from :mod:`fedface.server.store` (the run store's rounds, participation and
metrics): this module owns the ``receipts`` table's schema, its writes and its reads, which the
store calls inside its own transactions.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedface.common.errors import LedgerError
from fedface.common.privacy.receipts import Receipt, check_receipt_follows, parse_receipt, write_receipts

logger = logging.getLogger(__name__)

SCHEMA: tuple[str, ...] = (
    """
CREATE TABLE IF NOT EXISTS receipts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    site TEXT NOT NULL CHECK (length(site) > 0),
    public_key TEXT,
    dataset TEXT,
    session_id INTEGER,
    epsilon REAL,
    receipt TEXT NOT NULL,
    problem TEXT,
    problem_kind TEXT CHECK (problem_kind IN ('unreadable', 'foreign-key', 'not-following')),
    recorded_at TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS receipts_by_site ON receipts (site, id)",
    *(
        f"CREATE TRIGGER IF NOT EXISTS receipts_no_{verb.lower()} BEFORE {verb} ON receipts "
        "BEGIN SELECT RAISE(ABORT, 'fedface run store receipts rows are append-only'); END"
        for verb in ("UPDATE", "DELETE")
    ),
)


@dataclass(frozen=True)
class StoredReceipt:
    """One receipt as the server keeps it: the site's JSON text, and what the server found
    wrong with it on arrival (``None``: signature good and it follows the site's previous one)."""

    run_id: str
    round: int
    site: str
    receipt: str
    problem: str | None
    problem_kind: str | None = None


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Give a run store the receipts table (new stores, and stores from before receipts)."""
    for statement in SCHEMA:
        conn.execute(statement)


def check(conn: sqlite3.Connection, site: str, text: str) -> tuple[Receipt | None, str | None, str | None]:
    """Parse and check one arriving receipt of ``site`` against what the store holds (see the
    module docstring); returns the receipt (``None`` when unreadable), the problem and its kind
    (``unreadable``, ``foreign-key``, ``not-following``), or ``None`` for both."""
    first = conn.execute(
        "SELECT public_key FROM receipts WHERE site = ? AND public_key IS NOT NULL AND problem IS NULL ORDER BY id LIMIT 1", (site,)
    ).fetchone()
    try:
        receipt = parse_receipt(text)
    except LedgerError as exc:
        return None, str(exc), "unreadable"
    if first is not None and first[0] != receipt.public_key:
        return receipt, (
            f"site {site}'s receipt is signed by receipt key {receipt.public_key[:12]}..., not by the key "
            f"{first[0][:12]}... of its earlier receipts: another party, or a site that replaced its key"
        ), "foreign-key"
    previous = conn.execute(
        "SELECT receipt FROM receipts WHERE site = ? AND dataset = ? AND problem IS NULL ORDER BY id DESC LIMIT 1",
        (site, receipt.dataset),
    ).fetchone()
    if previous is not None:
        try:
            check_receipt_follows(Receipt.from_json(previous[0]), receipt)
        except LedgerError as exc:
            return receipt, f"site {site}: {exc}", "not-following"
    return receipt, None, None


def insert(conn: sqlite3.Connection, run_id: str, round_: int, receipts: Mapping[str, str], now: str) -> None:
    """Check and append one round's receipts (``site -> JSON``), inside the caller's transaction."""
    for site, text in receipts.items():
        receipt, problem, kind = check(conn, site, text)
        if problem is not None:
            logger.warning("round %d: %s", round_, problem)
        conn.execute(
            "INSERT INTO receipts (run_id, round, site, public_key, dataset, session_id, epsilon, receipt, problem, problem_kind, "
            "recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id, int(round_), site,
                receipt.public_key if receipt else None, receipt.dataset if receipt else None,
                receipt.session_id if receipt else None, receipt.epsilon if receipt else None,
                text, problem, kind, now,
            ),
        )


def select(conn: sqlite3.Connection, *, site: str | None = None, run_id: str | None = None) -> list[StoredReceipt]:
    """The stored receipts in arrival order, of one site and/or one run."""
    where, args = [], []
    if site is not None:
        where.append("site = ?")
        args.append(site)
    if run_id is not None:
        where.append("run_id = ?")
        args.append(run_id)
    sql = "SELECT run_id, round, site, receipt, problem, problem_kind FROM receipts"
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = conn.execute(sql + " ORDER BY id", args).fetchall()
    return [StoredReceipt(run_id=r, round=int(n), site=s, receipt=t, problem=p, problem_kind=k) for r, n, s, t, p, k in rows]


def export_receipts(stored: list[StoredReceipt], path: str | Path) -> int:
    """Write the receipts of ``stored`` as a JSON-lines file for ``fedface privacy verify
    --receipts`` (atomically); returns how many were written. Kept: every receipt signed by the
    site's first key, those that did not follow their predecessor too (they are the evidence of
    a rollback); left out: unreadable ones and those signed by another key."""
    return write_receipts(path, [r.receipt for r in stored if r.problem_kind not in ("unreadable", "foreign-key")])


__all__ = ["SCHEMA", "StoredReceipt", "check", "ensure_schema", "export_receipts", "insert", "select"]
