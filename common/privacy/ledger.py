"""A site's privacy ledger: an append-only SQLite file of the DP-SGD sessions run on its data.

One file is one site's ledger. It holds any number of *data sets* (a name: a resolved data
root, a federated site's name); budgets and spend are per data set. The spend of a data set
is the composition, by a fresh Opacus accountant, of **every** session ever charged to it,
across runs and rounds (:func:`~fedface.common.privacy.accounting.compute_epsilon`), with the
accountant and delta of its latest budget. Without a budget the spend is reported with the
``rdp`` accountant at the smallest delta any session recorded (the conservative choice).

Charging before training
    :meth:`PrivacyLedger.charge` is called *before* a session trains. In one ``BEGIN
    IMMEDIATE`` transaction it composes the session with the data set's history, refuses
    (:class:`~fedface.common.errors.BudgetExhaustedError`, nothing written) if that would pass
    the budget, and otherwise records the session. Two processes sharing a ledger cannot both
    pass the check on the same spend: SQLite serialises the transactions. A crash after the
    charge can only over-count the spend, never under-count it.

Append-only and tamper-evident
    Triggers abort every ``UPDATE`` and ``DELETE`` on the ``meta``, ``budgets`` and
    ``sessions`` tables. Each budget and session row carries ``row_hash = sha256(prev_hash +
    canonical JSON of the row)``; ``prev_hash`` is the previous row's ``row_hash`` *of the same
    table* (each table is its own chain) and 64 zeros for a table's first row. Row ids run
    1, 2, 3, ... without gaps. :meth:`PrivacyLedger.verify` recomputes both chains, and checks
    the ids, SQLite's autoincrement counters (a removed last row) and the triggers. The chain
    has no secret key: it detects edits by hand or by other tools, not an adversary who
    rewrites the whole file; keep the file where only the site's operator can write it, and
    back it up. Nor can it tell a file cut short or restored from an older backup from an honest
    one: signed receipts kept outside the site can (:mod:`~fedface.common.privacy.receipts`).

Durability: WAL journal with ``synchronous=FULL``, so a committed charge survives a power cut.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import numbers
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedface.common.errors import BudgetExhaustedError, ConfigError, LedgerError
from fedface.common.privacy.accounting import (
    ACCOUNTANTS,
    Accountant,
    Mechanism,
    compute_epsilon,
    format_epsilon,
)
from fedface.common.sqlite_store import SQLiteStore

LEDGER_ENV = "FEDFACE_LEDGER"
"""Environment variable naming the ledger file; default ``~/.fedface/privacy-ledger.sqlite``."""

SCHEMA_VERSION = 1
APPLICATION = "fedface-privacy-ledger"
GENESIS_HASH = "0" * 64
_EPSILON_SLACK = 1e-12  # float equality only: a session calibrated to land exactly on the budget

_APPEND_ONLY = "fedface ledger is append-only"
_TABLES = ("meta", "budgets", "sessions")

_SCHEMA: tuple[str, ...] = (
    """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
)""",
    """
CREATE TABLE IF NOT EXISTS budgets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    created_at TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    row_hash TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS budgets_by_dataset ON budgets (dataset, id)",
    """
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER,
    examples INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    max_grad_norm REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    sampling TEXT NOT NULL,
    secure_mode INTEGER NOT NULL,
    epsilon_after REAL NOT NULL,
    epsilon_delta REAL NOT NULL,
    epsilon_accountant TEXT NOT NULL,
    created_at TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    row_hash TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS sessions_by_dataset ON sessions (dataset, id)",
    *(
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END"
        for table in _TABLES
        for verb in ("UPDATE", "DELETE")
    ),
)

# Columns that enter each table's row hash (all but prev_hash and row_hash), in table order.
_BUDGET_FIELDS = ("id", "dataset", "epsilon", "delta", "accountant", "created_at")
_SESSION_FIELDS = (
    "id",
    "dataset",
    "run_id",
    "round",
    "examples",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "max_grad_norm",
    "delta",
    "accountant",
    "sampling",
    "secure_mode",
    "epsilon_after",
    "epsilon_delta",
    "epsilon_accountant",
    "created_at",
)
_HASHED_FIELDS = {"budgets": _BUDGET_FIELDS, "sessions": _SESSION_FIELDS}


def default_ledger_path() -> Path:
    """``$FEDFACE_LEDGER`` if set, else ``~/.fedface/privacy-ledger.sqlite`` (read at each call)."""
    env = os.environ.get(LEDGER_ENV)
    return Path(env).expanduser() if env else Path.home() / ".fedface" / "privacy-ledger.sqlite"


@dataclass(frozen=True)
class Budget:
    """A data set's privacy budget: the (epsilon, delta) its total spend may reach.

    The latest budget row of a data set applies; earlier ones stay in the ledger.
    ``accountant`` is the accountant the spend is composed with.
    """

    dataset: str
    epsilon: float
    delta: float
    accountant: Accountant
    created_at: str


@dataclass(frozen=True)
class Session:
    """One charged private training session.

    ``epsilon_after`` is the data set's total epsilon right after this session was charged,
    computed with ``epsilon_accountant`` at ``epsilon_delta`` (the budget's, or the default).
    """

    id: int
    dataset: str
    run_id: str
    round: int | None
    examples: int
    created_at: str
    mechanism: Mechanism
    epsilon_after: float
    epsilon_delta: float
    epsilon_accountant: Accountant


@dataclass(frozen=True)
class Spend:
    """A data set's privacy spend: all its sessions composed.

    ``delta`` is ``None`` only for a data set with neither a budget nor a session (epsilon 0
    holds at every delta).
    """

    dataset: str
    epsilon: float
    delta: float | None
    accountant: Accountant
    sessions: int
    steps: int
    budget: Budget | None

    @property
    def remaining(self) -> float | None:
        """Budget epsilon minus the spend, floored at 0; ``None`` without a budget.

        Display it with ``format_epsilon(..., rounding="down")`` (and the spend rounded up).
        """
        if self.budget is None:
            return None
        return max(0.0, self.budget.epsilon - self.epsilon)

    @property
    def is_exhausted(self) -> bool:
        """Whether a budget is set and nothing of it remains."""
        remaining = self.remaining
        return remaining is not None and remaining <= 0.0


class PrivacyLedger(SQLiteStore):
    """A site's append-only privacy ledger in one SQLite file (see the module docstring).

    Parameters
    ----------
    path
        The ledger file; parent directories are created. A missing or empty file becomes a
        new ledger unless ``create`` is false.
    create
        Whether a missing file may be created.

    Raises
    ------
    LedgerError
        When the file is missing (``create=False``), cannot be opened, is not SQLite, is not
        a fedface ledger, or has a newer schema than this fedface understands.
    """

    KIND = "privacy ledger"
    APPLICATION = APPLICATION
    SCHEMA_VERSION = SCHEMA_VERSION
    SCHEMA = _SCHEMA
    REQUIRED_TABLES = frozenset({"budgets", "sessions"})
    ERROR = LedgerError
    ELSEWHERE = f"point --ledger / {LEDGER_ENV} at another file"

    # --- budgets -------------------------------------------------------------------------------

    def set_budget(self, dataset: str, *, epsilon: float, delta: float, accountant: Accountant = "rdp") -> Budget:
        """Append a budget for ``dataset``; it replaces earlier ones (which stay recorded).

        Parameters
        ----------
        dataset
            Data set name.
        epsilon
            Total epsilon the data set's sessions may reach (finite, ``> 0``).
        delta
            The delta in ``(0, 1)`` the spend is accounted at. Smaller is more private.
        accountant
            ``"rdp"`` or ``"prv"``: how sessions are composed against this budget.

        Returns
        -------
        Budget
            The budget recorded.

        Raises
        ------
        ConfigError
            On an empty data set name or an epsilon, delta or accountant out of range.
        """
        _check_dataset(dataset)
        problems = []
        if isinstance(epsilon, bool) or not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            problems.append(f"budget epsilon must be a finite number > 0, got {epsilon!r}")
        if isinstance(delta, bool) or not (isinstance(delta, (int, float)) and 0 < delta < 1):
            problems.append(f"budget delta must be in (0, 1), got {delta!r}")
        if accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
        if problems:
            raise ConfigError("; ".join(problems))
        with self._write() as conn:
            row_id, prev = _chain_tail(conn, "budgets")
            row = {
                "id": row_id,
                "dataset": dataset,
                "epsilon": float(epsilon),
                "delta": float(delta),
                "accountant": accountant,
                "created_at": _now(),
            }
            _insert(conn, "budgets", row, prev)
        return _budget(row)

    def budget(self, dataset: str) -> Budget | None:
        """The budget that applies to ``dataset`` (its latest), or ``None``."""
        with self._read() as conn:
            return self._budget(conn, dataset)

    # --- reading -------------------------------------------------------------------------------

    def datasets(self) -> list[str]:
        """Every data set with a budget or a session, sorted."""
        with self._read() as conn:
            rows = conn.execute("SELECT dataset FROM budgets UNION SELECT dataset FROM sessions ORDER BY dataset")
            return [name for (name,) in rows]

    def sessions(self, dataset: str | None = None) -> list[Session]:
        """Charged sessions in charge order, of one data set or (``None``) of all."""
        with self._read() as conn:
            cols = ", ".join(_SESSION_FIELDS)
            if dataset is None:
                rows = conn.execute(f"SELECT {cols} FROM sessions ORDER BY id")  # column and table names are module constants
            else:
                rows = conn.execute(f"SELECT {cols} FROM sessions WHERE dataset = ? ORDER BY id", (dataset,))
            return [_session(dict(zip(_SESSION_FIELDS, row, strict=True))) for row in rows]

    def history(self, dataset: str) -> list[tuple[float, float, int]]:
        """``(noise_multiplier, sample_rate, steps)`` of every session of ``dataset``, in order."""
        with self._read() as conn:
            return _history(conn, dataset)

    def spend(self, dataset: str) -> Spend:
        """``dataset``'s privacy spend: all its sessions composed (see the module docstring).

        Raises
        ------
        ConfigError
            When the accountant cannot compute the epsilon (PRV at extreme parameters).
        """
        with self._read() as conn:
            budget = self._budget(conn, dataset)
            history = _history(conn, dataset)
            session_deltas = [d for (d,) in conn.execute("SELECT delta FROM sessions WHERE dataset = ?", (dataset,))]
        accountant, delta = _accounting(budget, session_deltas)
        epsilon = _epsilon(dataset, history, delta, accountant) if delta is not None else 0.0
        return Spend(
            dataset=dataset,
            epsilon=epsilon,
            delta=delta,
            accountant=accountant,
            sessions=len(history),
            steps=sum(steps for _, _, steps in history),
            budget=budget,
        )

    def preview(self, dataset: str, mechanism: Mechanism) -> float:
        """The epsilon ``dataset`` would reach if ``mechanism`` were charged (nothing is written).

        Raises
        ------
        ConfigError
            When the accountant cannot compute the epsilon (PRV at extreme parameters).
        """
        with self._read() as conn:
            epsilon, _, _, _ = self._compose(conn, dataset, mechanism)
        return epsilon

    # --- charging ------------------------------------------------------------------------------

    def charge(
        self, dataset: str, mechanism: Mechanism, *, run_id: str, round: int | None = None, examples: int
    ) -> Session:
        """Record a private training session against ``dataset``, refusing one over its budget.

        Call it *before* the session trains: a crash can then only over-count. Check and insert
        happen in one ``BEGIN IMMEDIATE`` transaction, so concurrent processes cannot both pass.

        Parameters
        ----------
        dataset
            Data set name the session trains on.
        mechanism
            The session's DP-SGD parameters.
        run_id
            The run (or federation) the session belongs to.
        round
            The federated round, if any.
        examples
            Training examples the session samples from.

        Returns
        -------
        Session
            The recorded session, with the data set's total epsilon after it.

        Raises
        ------
        BudgetExhaustedError
            When the total would pass the data set's budget; nothing is recorded.
        ConfigError
            On an empty data set or run id, negative examples or round, or when the accountant
            cannot compute the epsilon.
        """
        _check_dataset(dataset)
        if not isinstance(run_id, str) or not run_id:
            raise ConfigError(f"run_id must be a non-empty string, got {run_id!r}")
        if isinstance(examples, bool) or not isinstance(examples, numbers.Integral) or examples < 0:
            raise ConfigError(f"examples must be an integer >= 0, got {examples!r}")
        if round is not None and (isinstance(round, bool) or not isinstance(round, numbers.Integral) or round < 0):
            raise ConfigError(f"round must be an integer >= 0 or None, got {round!r}")
        with self._write() as conn:
            epsilon_after, delta, accountant, budget = self._compose(conn, dataset, mechanism)
            if budget is not None and epsilon_after > budget.epsilon + _EPSILON_SLACK:
                spent = _epsilon(dataset, _history(conn, dataset), delta, accountant)
                raise BudgetExhaustedError(_refusal(dataset, spent, epsilon_after, budget, mechanism))
            row_id, prev = _chain_tail(conn, "sessions")
            sigma, q, steps = mechanism.history_entry()
            row = {
                "id": row_id,
                "dataset": dataset,
                "run_id": run_id,
                "round": None if round is None else int(round),
                "examples": int(examples),
                "noise_multiplier": sigma,
                "sample_rate": q,
                "steps": steps,
                "max_grad_norm": float(mechanism.max_grad_norm),
                "delta": float(mechanism.delta),
                "accountant": mechanism.accountant,
                "sampling": mechanism.sampling,
                "secure_mode": int(mechanism.secure_mode),
                "epsilon_after": epsilon_after,
                "epsilon_delta": delta,
                "epsilon_accountant": accountant,
                "created_at": _now(),
            }
            _insert(conn, "sessions", row, prev)
        return _session(row)

    # --- integrity -----------------------------------------------------------------------------

    def verify(self) -> None:
        """Check the ledger is intact: hash chains, gap-free ids, counters and triggers.

        Raises
        ------
        LedgerError
            Naming the table and first row id that fails, or the missing trigger.
        """
        fix = "restore the ledger from a backup; never edit it by hand"
        with self._read() as conn:
            for table, fields in _HASHED_FIELDS.items():
                prev = GENESIS_HASH
                expected_id = 1
                cols = ", ".join((*fields, "prev_hash", "row_hash"))
                for values in conn.execute(f"SELECT {cols} FROM {table} ORDER BY id"):
                    row = dict(zip((*fields, "prev_hash", "row_hash"), values, strict=True))
                    row_id = row["id"]
                    if row_id != expected_id:
                        raise LedgerError(
                            f"privacy ledger {self.path} fails its integrity check: {table} row {expected_id} "
                            f"is missing (next row is {row_id}); {fix}"
                        )
                    stored_prev, stored_hash = row.pop("prev_hash"), row.pop("row_hash")
                    if stored_prev != prev or _row_hash(table, row, prev) != stored_hash:
                        raise LedgerError(
                            f"privacy ledger {self.path} fails its integrity check: {table} row {row_id} "
                            f"was altered or a row before it removed; {fix}"
                        )
                    prev = stored_hash
                    expected_id += 1
                seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
                if (seq[0] if seq else 0) != expected_id - 1:
                    raise LedgerError(
                        f"privacy ledger {self.path} fails its integrity check: {table} rows after id "
                        f"{expected_id - 1} were removed (up to id {seq[0] if seq else 0} existed); {fix}"
                    )
            triggers = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
            missing = sorted(f"{t}_no_{v}" for t in _TABLES for v in ("update", "delete") if f"{t}_no_{v}" not in triggers)
            if missing:
                raise LedgerError(
                    f"privacy ledger {self.path} fails its integrity check: append-only triggers "
                    f"{', '.join(missing)} were removed; {fix}"
                )

    # --- receipts (fedface.common.privacy.receipts) --------------------------------------------

    def head(self) -> dict[str, tuple[int, str]]:
        """``(last id, its row_hash)`` of the ``budgets`` and ``sessions`` chains (``(0, GENESIS_HASH)``: empty)."""
        with self._read() as conn:
            tails = {table: _chain_tail(conn, table) for table in _HASHED_FIELDS}
        return {table: (next_id - 1, row_hash) for table, (next_id, row_hash) in tails.items()}

    def row_hash(self, table: str, row_id: int) -> str | None:
        """The ``row_hash`` of row ``row_id`` of the ``budgets`` or ``sessions`` chain, or ``None``."""
        if table not in _HASHED_FIELDS:
            raise ValueError(f"table must be one of {', '.join(_HASHED_FIELDS)}, got {table!r}")
        with self._read() as conn:
            row = conn.execute(f"SELECT row_hash FROM {table} WHERE id = ?", (row_id,)).fetchone()
        return None if row is None else str(row[0])

    # --- internals -----------------------------------------------------------------------------

    def _budget(self, conn: sqlite3.Connection, dataset: str) -> Budget | None:
        cols = ", ".join(_BUDGET_FIELDS)
        row = conn.execute(
            f"SELECT {cols} FROM budgets WHERE dataset = ? ORDER BY id DESC LIMIT 1",
            (dataset,),
        ).fetchone()
        return None if row is None else _budget(dict(zip(_BUDGET_FIELDS, row, strict=True)))

    def _compose(
        self, conn: sqlite3.Connection, dataset: str, mechanism: Mechanism
    ) -> tuple[float, float, Accountant, Budget | None]:
        """(epsilon after mechanism, delta, accountant, budget) for ``dataset``."""
        budget = self._budget(conn, dataset)
        deltas = [d for (d,) in conn.execute("SELECT delta FROM sessions WHERE dataset = ?", (dataset,))]
        accountant: Accountant = "rdp"
        delta = min([*deltas, mechanism.delta])  # without a budget: the smallest delta recorded
        if budget is not None:
            accountant, delta = budget.accountant, budget.delta
        history = [*_history(conn, dataset), mechanism.history_entry()]
        return _epsilon(dataset, history, delta, accountant), delta, accountant, budget


# --- module helpers ----------------------------------------------------------------------------


def _check_dataset(dataset: str) -> None:
    if not isinstance(dataset, str) or not dataset:
        raise ConfigError(f"data set name must be a non-empty string, got {dataset!r}")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def _row_hash(table: str, row: dict[str, Any], prev_hash: str) -> str:
    """sha256 of the previous hash and the row's canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps({"table": table, **row}, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256((prev_hash + canonical).encode("utf-8")).hexdigest()


def _chain_tail(conn: sqlite3.Connection, table: str) -> tuple[int, str]:
    """(next row id, row_hash of the last row or the genesis hash) of ``table``."""
    last = conn.execute(f"SELECT id, row_hash FROM {table} ORDER BY id DESC LIMIT 1").fetchone()
    return (1, GENESIS_HASH) if last is None else (int(last[0]) + 1, str(last[1]))


def _insert(conn: sqlite3.Connection, table: str, row: dict[str, Any], prev_hash: str) -> None:
    """INSERT ``row`` with its prev_hash and row_hash (parameterised; column names are ours)."""
    values = {**row, "prev_hash": prev_hash, "row_hash": _row_hash(table, row, prev_hash)}
    cols = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(values.values()))


def _history(conn: sqlite3.Connection, dataset: str) -> list[tuple[float, float, int]]:
    rows = conn.execute(
        "SELECT noise_multiplier, sample_rate, steps FROM sessions WHERE dataset = ? ORDER BY id", (dataset,)
    )
    return [(float(sigma), float(q), int(steps)) for sigma, q, steps in rows]


def _accounting(budget: Budget | None, deltas: list[float]) -> tuple[Accountant, float | None]:
    """The accountant and delta a data set is accounted with: its budget's, else rdp at min delta."""
    if budget is not None:
        return budget.accountant, budget.delta
    return "rdp", (min(deltas) if deltas else None)


def _epsilon(dataset: str, history: list[tuple[float, float, int]], delta: float, accountant: Accountant) -> float:
    try:
        return compute_epsilon(history, delta=delta, accountant=accountant)
    except ValueError as exc:
        raise ConfigError(f"cannot account data set {dataset!r} with {accountant}: {exc}") from exc


def _refusal(dataset: str, spent: float, after: float, budget: Budget, mechanism: Mechanism) -> str:
    remaining = max(0.0, budget.epsilon - spent)
    return (
        f"budget exhausted for data set {dataset!r}: spent epsilon {format_epsilon(spent)} of budget "
        f"{budget.epsilon:g} (delta {budget.delta:g}, {budget.accountant}), remaining "
        f"{format_epsilon(remaining, rounding='down')}; this session (noise {mechanism.noise_multiplier:.4g}, "
        f"q {mechanism.sample_rate:.4g}, {mechanism.steps} steps) would take it to epsilon "
        f"{format_epsilon(after)}: add noise, train fewer steps, or raise the budget with `fedface privacy budget`"
    )


def _budget(row: dict[str, Any]) -> Budget:
    return Budget(
        dataset=row["dataset"],
        epsilon=row["epsilon"],
        delta=row["delta"],
        accountant=row["accountant"],
        created_at=row["created_at"],
    )


def _session(row: dict[str, Any]) -> Session:
    mechanism = Mechanism(
        noise_multiplier=row["noise_multiplier"],
        sample_rate=row["sample_rate"],
        steps=row["steps"],
        max_grad_norm=row["max_grad_norm"],
        delta=row["delta"],
        accountant=row["accountant"],
        sampling=row["sampling"],
        secure_mode=bool(row["secure_mode"]),
    )
    return Session(
        id=row["id"],
        dataset=row["dataset"],
        run_id=row["run_id"],
        round=row["round"],
        examples=row["examples"],
        created_at=row["created_at"],
        mechanism=mechanism,
        epsilon_after=row["epsilon_after"],
        epsilon_delta=row["epsilon_delta"],
        epsilon_accountant=row["epsilon_accountant"],
    )


__all__ = [
    "APPLICATION",
    "GENESIS_HASH",
    "LEDGER_ENV",
    "SCHEMA_VERSION",
    "Budget",
    "PrivacyLedger",
    "Session",
    "Spend",
    "default_ledger_path",
]
