"""The encrypted gallery over the network: the gallery server's and the key holder's HTTP APIs.

Two FastAPI apps, each served by uvicorn with TLS (`fedface gallery serve`, `fedface keyholder
serve`; plain HTTP only with ``--insecure``, a local demo):

Gallery server (:func:`gallery_app`, wraps :class:`~fedface.server.gallery.Gallery`)
    ``POST /v1/enroll`` and ``POST /v1/revoke``: the body is a site's signed envelope; the
    reply is the gallery's JSON summary (an enrollment is first checked by the key holder's
    ``/v1/check``). ``POST /v1/search``: the body is a signed query; the server scores it under
    encryption, sends its signed request to the key holder's ``/v1/decide``
    (:class:`KeyHolderLink`, which verifies the key holder's certificate against its CA) and
    answers the site with one binary frame, ``pack_frame({"kind": ...}, [signed_decision,
    sealed_label_key])``: both sealed to the site, neither readable by the server, the decision
    signed by the key holder. ``GET /v1/status``: the key set and the enrolled versions with
    their template counts per site (no events, labels or keys: the event log is read at the
    server, `fedface gallery status --store`).
Key holder (:func:`keyholder_app`, wraps :class:`~fedface.server.keyholder.KeyHolder`)
    ``POST /v1/decide``: a request signed by the gallery server's key in, the signed, sealed
    decision out; ``POST /v1/check``: an enrollment's norm check. Requests not signed by the
    server's key (``--server-key``) are refused, so no site can send the key holder ciphertexts
    of its own making.
    ``GET /v1/context``: the public template keys (``templates.pub``). Sites take the public
    keys from the key holder, never from the gallery server: a server that handed out keys of
    its own making could decrypt what the sites then encrypt. The gallery server has no such
    route.

Errors: a refused request (:class:`~fedface.common.errors.TemplateError`) is answered with
JSON ``{"error": "<one line>"}`` and status 403 (unknown site, bad signature, stale or replayed
envelope), 429 (query limit) or 400 (anything else malformed); a body over the route's limit
with 413 before it is read in full; a key holder that cannot be reached with 502. Nothing is
stored or released for a refused request (the gallery's own guarantee).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from fedface.common.crypto.envelope import pack_frame, parse_envelope
from fedface.common.errors import TemplateError
from fedface.server.gallery import Gallery
from fedface.server.keyholder import KeyHolder

logger = logging.getLogger(__name__)

#: The largest envelope a site may send (a full enrollment block is about 17 MB).
MAX_ENVELOPE_BYTES = 64 << 20
#: The largest decision request the key holder reads (about 100 bytes per gallery template).
MAX_FRAME_BYTES = 256 << 20
FRAME_TYPE = "application/vnd.fedface.frame"
_STATUS = {"forbidden": 403, "limit": 429, "invalid": 400}


class KeyHolderUnreachable(Exception):
    """The key holder did not answer, or answered with something other than a decision or a refusal."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def status_for(exc: TemplateError) -> int:
    """The HTTP status of a refusal: 403 (sender), 429 (rate limit) or 400 (content)."""
    return _STATUS[getattr(exc, "reason", "invalid")]


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": _one_line(message)}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (TemplateError "too large") one over ``limit`` bytes before it is read."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


class _TooLarge(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"request body of {size} bytes or more is over the limit of {limit} bytes")


def _guarded(limit: int, work: Callable[[bytes], Any]) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint: read the body (within ``limit``), run ``work`` on it in a worker thread, map refusals."""

    async def endpoint(request: Request) -> Response:
        try:
            body = await read_body(request, limit)
            result = await run_in_threadpool(work, body)
        except _TooLarge as exc:
            return error_response(413, str(exc))
        except TemplateError as exc:
            return error_response(status_for(exc), str(exc))
        except KeyHolderUnreachable as exc:
            return error_response(502, str(exc))
        if isinstance(result, Response):
            return result
        return JSONResponse(result)

    return endpoint


# -- the link from the gallery server to the key holder ------------------------------------


class KeyHolderLink:
    """The gallery server's connection to the key holder's ``/v1/decide`` (an ``httpx.Client``)."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    @classmethod
    def connect(cls, url: str, *, ca: Path | None, insecure: bool = False, timeout_s: float = 60.0) -> KeyHolderLink:
        """A link to the key holder at ``url``: HTTPS verified against ``ca`` (plain HTTP only if ``insecure``).

        Raises
        ------
        TemplateError
            If the URL is not http(s), or is https without a CA, or http without ``insecure``.
        """
        if url.startswith("https://"):
            if ca is None or not Path(ca).is_file():
                raise TemplateError(f"the key holder at {url} is HTTPS: pass --keyholder-ca with the CA that signed its certificate"
                                    + (f" ({ca} not found)" if ca is not None else ""))
            verify: Any = str(ca)
        elif url.startswith("http://"):
            if not insecure:
                raise TemplateError(f"the key holder URL {url} is plain HTTP: use https:// (or --insecure for a local demo)")
            verify = False
        else:
            raise TemplateError(f"the key holder URL {url!r} must start with https:// (or http:// with --insecure)")
        return cls(httpx.Client(base_url=url.rstrip("/"), verify=verify, timeout=timeout_s))

    def decide(self, frame: bytes) -> bytes:
        """The signed, sealed decision; TemplateError if the key holder refused, KeyHolderUnreachable otherwise."""
        return self._post("/v1/decide", frame)

    def check_enrollment(self, frame: bytes) -> None:
        """None if the key holder finds the enrollment's templates unit length; TemplateError if not."""
        self._post("/v1/check", frame)

    def _post(self, path: str, frame: bytes) -> bytes:
        try:
            reply = self.client.post(path, content=frame, headers={"content-type": FRAME_TYPE})
        except httpx.HTTPError as exc:
            raise KeyHolderUnreachable(f"the key holder at {self.client.base_url} did not answer: {_one_line(str(exc)) or type(exc).__name__}") from None
        if reply.status_code == 200:
            return reply.content
        message = _error_of(reply)
        if 400 <= reply.status_code < 500:
            reason = {403: "forbidden", 429: "limit"}.get(reply.status_code, "invalid")
            raise TemplateError(f"the key holder refused: {message}", reason)
        raise KeyHolderUnreachable(f"the key holder at {self.client.base_url} failed (HTTP {reply.status_code}): {message}")

    def context_id(self) -> str:
        """The id of the key set the key holder serves (``GET /v1/context``)."""
        try:
            reply = self.client.get("/v1/context")
        except httpx.HTTPError as exc:
            raise KeyHolderUnreachable(f"the key holder at {self.client.base_url} did not answer: {_one_line(str(exc)) or type(exc).__name__}") from None
        if reply.status_code != 200:
            raise KeyHolderUnreachable(f"the key holder at {self.client.base_url} did not serve its keys (HTTP {reply.status_code})")
        return reply.headers.get("x-fedface-context", "")

    def close(self) -> None:
        self.client.close()


def _error_of(reply: httpx.Response) -> str:
    """The one-line error of a refusal reply (our JSON, or the start of whatever else came)."""
    try:
        body = reply.json()
    except ValueError:
        return _one_line(reply.text[:200]) or f"HTTP {reply.status_code}"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return _one_line(body["error"])
    return _one_line(str(body)[:200])


# -- the apps ----------------------------------------------------------------------------------


def gallery_app(gallery: Gallery) -> FastAPI:
    """The gallery server's API (module docstring) over ``gallery`` (which reaches its key holder itself)."""
    app = FastAPI(title="fedface gallery", docs_url=None, redoc_url=None, openapi_url=None)

    def search(body: bytes) -> Response:
        result = gallery.search(body)
        site, kind = _peek(body)
        logger.info("%s for %s: %d templates in %d blocks", kind, site, result.slots, result.blocks)
        return Response(pack_frame({"kind": kind}, [result.sealed_decision, result.sealed_label_key]), media_type=FRAME_TYPE)

    app.add_api_route("/v1/enroll", _guarded(MAX_ENVELOPE_BYTES, gallery.enroll), methods=["POST"])
    app.add_api_route("/v1/revoke", _guarded(MAX_ENVELOPE_BYTES, gallery.revoke), methods=["POST"])
    app.add_api_route("/v1/search", _guarded(MAX_ENVELOPE_BYTES, search), methods=["POST"])

    def status() -> dict[str, Any]:
        return {
            "service": "gallery",
            "context": gallery.context.id,
            "dim": gallery.context.params.dim,
            "templates": gallery.template_count(),
            "versions": gallery.versions(),
        }

    app.add_api_route("/v1/status", status, methods=["GET"])
    return app


def _peek(body: bytes) -> tuple[str, str]:
    """(site, kind) of an envelope the gallery has already verified."""
    header = json.loads(parse_envelope(body)[0])
    return str(header["site"]), str(header["kind"])


def keyholder_app(keyholder: KeyHolder) -> FastAPI:
    """The key holder's API: ``POST /v1/decide`` and ``GET /v1/context`` (its public keys)."""
    app = FastAPI(title="fedface key holder", docs_url=None, redoc_url=None, openapi_url=None)
    bundle = keyholder.context.public_bundle()
    context = keyholder.context.id

    def decide(body: bytes) -> Response:
        return Response(keyholder.decide(body), media_type="application/octet-stream")

    app.add_api_route("/v1/decide", _guarded(MAX_FRAME_BYTES, decide), methods=["POST"])

    def check(body: bytes) -> dict[str, Any]:
        keyholder.check_enrollment(body)
        return {"ok": True}

    app.add_api_route("/v1/check", _guarded(MAX_FRAME_BYTES, check), methods=["POST"])

    def public_keys() -> Response:
        return Response(bundle, media_type="application/octet-stream", headers={"x-fedface-context": context})

    def status() -> dict[str, Any]:
        return {"service": "keyholder", "context": context, "dim": keyholder.context.params.dim}

    app.add_api_route("/v1/context", public_keys, methods=["GET"])
    app.add_api_route("/v1/status", status, methods=["GET"])
    return app


__all__ = [
    "FRAME_TYPE",
    "MAX_ENVELOPE_BYTES",
    "MAX_FRAME_BYTES",
    "KeyHolderLink",
    "KeyHolderUnreachable",
    "error_response",
    "gallery_app",
    "keyholder_app",
    "read_body",
    "status_for",
]
