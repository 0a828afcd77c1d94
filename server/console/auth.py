"""Who may use the console: the admin file, sessions, CSRF tokens and the login rate limit.

Admin directory (``fedface console init-admin --admin-dir DIR``)
    ``DIR/admin.json``: ``{"user", "hash", "created_at"}``, the password as an argon2id hash
    (argon2-cffi's :class:`~argon2.PasswordHasher` defaults), written atomically with mode 0600.
    ``DIR/session.key``: 32 random bytes (mode 0600) that sign the session cookies; made once
    and kept, so that re-initialising the admin does not change it (delete it to log everyone
    out). Nothing else in the directory is read.
Sessions
    starlette's signed cookie (``fedface_console``, HttpOnly, SameSite=strict, Secure under
    TLS). It holds only the user, the CSRF token and the login time (signed, not encrypted):
    :func:`session_user` refuses a session older than its maximum age even if the cookie is
    still sent.
CSRF
    One random token per session (the login form's is set in the session when the form is
    shown); every POST must carry it as ``csrf_token`` (:func:`csrf_ok`, compared in constant
    time).
Login rate limit
    :class:`LoginLimiter`: after ``limit`` failures within ``window_s`` from one client address
    or for one user name, further attempts are refused (429 with Retry-After) until the oldest
    failure leaves the window.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
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

ADMIN_FILE = "admin.json"
SESSION_KEY_FILE = "session.key"
SESSION_KEY_BYTES = 32
MIN_PASSWORD_LENGTH = 12
SESSION_COOKIE = "fedface_console"
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


def start_session(session: MutableMapping[str, Any], user: str, now: float | None = None) -> None:
    """Log ``user`` in: a new session (fresh CSRF token) holding only the user, the token and the time."""
    session.clear()
    session.update({"user": user, "csrf": new_token(), "login_at": int(time.time() if now is None else now)})


def session_user(session: MutableMapping[str, Any], max_age_s: int, now: float | None = None) -> str | None:
    """The logged-in user, or None (no login, or a login older than ``max_age_s``: then cleared)."""
    user, at = session.get("user"), session.get("login_at")
    if not isinstance(user, str) or not isinstance(at, int):
        return None
    if (time.time() if now is None else now) - at > max_age_s:
        session.clear()
        return None
    return user


# --- login rate limit --------------------------------------------------------------------------


class LoginLimiter:
    """Failed logins per client address and per user name in a sliding window (in memory).

    Parameters
    ----------
    limit
        Failures allowed within the window, per address and per user name.
    window_s
        The window in seconds.
    clock
        Seconds, monotonic (a fake clock in tests).
    """

    def __init__(self, *, limit: int = 5, window_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if not times:
            self._failures.pop(key, None)
        return times

    def retry_after(self, client: str, user: str) -> int | None:
        """Seconds until ``client`` may try ``user`` again, or None if it may now."""
        with self._lock:
            now = self.clock()
            waits = [
                self.window_s - (now - times[0])
                for key in (("client", client), ("user", user))
                if len(times := self._recent(key, now)) >= self.limit
            ]
        return max(1, int(max(waits)) + 1) if waits else None

    def failed(self, client: str, user: str) -> None:
        """Count a failed login of ``user`` from ``client``."""
        with self._lock:
            now = self.clock()
            for key in (("client", client), ("user", user)):
                self._recent(key, now)
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, client: str, user: str) -> None:
        """Forget the failures of ``client`` and of ``user`` (a good login)."""
        with self._lock:
            self._failures.pop(("client", client), None)
            self._failures.pop(("user", user), None)


__all__ = [
    "ADMIN_FILE",
    "MIN_PASSWORD_LENGTH",
    "SESSION_COOKIE",
    "SESSION_KEY_BYTES",
    "SESSION_KEY_FILE",
    "Admin",
    "LoginLimiter",
    "check_new_admin",
    "check_password",
    "check_user",
    "csrf_ok",
    "csrf_token",
    "init_admin",
    "load_admin",
    "load_session_key",
    "new_token",
    "session_user",
    "start_session",
    "verify_password",
]
