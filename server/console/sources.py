"""Where the console reads from: the run store (opened when it appears, reopened when replaced),
and what ``fedface console serve`` was given (:class:`Settings`)."""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
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
#: Who the row counting the audit-log rows not kept names as its admin.
CONSOLE_ADMIN = "(console)"

_Row = tuple[str, AdminActionKind, str | None, str | None, str | None]


class StoreSource:
    """The run store at a path, opened on first use once the file exists.

    :meth:`get` returns None while there is no store file; a store file replaced by another
    (a run directory made again) is reopened. One connection serves every request (the store
    serialises its own use of it). The console never creates the file: audit-log rows of
    the time before it exists (logins while a run is being prepared), or while it cannot be
    read, are kept by :meth:`defer` and written, with the time they happened, once a readable
    store is there. The first :data:`MAX_DEFERRED` rows are kept; later ones are counted, and
    one more row (admin :data:`CONSOLE_ADMIN`, the action most of them were) says how many of
    each action were not kept.
    """

    def __init__(self, path: str | Path) -> None:
        self.given = Path(path)
        self.path = store_file(path)
        self._lock = threading.Lock()
        self._store: RunStore | None = None
        self._identity: tuple[int, int] | None = None
        self._deferred: list[_Row] = []
        self._dropped: Counter[AdminActionKind] = Counter()
        self._dropped_since: str | None = None

    def defer(self, admin: str, action: AdminActionKind, target: str | None = None, *, detail: str | None = None,
              client: str | None = None, why: str = "before the run store existed") -> None:
        """Keep an audit-log row until a readable store is there (``why`` goes into its detail,
        with the time); beyond :data:`MAX_DEFERRED` rows only the count per action is kept."""
        at = now_utc()
        note = f"{why}, at {at}"
        with self._lock:
            if len(self._deferred) >= MAX_DEFERRED:
                self._dropped[action] += 1
                self._dropped_since = self._dropped_since or at
                return
            self._deferred.append((admin, action, target, f"{detail}; {note}" if detail else note, client))

    def deferred(self) -> tuple[int, int]:
        """How many audit-log rows wait for the store: kept, and counted only."""
        with self._lock:
            return len(self._deferred), sum(self._dropped.values())

    def _flush(self, store: RunStore) -> None:
        while self._deferred:  # one at a time: a write that fails leaves the rest (and only them) for next time
            admin, action, target, detail, client = self._deferred[0]
            store.record_action(admin, action, target, detail=detail, client=client)
            self._deferred.pop(0)
        if self._dropped:
            total = sum(self._dropped.values())
            counts = ", ".join(f"{action} \u00d7{n}" for action, n in self._dropped.most_common())
            detail = (f"{total} more audit-log rows from before the run store could be written were not kept "
                      f"(only the first {MAX_DEFERRED} were), from {self._dropped_since} on: {counts}")
            logger.warning("console: %s", detail)
            store.record_action(CONSOLE_ADMIN, self._dropped.most_common(1)[0][0], None, detail=detail)
        self._dropped, self._dropped_since = Counter(), None

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


#: Host names the console always answers to (besides ``Settings.host``).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def host_name(text: str) -> str:
    """A host as the Host check compares it: lower case, an IPv6 address without brackets."""
    return text.strip().lower().removeprefix("[").removesuffix("]")


@dataclass(frozen=True)
class Settings:
    """What ``fedface console serve`` was given (see :func:`fedface.server.console.app.create_app`).

    ``store``: a run store file or a run directory. ``ledger_dir``: the sites' ledger folder for
    the privacy page (default: the privacy report's, the one a run directory's ``ledgers.json``
    names). ``gallery``: an encrypted
    gallery's directory (the gallery page shows only with it). ``session_hours``: how long a
    login lasts. ``https``: the console is served over TLS (Secure cookies). ``host``: the
    address it listens on; with ``allowed_hosts`` (``--allowed-host``: the names browsers use
    to reach it) and :data:`LOOPBACK_HOSTS`, the only Host headers answered
    (:attr:`trusted_hosts`). ``login_*``: the login rate limit
    (:class:`~fedface.server.console.auth.LoginLimiter`).
    """

    store: Path
    admin_dir: Path
    gallery: Path | None = None
    ledger_dir: Path | None = None
    session_hours: float = 8.0
    https: bool = False
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    login_limit: int = 5
    login_window_s: float = 300.0
    login_address_limit: int = 20
    login_user_limit: int = 50
    login_user_backoff_s: float = 10.0
    poll_s: float = 0.5

    @property
    def session_max_age_s(self) -> int:
        """A login's lifetime in whole seconds (at least one)."""
        return max(1, int(self.session_hours * 3600))

    @property
    def trusted_hosts(self) -> tuple[str, ...]:
        """The Host header names answered (each once, as :func:`host_name` writes them)."""
        return tuple(dict.fromkeys(host_name(h) for h in (self.host, *LOOPBACK_HOSTS, *self.allowed_hosts)))


__all__ = ["CONSOLE_ADMIN", "LOOPBACK_HOSTS", "MAX_DEFERRED", "STORE_FILE", "Settings", "StoreSource", "host_name", "store_file"]
