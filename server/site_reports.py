"""What each site said about itself in a round: its policy and its round's DP-SGD parameters.

A site's reply carries, in the clear, the privacy policy it enforces (``wire.M_POLICY``) and the
mechanism of the round it charged (noise multiplier, sample rate, steps, clipping norm). The
server keeps them in its run store (table ``site_reports``, append-only like the rest of the
store) so that the console can show what each site accepts and a privacy report built from the
server's store alone can name each round's mechanism. They are *reported*: the site's ledger
(``fedface report privacy --ledger``) and its signed receipts are what prove them.

Kept apart from :mod:`fedface.server.store`: this module owns the table's schema, its writes and
its reads, which the store calls inside its own transactions.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedface.common import wire

SCHEMA: tuple[str, ...] = (
    """
CREATE TABLE IF NOT EXISTS site_reports (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    site TEXT NOT NULL CHECK (length(site) > 0),
    node TEXT,
    policy TEXT,
    noise_multiplier REAL,
    sample_rate REAL,
    steps INTEGER,
    max_grad_norm REAL,
    problem TEXT,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (run_id, round, site)
)""",
    "CREATE INDEX IF NOT EXISTS site_reports_by_site ON site_reports (site, run_id, round)",
    *(
        f"CREATE TRIGGER IF NOT EXISTS site_reports_no_{verb.lower()} BEFORE {verb} ON site_reports "
        "BEGIN SELECT RAISE(ABORT, 'fedface run store site_reports rows are append-only'); END"
        for verb in ("UPDATE", "DELETE")
    ),
)
_FIELDS = ("run_id", "round", "site", "node", "policy", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "problem", "recorded_at")


@dataclass(frozen=True)
class SiteReport:
    """One site's report of one round. ``policy`` is the policy it enforces (``None``: not sent
    or unreadable, then ``problem`` says which); the mechanism fields are ``None`` for a round it
    did not charge (a refusal, a non-private round)."""

    run_id: str
    round: int
    site: str
    node: str | None  # the Flower node the reply came from
    policy: dict[str, Any] | None
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    max_grad_norm: float | None
    problem: str | None
    recorded_at: str


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Give a run store the site_reports table (new stores, and stores from before it)."""
    for statement in SCHEMA:
        conn.execute(statement)


def from_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The report fields of one reply's metrics (policy as received, mechanism as numbers)."""
    out: dict[str, Any] = {}
    if wire.M_POLICY in metrics:
        out["policy"] = metrics[wire.M_POLICY]
    for key in (wire.M_NOISE, wire.M_SAMPLE_RATE, wire.M_STEPS, wire.M_CLIP):
        if key in metrics:
            out[key] = metrics[key]
    return out


MAX_POLICY = 2048  # characters of a reported policy (a real one is about 200)
MAX_VALUE = 64  # characters of one policy value


def _policy(text: object) -> tuple[str | None, str | None]:
    """(canonical JSON, problem) of a reported policy: a JSON object of POLICY_FIELDS only, each
    value null, a boolean, a number or a short string. It comes from the site: anything else is
    kept as a problem, never parsed deeper or stored."""
    if text is None:
        return None, "no policy reported"
    text = str(text)
    if len(text) > MAX_POLICY:
        return None, f"policy longer than {MAX_POLICY} characters"
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None, "policy is not JSON"
    if not isinstance(value, dict) or set(value) != set(wire.POLICY_FIELDS):
        return None, f"policy must be a JSON object of {', '.join(wire.POLICY_FIELDS)}"
    for key, v in value.items():
        if not (v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= MAX_VALUE)):
            return None, f"policy value of {key} must be null, a boolean, a number or a string of at most {MAX_VALUE} characters"
        if isinstance(v, float) and not math.isfinite(v):
            return None, f"policy value of {key} must be finite"
    return json.dumps(value, sort_keys=True), None


def _number(value: object, *, integer: bool = False) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if integer else float(value)


def insert(conn: sqlite3.Connection, run_id: str, round_: int, reports: Mapping[str, Mapping[str, Any]], now: str) -> None:
    """Append each site's report of a round (inside the store's write transaction)."""
    rows = []
    for site, fields in reports.items():
        policy, problem = _policy(fields.get("policy"))
        node = fields.get("node")
        rows.append(
            (
                run_id, round_, site, None if node is None else str(node), policy,
                _number(fields.get(wire.M_NOISE)), _number(fields.get(wire.M_SAMPLE_RATE)),
                _number(fields.get(wire.M_STEPS), integer=True), _number(fields.get(wire.M_CLIP)),
                problem, now,
            )
        )
    conn.executemany(f"INSERT INTO site_reports ({', '.join(_FIELDS)}) VALUES ({', '.join('?' for _ in _FIELDS)})", rows)


def node_names(conn: sqlite3.Connection) -> dict[str, str]:
    """The name each Flower node last reported (node id -> site name), over every run."""
    rows = conn.execute("SELECT node, site FROM site_reports WHERE node IS NOT NULL ORDER BY rowid")
    return {str(node): str(site) for node, site in rows}


def select(conn: sqlite3.Connection, *, run_id: str | None = None, site: str | None = None) -> list[SiteReport]:
    """Reports in run, round and site order, of one run and/or one site (all by default)."""
    where, args = [], []
    if run_id is not None:
        where.append("run_id = ?")
        args.append(run_id)
    if site is not None:
        where.append("site = ?")
        args.append(site)
    sql = f"SELECT {', '.join(_FIELDS)} FROM site_reports"  # column names are module constants
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = conn.execute(sql + " ORDER BY rowid", args).fetchall()
    out = []
    for row in rows:
        values = dict(zip(_FIELDS, row, strict=True))
        values["policy"] = json.loads(values["policy"]) if values["policy"] is not None else None
        out.append(SiteReport(**values))
    return out


__all__ = ["MAX_POLICY", "MAX_VALUE", "SCHEMA", "SiteReport", "ensure_schema", "from_metrics", "insert", "node_names", "select"]
