"""One SQLite file of fedface's own: opening, schema checks and transactions, shared by the
privacy ledger (:mod:`fedface.common.privacy.ledger`) and the server's run store
(``fedface.server.store``).

A subclass names what it is (``KIND``, ``APPLICATION``, ``SCHEMA_VERSION``, ``SCHEMA``, the
tables it cannot do without, the error it raises and how a user points fedface elsewhere); this
base opens the file (WAL journal, ``synchronous=FULL``, foreign keys, a 30 s busy timeout),
refuses anything that is not that kind of fedface file with one line naming the fix, gives a
new file its schema, and runs every read and write in an explicit transaction (writes as
``BEGIN IMMEDIATE``, so that a check and the insert that follows it cannot interleave with
another process).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from fedface.common.errors import FedFaceError

BUSY_TIMEOUT_S = 30.0
_SQLITE_MAGIC = b"SQLite format 3\x00"


class SQLiteStore:
    """Base of fedface's SQLite files (see the module docstring)."""

    KIND: ClassVar[str]  # "privacy ledger"
    APPLICATION: ClassVar[str]  # stored in the meta table
    SCHEMA_VERSION: ClassVar[int]
    SCHEMA: ClassVar[tuple[str, ...]]  # CREATE statements, including the meta table
    REQUIRED_TABLES: ClassVar[frozenset[str]]
    ERROR: ClassVar[type[FedFaceError]]
    ELSEWHERE: ClassVar[str]  # how to use another file: "point --ledger at another file"

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        if not self.path.exists() and not create:
            raise self.ERROR(f"no {self.KIND} at {self.path}")
        self._check_header()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise self.ERROR(f"cannot open {self.KIND} {self.path}: {exc}; check the path and its permissions") from exc
        try:
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise self.ERROR(
                f"{self.path} is not a readable fedface {self.KIND} ({exc}); restore it from a backup or {self.ELSEWHERE}"
            ) from exc
        except BaseException:
            self._conn.close()
            raise

    # --- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()

    def __enter__(self):  # type: ignore[no-untyped-def]  # returns the subclass
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    # --- internals -----------------------------------------------------------------------------

    def _check_header(self) -> None:
        """Refuse a non-empty file that is not SQLite (before SQLite would say something vaguer)."""
        try:
            if not self.path.is_file() or self.path.stat().st_size == 0:
                return
            with self.path.open("rb") as fh:
                header = fh.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            raise self.ERROR(f"cannot read {self.KIND} {self.path}: {exc}; check the path and its permissions") from exc
        if header != _SQLITE_MAGIC:
            raise self.ERROR(
                f"{self.path} is not a fedface {self.KIND} (not an SQLite file); restore it from a backup or {self.ELSEWHERE}"
            )

    def _tables(self) -> set[str]:
        return {name for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _init_schema(self) -> None:
        """Check an existing file is one of ours that we can read; give a new (empty) file the schema."""
        with self._lock:
            conn = self._conn
            if "meta" not in self._tables():
                # New file: create under the write lock (another process may be doing the same).
                conn.execute("BEGIN IMMEDIATE")
                try:
                    tables = self._tables()
                    if tables and "meta" not in tables:
                        raise self.ERROR(
                            f"{self.path} is an SQLite file but not a fedface {self.KIND} (it has tables "
                            f"{', '.join(sorted(tables))}); {self.ELSEWHERE}"
                        )
                    if not tables:
                        for statement in self.SCHEMA:
                            conn.execute(statement)
                        conn.executemany(
                            "INSERT INTO meta (key, value) VALUES (?, ?)",
                            [("application", self.APPLICATION), ("schema_version", str(self.SCHEMA_VERSION))],
                        )
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("application") != self.APPLICATION:
                raise self.ERROR(
                    f"{self.path} is not a fedface {self.KIND} (meta application {meta.get('application')!r}); {self.ELSEWHERE}"
                )
            version = str(meta.get("schema_version", ""))
            if version.isdigit() and int(version) > self.SCHEMA_VERSION:
                raise self.ERROR(
                    f"{self.KIND} {self.path} has schema version {version}, newer than this fedface "
                    f"reads ({self.SCHEMA_VERSION}); upgrade fedface"
                )
            if not version.isdigit() or int(version) < 1 or not self.REQUIRED_TABLES <= self._tables():
                raise self.ERROR(f"{self.KIND} {self.path} is incomplete (schema version {version!r}); restore it from a backup")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any error."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise self.ERROR(f"cannot lock {self.KIND} {self.path} for writing: {exc}") from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise self.ERROR(f"cannot write {self.KIND} {self.path}: {exc}; restore it from a backup") from exc
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: its queries see one snapshot of the file."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN")
                yield conn
            except sqlite3.DatabaseError as exc:
                raise self.ERROR(f"cannot read {self.KIND} {self.path}: {exc}; restore it from a backup") from exc
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")


__all__ = ["BUSY_TIMEOUT_S", "SQLiteStore"]
