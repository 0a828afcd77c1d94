"""Where the console reads from: the run store (opened when it appears, reopened when replaced),
and what ``fedface console serve`` was given (:class:`Settings`)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from fedface.common.errors import RunDirError
from fedface.server.admin_log import AdminActionKind
from fedface.server.run_records import now_utc
from fedface.server.store import RunStore

logger = logging.getLogger(__name__)

STORE_FILE = "runs.sqlite"
_STORE_SUFFIXES = (".sqlite", ".sqlite3", ".db")


def store_file(path: str | Path) -> Path:
    """The run store file of ``path``: a run directory's ``runs.sqlite``, or the file itself.

    A path that does not exist yet is a run directory unless it ends like a store file."""
    p = Path(path)
    if p.is_dir() or (not p.exists() and p.suffix not in _STORE_SUFFIXES):
        return p / STORE_FILE
    return p


#: Audit-log rows kept in memory at most while there is no run store to write them to.
MAX_DEFERRED = 1000


class StoreSource:
    """The run store at a path, opened on first use once the file exists.

    :meth:`get` returns None while there is no store file; a store file replaced by another
    (a run directory made again) is reopened. One connection serves every request (the store
    serialises its own use of it). The console never creates the file: audit-log rows of
    the time before it exists (logins while a run is being prepared) are kept by :meth:`defer`
    and written, with the time they happened, once the store appears.
    """

    def __init__(self, path: str | Path) -> None:
        self.given = Path(path)
        self.path = store_file(path)
        self._lock = threading.Lock()
        self._store: RunStore | None = None
        self._identity: tuple[int, int] | None = None
        self._deferred: list[tuple[str, AdminActionKind, str | None, str | None, str | None]] = []
        self._dropped = 0

    def defer(self, admin: str, action: AdminActionKind, target: str | None = None, *, detail: str | None = None,
              client: str | None = None) -> None:
        """Keep an audit-log row until the store exists (at most :data:`MAX_DEFERRED`; later ones are counted)."""
        note = f"before the run store existed, at {now_utc()}"
        with self._lock:
            if len(self._deferred) >= MAX_DEFERRED:
                self._dropped += 1
                return
            self._deferred.append((admin, action, target, f"{detail}; {note}" if detail else note, client))

    def _flush(self, store: RunStore) -> None:
        for admin, action, target, detail, client in self._deferred:
            store.record_action(admin, action, target, detail=detail, client=client)
        if self._dropped:
            logger.warning("%d audit-log rows from before the run store existed were not kept (more than %d)",
                           self._dropped, MAX_DEFERRED)
        self._deferred, self._dropped = [], 0

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if st.st_size > 0 else None

    def get(self) -> RunStore | None:
        """The open store, or None if its file does not exist (yet)."""
        with self._lock:
            identity = self._file_identity()
            if identity is not None and identity == self._identity and self._store is not None:
                return self._store
            if self._store is not None:
                logger.info("run store %s was replaced or removed; reopening", self.path)
                self._store.close()
                self._store, self._identity = None, None
            if identity is None:
                return None
            try:
                self._store = RunStore(self.path, create=False)
            except RunDirError as exc:
                if not self.path.exists():
                    return None
                raise exc
            self._identity = identity
            self._flush(self._store)
            return self._store

    def generation(self) -> tuple[int, int] | None:
        """Which store file is open (device, inode), to tell a replaced store from the same one."""
        with self._lock:
            return self._identity

    def close(self) -> None:
        """Close the store, if open."""
        with self._lock:
            if self._store is not None:
                self._store.close()
            self._store, self._identity = None, None


@dataclass(frozen=True)
class Settings:
    """What ``fedface console serve`` was given (see :func:`fedface.server.console.app.create_app`).

    ``store``: a run store file or a run directory. ``ledger_dir``: the sites' ledger folder for
    the privacy page (default: the privacy report's, the one a run directory's ``ledgers.json``
    names). ``gallery``: an encrypted
    gallery's directory (the gallery page shows only with it). ``session_hours``: how long a
    login lasts. ``https``: the console is served over TLS (Secure cookies).
    """

    store: Path
    admin_dir: Path
    gallery: Path | None = None
    ledger_dir: Path | None = None
    session_hours: float = 8.0
    https: bool = False
    login_limit: int = 5
    login_window_s: float = 300.0
    poll_s: float = 0.5

    @property
    def session_max_age_s(self) -> int:
        """A login's lifetime in whole seconds (at least one)."""
        return max(1, int(self.session_hours * 3600))


__all__ = ["MAX_DEFERRED", "STORE_FILE", "Settings", "StoreSource", "store_file"]
