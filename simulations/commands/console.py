"""`fedface console`: the administrators' web console (docs/console.md).

``fedface console init-admin --admin-dir DIR`` writes the administrator (an argon2id hash of
the password, never the password) and the key that signs session cookies;
``fedface console serve --store RUN_DIR --admin-dir DIR`` serves the console with uvicorn
(127.0.0.1:8765 by default; TLS with ``--tls-cert`` and ``--tls-key``; ``--allowed-host NAME``
for each name browsers reach it by). The app is :func:`fedface.server.console.app.create_app`.
uvicorn runs without proxy headers: ``X-Forwarded-For`` is never believed, so the audit log's
client address and the login rate limit see the connection's real peer.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedface.common.errors import ConfigError, DataNotFoundError
from fedface.simulations.console import err_console, setup_logging, user_errors

console_app = typer.Typer(
    help="The administrators' web console: runs, rounds, sites, privacy spend, gallery and audit log, live.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

PASSWORD_ENV = "FEDFACE_CONSOLE_PASSWORD"
_ADMIN_DIR_HELP = "The console's admin directory: admin.json (the argon2id hash) and session.key, both mode 0600."
_HOST_NAME = re.compile(r"^(\*\.)?[A-Za-z0-9._-]{1,253}$")


def _password(password_file: Path | None) -> str:
    """The new password: from --password-file (its first line), $FEDFACE_CONSOLE_PASSWORD, or typed twice."""
    if password_file is not None:
        try:
            lines = password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DataNotFoundError(f"cannot read the password file {password_file}: {exc.strerror}") from None
        return lines[0] if lines else ""
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    return str(typer.prompt("Console password", hide_input=True, confirmation_prompt=True))


@console_app.command("init-admin")
def init_admin(
    admin_dir: Annotated[Path, typer.Option(help=_ADMIN_DIR_HELP)],
    user: Annotated[str, typer.Option(help="The administrator's user name.")] = "admin",
    password_file: Annotated[Optional[Path], typer.Option(help="Read the password from the first line of this file "
                                                          f"(else ${PASSWORD_ENV}, else it is asked for twice).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing administrator (the session key stays; every session "
                                        "of the old one ends at its next request).")] = False,
) -> None:
    """Create the console's administrator: the password's argon2id hash in DIR/admin.json, and a
    random session-signing key in DIR/session.key (kept if present). Passwords have at least 12
    characters."""
    setup_logging()
    from fedface.server.console.auth import check_new_admin, check_password, check_user
    from fedface.server.console.auth import init_admin as write_admin

    with user_errors():
        check_user(user)
        if admin_dir.exists() and not admin_dir.is_dir():
            raise ConfigError(f"--admin-dir {admin_dir} is a file: pass a directory (it is created if missing)")
        check_new_admin(admin_dir, force=force)
        password = _password(password_file)
        check_password(password)
        try:
            target = write_admin(admin_dir, user=user, password=password, force=force)
        except OSError as exc:  # e.g. a parent of the directory is a file, or not writable
            raise ConfigError(f"cannot write the console admin to {admin_dir}: {exc.strerror or exc}; pass a writable directory") from None
    err_console.print(f"console admin {user!r} written to {target}; serve the console with "
                      f"`fedface console serve --store RUN_DIR --admin-dir {admin_dir}`", soft_wrap=True, markup=False)


def _allowed_host(name: str) -> str:
    """An --allowed-host value: a DNS name (``*.example.org`` for every subdomain) or an IP address."""
    bare = name.strip().removeprefix("[").removesuffix("]")
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if not _HOST_NAME.match(bare):
        raise ConfigError(f"--allowed-host takes a host name (example.org, *.example.org) or an IP address, without "
                          f"scheme or port, got {name!r}")
    return bare.lower()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_tls(cert: Path, key: Path) -> None:
    """ConfigError unless the key and the certificate load together (swapped, damaged, or a key of another certificate)."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"--tls-cert {cert} and --tls-key {key} do not load as a certificate and its key ({exc.__class__.__name__}: "
            f"{getattr(exc, 'reason', None) or exc}): check they are not swapped and belong together (`fedface keys init`)"
        ) from None


def _check_store(store: Path) -> None:
    """RunDirError when the run store exists but is not one (a wrong --store); a missing one is waited for."""
    from fedface.server.console.sources import store_file
    from fedface.server.store import RunStore

    path = store_file(store)
    if path.exists():
        with RunStore(path, create=False):
            pass


def _check_port(host: str, port: int) -> None:
    """ConfigError when the address cannot be listened on (the port taken, or the address not this machine's)."""
    import socket

    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pass another --port (or --host)") from None


@console_app.command("serve")
def serve(
    store: Annotated[Path, typer.Option(help="The run store: a run directory (its runs.sqlite) or a run-store file. "
                                        "It may not exist yet: the console shows it once it appears.")],
    admin_dir: Annotated[Path, typer.Option(help="The admin directory of `fedface console init-admin`.")],
    gallery: Annotated[Optional[Path], typer.Option(help="An encrypted gallery's directory (--store of `fedface gallery serve`): "
                                                    "the gallery page shows its template counts.")] = None,
    ledger_dir: Annotated[Optional[Path], typer.Option(help="The sites' ledger folder for the privacy page "
                                                       "(default: the one the run directory recorded in ledgers.json).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (keep the loopback default unless TLS is on).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8765,
    tls_cert: Annotated[Optional[Path], typer.Option(help="TLS certificate (server.pem of `fedface keys init`).")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="Its private key (server.key).")] = None,
    session_hours: Annotated[float, typer.Option(help="How long a login lasts, in hours.", min=0.01, max=168)] = 8.0,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        "--allowed-host", help="A name browsers reach the console by (its TLS certificate's host name), without port; "
        "repeatable. Requests naming any other host are refused (400). 127.0.0.1, localhost, ::1 and --host are always "
        "allowed.")] = None,
) -> None:
    """Serve the web console: runs, a run's rounds and charts, sites (suspend / resume), privacy
    spend, the gallery and the audit log, updated live. Nothing but the login page is served
    without logging in. Runs in the foreground."""
    setup_logging()
    import uvicorn

    from fedface.server.console.app import create_app
    from fedface.server.console.sources import Settings

    with user_errors():
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("pass both --tls-cert and --tls-key (from `fedface keys init DIR --host HOST`), or neither")
        tls: dict[str, str] = {}
        if tls_cert is not None and tls_key is not None:
            for f in (tls_cert, tls_key):
                if not f.is_file():
                    raise DataNotFoundError(f"{f} not found: create the certificate with `fedface keys init DIR --host HOST`")
            tls = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)}
        if gallery is not None and not gallery.is_dir():
            raise DataNotFoundError(f"no gallery directory {gallery}: pass the --store directory of `fedface gallery serve`")
        if tls:
            _check_tls(tls_cert, tls_key)  # type: ignore[arg-type]
        _check_store(store)
        names = tuple(_allowed_host(name) for name in allowed_host or ())
        settings = Settings(store=store, admin_dir=admin_dir, gallery=gallery, ledger_dir=ledger_dir,
                            session_hours=session_hours, https=bool(tls), host=host, allowed_hosts=names)
        app = create_app(settings)
        _check_port(host, port)
    if not tls and not _loopback(host):
        err_console.print(f"[yellow]warning: serving on {host} over plain HTTP: passwords and session cookies cross the "
                          "network in the clear; pass --tls-cert and --tls-key[/]", soft_wrap=True)
    if not names and host.strip("[]") in ("0.0.0.0", "::"):
        err_console.print(f"[yellow]warning: listening on {host} but answering only to {', '.join(settings.trusted_hosts)}: "
                          "pass --allowed-host NAME for the name browsers use to reach it[/]", soft_wrap=True)
    scheme = "https" if tls else "http"
    shown = f"[{host.strip('[]')}]" if ":" in host else host  # an IPv6 address in a URL is bracketed
    err_console.print(f"fedface console on {scheme}://{shown}:{port} reading {app.state.source.path}", soft_wrap=True, markup=False)
    # no proxy headers: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1, i.e. from every
    # client of a loopback console, and the audit log's client column and the rate limit would be forged
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=1,
                proxy_headers=False, forwarded_allow_ips="", **tls)  # type: ignore[arg-type]


__all__ = ["console_app", "init_admin", "serve"]
