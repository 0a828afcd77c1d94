"""Who may use the console: the admin file, sessions, CSRF tokens and the login rate limit.

Admin directory (``fedface console init-admin --admin-dir DIR``)
    ``DIR/admin.json``: ``{"user", "hash", "created_at"}``, the password as an argon2id hash
    (argon2-cffi's :class:`~argon2.PasswordHasher` defaults), written atomically with mode 0600.
    ``DIR/session.key``: 32 random bytes (mode 0600) that sign the session cookies; made once
    and kept, so that re-initialising the admin does not change it. Nothing else in the
    directory is read. :class:`AdminFile` re-reads ``admin.json`` whenever it changes.
Sessions
    :class:`Sessions`, kept by the server in memory (the console is one process: a restart ends
    every session). A login gets a random session id; starlette's signed cookie
    (``fedface_console``, HttpOnly, SameSite=strict, Secure under TLS) holds only that id and
    the session's CSRF token. A session ends at logout (its id is forgotten, so a copy of the
    cookie is worth nothing), at its maximum age, and as soon as ``admin.json`` no longer holds
    the administrator it was opened for: each session is bound to :func:`admin_fingerprint`
    (an HMAC of the admin's user, hash and creation time), checked on every request, so
    ``init-admin --force`` ends every session of the replaced administrator.
CSRF
    One random token per session (the login form's is set in the session when the form is
    shown); every POST must carry it as ``csrf_token`` (:func:`csrf_ok`, compared in constant
    time).
Login rate limit
    :class:`LoginLimiter`, in memory, over a sliding window (default 5 minutes). Each attempt is
    counted before its password is checked (:meth:`~LoginLimiter.reserve`; a right password
    takes it back), so parallel guesses cannot slip past the count. Limits: ``limit`` (5)
    failures for one user name from one address, and ``address_limit`` (20) from one address
    over every user name, refuse further attempts (429 with Retry-After) until the oldest
    failure leaves the window. Over ``user_limit`` (50) failures for one user name from all
    addresses together only slow down: an address that has itself failed for that name waits
    ``user_backoff_s`` (10 s) after its last failure; an address with no failure for it is not
    held, so the administrator's right password from another address still logs in. An IPv6
    address counts by its /64 network. At most ``max_keys`` (10,000) addresses, names and
    pairs are tracked (expired ones are swept); an attempt that would track more is refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from fedface.common.errors import ConfigError, KeyFileError
from fedface.common.io import atomic_write_new

logger = logging.getLogger(__name__)

ADMIN_FILE = "admin.json"
SESSION_KEY_FILE = "session.key"
SESSION_KEY_BYTES = 32
MIN_PASSWORD_LENGTH = 12
SESSION_COOKIE = "fedface_console"
#: Sessions kept at most (beyond it the oldest login ends).
MAX_SESSIONS = 1000
#: Addresses, user names and address/user pairs the login limiter tracks at most.
MAX_LIMITER_KEYS = 10_000
_INIT_HINT = "run `fedface console init-admin --admin-dir {dir}` first"


@dataclass(frozen=True)
class Admin:
    """The console's administrator as stored in ``admin.json`` (the hash is never shown)."""

    user: str
    hash: str
    created_at: str


def _replace_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 from the first byte, replacing it:
    a complete private file under a fresh name, then renamed over ``path``."""
    fresh = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
    atomic_write_new(fresh, data, 0o600)
    try:
        os.replace(fresh, path)
    except BaseException:
        fresh.unlink(missing_ok=True)
        raise


def check_password(password: str) -> None:
    """ConfigError unless the password is long enough to stand an offline guess."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(f"the console password must have at least {MIN_PASSWORD_LENGTH} characters, got {len(password)}")
    if not password.strip():
        raise ConfigError("the console password cannot be only spaces: choose a passphrase of words")


def check_user(user: str) -> None:
    """ConfigError unless the user name is printable, without spaces, 1 to 64 characters."""
    if not 1 <= len(user) <= 64 or not user.isprintable() or any(c.isspace() for c in user):
        raise ConfigError(f"the console user name must be 1 to 64 printable characters without spaces, got {user!r}")


def check_new_admin(admin_dir: str | Path, *, force: bool = False) -> None:
    """ConfigError if ``admin_dir`` already holds an administrator and ``force`` is false."""
    target = Path(admin_dir) / ADMIN_FILE
    if target.exists() and not force:
        raise ConfigError(f"{target} already holds the console admin; pass --force to replace it")


def init_admin(
    admin_dir: str | Path, *, user: str, password: str, force: bool = False, hasher: PasswordHasher | None = None
) -> Path:
    """Write ``admin.json`` (argon2id hash) and, if missing, ``session.key`` in ``admin_dir``.

    Parameters
    ----------
    admin_dir
        The console's admin directory (created with mode 0700).
    user, password
        The administrator; the password must have at least :data:`MIN_PASSWORD_LENGTH`
        characters. Only its hash is written.
    force
        Replace an existing administrator (the session key stays).
    hasher
        The argon2 hasher; default argon2-cffi's defaults (argon2id). A cheaper one is for
        tests only.

    Returns
    -------
    Path
        The admin file written.

    Raises
    ------
    ConfigError
        On a short password, a bad user name, or an existing admin without ``force``.
    """
    check_user(user)
    check_password(password)
    check_new_admin(admin_dir, force=force)
    directory = Path(admin_dir)
    target = directory / ADMIN_FILE
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    digest = (hasher or PasswordHasher()).hash(password)
    record = {"user": user, "hash": digest, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    _replace_private(target, (json.dumps(record, indent=2) + "\n").encode())
    atomic_write_new(directory / SESSION_KEY_FILE, secrets.token_bytes(SESSION_KEY_BYTES), 0o600)  # kept if present
    return target


def load_admin(admin_dir: str | Path) -> Admin:
    """The administrator of ``admin_dir``; KeyFileError (naming init-admin) if missing or malformed."""
    path = Path(admin_dir) / ADMIN_FILE
    hint = _INIT_HINT.format(dir=admin_dir)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyFileError(f"no console admin at {path}: {hint}") from None
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the console admin {path} ({exc}): {hint} (--force replaces it)") from None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) for k in ("user", "hash", "created_at")):
        raise KeyFileError(f"{path} is not a console admin file (user, hash, created_at): {hint} (--force replaces it)")
    if not raw["hash"].startswith("$argon2id$"):
        raise KeyFileError(f"{path} holds no argon2id hash: {hint} (--force replaces it)")
    return Admin(raw["user"], raw["hash"], raw["created_at"])


def load_session_key(admin_dir: str | Path) -> bytes:
    """The session-signing key of ``admin_dir``; KeyFileError if missing or not 32 bytes."""
    path = Path(admin_dir) / SESSION_KEY_FILE
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the console session key {path} ({exc.strerror}): {_INIT_HINT.format(dir=admin_dir)}") from None
    if len(key) != SESSION_KEY_BYTES:
        raise KeyFileError(f"{path} must hold {SESSION_KEY_BYTES} bytes, found {len(key)}: delete it and run init-admin again")
    return key


def verify_password(admin: Admin, user: str, password: str) -> bool:
    """Whether ``user``/``password`` are the admin's. The hash is always checked (~0.2 s with
    the defaults), also for a wrong user name, so the time taken does not tell which was wrong."""
    try:
        good = PasswordHasher().verify(admin.hash, password)
    except (VerificationError, InvalidHashError):
        good = False
    return hmac.compare_digest(user.encode(), admin.user.encode()) and good


# --- sessions and CSRF -------------------------------------------------------------------------


def admin_fingerprint(admin: Admin, key: bytes) -> str:
    """Which administrator a session was opened for: an HMAC-SHA256 (keyed with the session
    key) of ``admin.json``'s user, hash and creation time. Replacing the admin changes it."""
    message = json.dumps([admin.user, admin.hash, admin.created_at]).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class AdminFile:
    """The administrator of an admin directory as ``admin.json`` holds it now: re-read whenever
    the file changes (another inode, size or modification time), kept in memory otherwise.

    Parameters
    ----------
    admin_dir
        The admin directory.
    key
        The session key (:func:`load_session_key`) that keys :func:`admin_fingerprint`.
    """

    def __init__(self, admin_dir: str | Path, key: bytes) -> None:
        self.admin_dir = Path(admin_dir)
        self._key = key
        self._lock = threading.Lock()
        self._cached: tuple[tuple[int, int, int, int], Admin, str] | None = None

    def _signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.admin_dir / ADMIN_FILE)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def current(self) -> tuple[Admin, str]:
        """The administrator now and its :func:`admin_fingerprint`; KeyFileError if
        ``admin.json`` is missing or malformed."""
        signature = self._signature()
        with self._lock:
            if self._cached is not None and signature is not None and self._cached[0] == signature:
                return self._cached[1], self._cached[2]
            admin = load_admin(self.admin_dir)
            fingerprint = admin_fingerprint(admin, self._key)
            if signature is not None:
                self._cached = (signature, admin, fingerprint)
            return admin, fingerprint

    def load(self) -> Admin:
        """The administrator now; KeyFileError if ``admin.json`` is missing or malformed."""
        return self.current()[0]

    def fingerprint(self) -> str | None:
        """The administrator's :func:`admin_fingerprint` now, or None (logged) if ``admin.json``
        cannot be read: then no session is valid until it can."""
        try:
            return self.current()[1]
        except KeyFileError as exc:
            logger.error("console: no session is valid while the admin file cannot be read: %s", exc)
            return None


def new_token() -> str:
    """A fresh CSRF token (32 random bytes, URL-safe)."""
    return secrets.token_urlsafe(32)


def csrf_token(session: MutableMapping[str, Any]) -> str:
    """The session's CSRF token, made on first use (the login form's pre-session token)."""
    token = session.get("csrf")
    if not isinstance(token, str) or not token:
        token = session["csrf"] = new_token()
    return token


def csrf_ok(session: MutableMapping[str, Any], sent: object) -> bool:
    """Whether ``sent`` is the session's CSRF token (constant-time comparison)."""
    token = session.get("csrf")
    return isinstance(token, str) and bool(token) and isinstance(sent, str) and hmac.compare_digest(sent.encode(), token.encode())


@dataclass(frozen=True)
class Session:
    """A logged-in session as the server keeps it (the cookie holds only ``sid`` and the CSRF token).

    ``admin`` is the :func:`admin_fingerprint` of the administrator it was opened for;
    ``login_at`` and ``expires_at`` are ``time.time()`` values."""

    sid: str
    user: str
    admin: str
    login_at: float
    expires_at: float


class Sessions:
    """The console's logged-in sessions, in memory (one process; a restart ends them all).

    Parameters
    ----------
    max_age_s
        How long a login lasts.
    limit
        Sessions kept at most; a login beyond it ends the oldest one.
    clock
        Seconds since the epoch (default :func:`time.time`, looked up at each call).
    """

    def __init__(self, *, max_age_s: float, limit: int = MAX_SESSIONS, clock: Callable[[], float] | None = None) -> None:
        self.max_age_s, self.limit = max_age_s, limit
        self._clock = clock
        self._live: dict[str, Session] = {}
        self._lock = threading.Lock()

    def _now(self) -> float:
        return self._clock() if self._clock is not None else time.time()

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def start(self, cookie: MutableMapping[str, Any], user: str, admin: str) -> Session:
        """Log ``user`` in for the administrator ``admin`` (a fingerprint): a new session id and a
        fresh CSRF token in ``cookie`` (nothing else is kept there). The cookie's earlier
        session, if any, ends; expired sessions are swept."""
        now = self._now()
        session = Session(secrets.token_urlsafe(32), user, admin, now, now + self.max_age_s)
        earlier = cookie.get("sid")
        with self._lock:
            if isinstance(earlier, str):
                self._live.pop(earlier, None)
            for sid in [sid for sid, s in self._live.items() if s.expires_at <= now]:
                del self._live[sid]
            while len(self._live) >= self.limit:
                del self._live[min(self._live.values(), key=lambda s: s.login_at).sid]
            self._live[session.sid] = session
        cookie.clear()
        cookie.update({"sid": session.sid, "csrf": new_token()})
        return session

    def _valid(self, sid: object, admin: str | None) -> Session | None:
        if not isinstance(sid, str) or admin is None:
            return None
        with self._lock:
            session = self._live.get(sid)
            if session is None:
                return None
            if session.expires_at <= self._now() or not hmac.compare_digest(session.admin, admin):
                del self._live[sid]
                return None
            return session

    def current(self, cookie: MutableMapping[str, Any], admin: str | None) -> Session | None:
        """The live session the cookie names, or None: no session id, one that ended (logout,
        expiry, a restart), or one opened for another administrator than ``admin`` (the
        fingerprint now; None while the admin file cannot be read). A cookie naming a session
        that ended is cleared."""
        session = self._valid(cookie.get("sid"), admin)
        if session is None and "sid" in cookie and admin is not None:
            cookie.clear()
        return session

    def alive(self, sid: str, admin: str | None) -> bool:
        """Whether session ``sid`` is still live for the administrator ``admin`` (the feed asks
        before each poll)."""
        return self._valid(sid, admin) is not None

    def end(self, cookie: MutableMapping[str, Any]) -> None:
        """Log out: forget the cookie's session (every copy of the cookie stops working) and clear it."""
        sid = cookie.get("sid")
        with self._lock:
            if isinstance(sid, str):
                self._live.pop(sid, None)
        cookie.clear()


# --- login rate limit --------------------------------------------------------------------------


def address_key(client: str) -> str:
    """The address a client's failures count against: an IPv6 address's /64 network (one
    host commonly holds all of it), an IPv4-mapped one as IPv4, anything else as given."""
    try:
        ip = ipaddress.ip_address(client.strip("[]"))
    except ValueError:
        return client
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass(frozen=True)
class Reservation:
    """A login attempt counted as a failure before its password is checked (:meth:`LoginLimiter.reserve`)."""

    address: str
    user: str
    at: float


_Key = tuple[str, ...]


class LoginLimiter:
    """Login failures per address and user name, per address, and per user name, in a sliding
    window, in memory (the policy: the module docstring).

    Parameters
    ----------
    limit
        Failures allowed for one user name from one address within the window.
    window_s
        The window in seconds.
    address_limit
        Failures allowed from one address (over every user name) within the window.
    user_limit
        Failures for one user name (from every address) within the window after which an
        address that has failed for it waits ``user_backoff_s`` after its last failure.
    user_backoff_s
        That wait, in seconds.
    max_keys
        Addresses, user names and pairs tracked at most; an attempt that needs more is refused.
    clock
        Seconds, monotonic (a fake clock in tests).
    """

    def __init__(
        self,
        *,
        limit: int = 5,
        window_s: float = 300.0,
        address_limit: int = 20,
        user_limit: int = 50,
        user_backoff_s: float = 10.0,
        max_keys: int = MAX_LIMITER_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self.address_limit, self.user_limit, self.user_backoff_s = address_limit, user_limit, user_backoff_s
        self.max_keys = max_keys
        self._failures: dict[_Key, deque[float]] = {}
        self._lock = threading.Lock()
        self._swept_at = -math.inf
        self._next_expiry = math.inf

    def __len__(self) -> int:
        """How many addresses, user names and pairs are tracked now."""
        with self._lock:
            return len(self._failures)

    def _maxlen(self, key: _Key) -> int:
        return {"pair": self.limit, "address": self.address_limit}.get(key[0], self.user_limit)

    def _recent(self, key: _Key, now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if not times:
            self._failures.pop(key, None)
        return times

    def _sweep(self, now: float) -> None:
        """Forget every key whose failures all left the window (at most once a second, or
        when the table is full and a key may have expired)."""
        full = len(self._failures) >= self.max_keys
        if now - self._swept_at < 1.0 and not (full and now >= self._next_expiry):
            return
        self._swept_at, self._next_expiry = now, math.inf
        for key in list(self._failures):
            times = self._recent(key, now)
            if times:
                self._next_expiry = min(self._next_expiry, times[-1] + self.window_s)

    def reserve(self, client: str, user: str) -> Reservation | int:
        """Count an attempt of ``user`` from ``client`` as a failure before its password is
        checked; or, when it is limited, count nothing and return the seconds to wait."""
        with self._lock:
            now = self.clock()
            self._sweep(now)
            address = address_key(client)
            keys: tuple[_Key, _Key, _Key] = (("pair", address, user), ("address", address), ("user", user))
            pair, per_address, per_user = (self._recent(key, now) for key in keys)
            waits = [self.window_s - (now - times[0]) for times, limit in ((pair, self.limit), (per_address, self.address_limit))
                     if len(times) >= limit]
            if len(per_user) >= self.user_limit and pair and now - pair[-1] < self.user_backoff_s:
                waits.append(self.user_backoff_s - (now - pair[-1]))
            new = sum(key not in self._failures for key in keys)
            if new and len(self._failures) + new > self.max_keys:
                waits.append(max(1.0, self._next_expiry - now) if math.isfinite(self._next_expiry) else self.window_s)
            if waits:
                return max(1, int(max(waits)) + 1)
            for key in keys:
                self._failures.setdefault(key, deque(maxlen=self._maxlen(key))).append(now)
            return Reservation(address, user, now)

    def _take_back(self, reservation: Reservation, *, forget_pair: bool) -> None:
        keys: list[_Key] = [("pair", reservation.address, reservation.user), ("address", reservation.address),
                            ("user", reservation.user)]
        with self._lock:
            for key in keys:
                times = self._failures.get(key)
                if times is None:
                    continue
                if forget_pair and key[0] == "pair":
                    times.clear()
                elif reservation.at in times:
                    times.remove(reservation.at)
                if not times:
                    del self._failures[key]

    def succeeded(self, reservation: Reservation) -> None:
        """The password was right: the attempt is no failure, and the address's failures for
        that user name are forgotten."""
        self._take_back(reservation, forget_pair=True)

    def cancel(self, reservation: Reservation) -> None:
        """The password could not be checked (no admin file): the attempt is not counted."""
        self._take_back(reservation, forget_pair=False)


__all__ = [
    "ADMIN_FILE",
    "MAX_LIMITER_KEYS",
    "MAX_SESSIONS",
    "MIN_PASSWORD_LENGTH",
    "SESSION_COOKIE",
    "SESSION_KEY_BYTES",
    "SESSION_KEY_FILE",
    "Admin",
    "AdminFile",
    "LoginLimiter",
    "Reservation",
    "Session",
    "Sessions",
    "address_key",
    "admin_fingerprint",
    "check_new_admin",
    "check_password",
    "check_user",
    "csrf_ok",
    "csrf_token",
    "init_admin",
    "load_admin",
    "load_session_key",
    "new_token",
    "verify_password",
]
