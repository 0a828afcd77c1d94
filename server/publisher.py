"""fedface's Flower App as its publisher signs and hands it to the SuperLink (`fedface server run`).

Flower 1.42 checks signed apps at the SuperNode (``flower-supernode --trusted-entities``), but
its SuperLink attaches signatures only to apps it fetches from an app hub
(``FLWR_SUPERGRID_API_URL``, Flower's platform by default): a FAB sent straight from
``flwr run`` reaches the sites without any, and a site that trusts publishers refuses it. So
fedface is its own hub, for one app at a time:

1. :func:`build_app` writes the run's whole run config (the scenario's text included) into
   the app's ``[tool.flwr.app.config]`` and signs it (:func:`~fedface.common.signing.sign_run_config`),
   builds the FAB with Flower's own builder and signs the FAB's bytes in Flower's format.
2. :class:`AppHandover` serves that FAB and its signature on ``127.0.0.1:<app-port>`` with the
   two endpoints of the hub API that Flower's SuperLink calls (``POST /v1/hub/fetch-fab``, then
   the FAB's URL), while ``flwr run @fedface/fedface-app==<version>`` starts the run.
3. The SuperLink (started by `fedface server start` with ``FLWR_SUPERGRID_API_URL`` pointing
   at :func:`hub_url`) stores the FAB with its signature and hands both to every SuperNode,
   which verifies them against the site's trusted keys before it installs or runs anything.

The hub is not trusted by anyone: a SuperLink or hub that alters the FAB or the run config
cannot re-sign it.
"""

from __future__ import annotations

import json
import threading
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import tomli_w
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedface.common.errors import ConfigError
from fedface.common.signing import RUN_SIGNATURE_KEY, sign_fab, sign_run_config

HOST = "127.0.0.1"
FETCH_PATH = "/v1/hub/fetch-fab"


def hub_url(port: int) -> str:
    """The ``FLWR_SUPERGRID_API_URL`` of a SuperLink that takes its apps from `fedface server run`."""
    return f"http://{HOST}:{port}/v1"


@dataclass(frozen=True)
class App:
    """One run's FAB (``fab``), its id and version as Flower names them, and its signatures
    (Flower's verification records; empty when unsigned)."""

    fab: bytes
    app_id: str
    version: str
    verifications: tuple[dict[str, Any], ...]

    @property
    def spec(self) -> str:
        """What ``flwr run`` takes to start it from the hub: ``@publisher/name==version``."""
        return f"{self.app_id}=={self.version}"


def app_pyproject(pyproject: str, run_config: Mapping[str, Any], key: ed25519.Ed25519PrivateKey | None) -> str:
    """``pyproject`` (fedface's Flower App) with the run's config values in place of its
    ``[tool.flwr.app.config]`` defaults, and the publisher's signature of the whole config
    (empty without ``key``) under ``publisher-signature``: the run needs no overrides."""
    doc = tomllib.loads(pyproject)
    app = doc.setdefault("tool", {}).setdefault("flwr", {}).setdefault("app", {})
    merged = {**app.get("config", {}), **run_config}
    merged.pop(RUN_SIGNATURE_KEY, None)
    # sign what the sites will read back: the values after one TOML round trip
    config = tomllib.loads(tomli_w.dumps(merged))
    config[RUN_SIGNATURE_KEY] = sign_run_config(config, key) if key is not None else ""
    app["config"] = config
    return tomli_w.dumps(doc)


def build_app(pyproject: str, run_config: Mapping[str, Any], key: ed25519.Ed25519PrivateKey | None) -> App:
    """The run's FAB (Flower's builder, deterministic for the same files), signed with ``key``."""
    from flwr.cli.build import build_fab_from_files

    text = app_pyproject(pyproject, run_config, key)
    try:
        with warnings.catch_warnings():
            # Flower 1.42's builder uses a pathspec pattern style that pathspec 1.x deprecates (not ours)
            warnings.filterwarnings("ignore", message=".*gitwildmatch.*", category=DeprecationWarning)
            fab, _ = build_fab_from_files({"pyproject.toml": text.encode("utf-8")})
    except ValueError as exc:
        raise ConfigError(f"fedface's Flower App does not build: {exc}") from None
    doc = tomllib.loads(text)
    app_id = f"@{doc['tool']['flwr']['app']['publisher']}/{doc['project']['name']}"
    records = (sign_fab(fab, key),) if key is not None else ()
    return App(fab, app_id, str(doc["project"]["version"]), records)


class AppHandover:
    """Serves one :class:`App` to the SuperLink on ``127.0.0.1:port`` as Flower's hub would,
    for as long as the ``with`` block lasts (a thread; the port is closed on exit)."""

    def __init__(self, app: App, port: int) -> None:
        self.app = app
        self.requests: list[str] = []  # what the SuperLink asked for, in order
        try:
            self.server = ThreadingHTTPServer((HOST, port), _handler(app, port, self.requests))
        except OSError as exc:
            raise ConfigError(f"cannot serve the app on {HOST}:{port} ({exc.strerror}): is another `fedface server run` on that --app-port?") from None
        self._thread = threading.Thread(target=self.server.serve_forever, name="fedface-app-handover", daemon=True)

    def __enter__(self) -> AppHandover:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


def _handler(app: App, port: int, log: list[str]) -> type[BaseHTTPRequestHandler]:
    fab_path = f"/v1/fabs/{app.version}.fab"

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                ask = json.loads(body or b"{}")
            except json.JSONDecodeError:
                ask = {}
            log.append(f"POST {self.path} {ask.get('app_id')}=={ask.get('app_version')}")
            if self.path != FETCH_PATH or ask.get("app_id") != app.app_id or ask.get("app_version") not in (None, app.version):
                self._send(404, json.dumps({"detail": f"only {app.spec} is served here"}).encode(), "application/json")
                return
            answer: dict[str, Any] = {"fab_url": f"http://{HOST}:{port}{fab_path}"}
            if app.verifications:
                answer["verifications"] = list(app.verifications)
            self._send(200, json.dumps(answer).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802
            log.append(f"GET {self.path}")
            if self.path == fab_path:
                self._send(200, app.fab, "application/octet-stream")
            else:
                self._send(404, b"not found", "text/plain")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
            pass  # the requests are kept in ``log``; nothing on stderr

    return Handler


__all__ = ["FETCH_PATH", "HOST", "App", "AppHandover", "app_pyproject", "build_app", "hub_url"]
