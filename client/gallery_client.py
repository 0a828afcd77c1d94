"""A site's HTTP client of the encrypted gallery (`fedface site enroll / revoke / identify / verify`).

It sends what :class:`~fedface.client.enroll.TemplateClient` made (signed envelopes holding
only ciphertexts and pseudonymous person ids) to the gallery server of
:mod:`fedface.server.services`, verifying the server's TLS certificate against the
federation's CA, and opens the sealed decisions it gets back. Every envelope is written to the
site's wire log first, when one is configured (:func:`fedface.client.wire_log.log_envelope`:
header fields and part sizes, never a part), so a site can see for itself what it sent.

The public template keys come from the key holder (:func:`fetch_public_keys`, its
``GET /v1/context``), never from the gallery server.

Every refusal, and a server that cannot be reached, is one :class:`TemplateError` line.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fedface.client.enroll import Decision, TemplateClient
from fedface.client.wire_log import log_envelope
from fedface.common.crypto.envelope import unpack_frame
from fedface.common.crypto.keyfiles import TemplateContext, load_template_context
from fedface.common.errors import KeyFileError, TemplateError

#: Seconds to wait for a reply (an enrollment block of 4,096 people is about 17 MB).
TIMEOUT_S = 120.0


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _verify(url: str, root_certificates: Path | None, insecure: bool, what: str) -> Any:
    """httpx's ``verify`` for ``url``: the CA file for https, nothing for http (only if ``insecure``)."""
    if url.startswith("https://"):
        if root_certificates is None:
            raise TemplateError(f"{what} {url} is HTTPS: set root-certificates (the federation's ca.pem) in [templates]")
        if not Path(root_certificates).is_file():
            raise TemplateError(f"root certificates {root_certificates} not found: it is the ca.pem of `fedface keys init`")
        return str(root_certificates)
    if url.startswith("http://"):
        if not insecure:
            raise TemplateError(f"{what} {url} is plain HTTP: use https://, or pass --insecure for a local demo")
        return False
    raise TemplateError(f"{what} URL {url!r} must start with https:// (or http:// with --insecure)")


def _refusal(reply: httpx.Response, what: str) -> TemplateError:
    try:
        body = reply.json()
        message = body["error"] if isinstance(body, dict) and isinstance(body.get("error"), str) else str(body)[:200]
    except ValueError:
        message = reply.text[:200] or reply.reason_phrase
    return TemplateError(f"{what} refused (HTTP {reply.status_code}): {_one_line(message)}")


class GalleryClient:
    """Posts a site's envelopes to the gallery server and reads its replies.

    Parameters
    ----------
    url : str
        The gallery server, ``https://HOST:PORT`` (``http://`` only with ``insecure``).
    templates : TemplateClient
        Encrypts and signs as this site.
    root_certificates : Path or None
        The CA the server's certificate must chain to (required for https).
    wire_log : Path or None
        Append every envelope sent to this site wire log.
    insecure : bool, default False
        Allow plain HTTP (a local demo only).
    client : httpx.Client or None
        An existing client (tests pass Starlette's TestClient); ``url`` is then its base.
    """

    def __init__(
        self,
        url: str,
        templates: TemplateClient,
        *,
        root_certificates: Path | None = None,
        wire_log: Path | None = None,
        insecure: bool = False,
        client: httpx.Client | None = None,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.url = url.rstrip("/")
        self.templates = templates
        self.wire_log = wire_log
        if client is None:
            client = httpx.Client(base_url=self.url, verify=_verify(self.url, root_certificates, insecure, "the gallery"), timeout=timeout_s)
        self.http = client

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> GalleryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, route: str, envelope: bytes) -> httpx.Response:
        if self.wire_log is not None:
            log_envelope(self.wire_log, self.templates.site, envelope)
        try:
            reply = self.http.post(route, content=envelope, headers={"content-type": "application/octet-stream"})
        except httpx.HTTPError as exc:
            raise TemplateError(f"the gallery at {self.url} did not answer {route}: {_one_line(str(exc)) or type(exc).__name__}") from None
        if reply.status_code != 200:
            raise _refusal(reply, f"the gallery at {self.url}")
        return reply

    def enroll(self, people: Sequence[str], templates: np.ndarray, encoder: str) -> list[dict[str, Any]]:
        """Enroll unit templates of ``people`` (one envelope per block); the server's summary per block."""
        return [self._post("/v1/enroll", env).json() for env in self.templates.enroll_envelopes(people, templates, encoder)]

    def revoke(self, people: Sequence[str], *, everyone: bool = False, contexts: Sequence[str] | None = None) -> dict[str, Any]:
        """Delete every block holding one of ``people`` (or all of this site's; in every key set or
        only ``contexts``): who was revoked, who must re-enroll."""
        envelope = self.templates.revoke_envelope(people, everyone=everyone, contexts=contexts)
        result: dict[str, Any] = self._post("/v1/revoke", envelope).json()
        return result

    def _search(self, template: np.ndarray, encoder: str, *, claim: str | None, top_k: int) -> Decision:
        pending = self.templates.query(template, encoder, claim=claim, top_k=top_k)
        reply = self._post("/v1/search", pending.envelope)
        _, parts = unpack_frame(reply.content, "search reply")
        if len(parts) != 2:
            raise TemplateError("the gallery's search reply does not hold a sealed decision and label key")
        return self.templates.read_decision(pending, parts[0], parts[1])

    def identify(self, template: np.ndarray, encoder: str, *, top_k: int = 1) -> Decision:
        """1:N: the (up to ``top_k``) enrolled identities above the gallery's threshold, best first."""
        return self._search(template, encoder, claim=None, top_k=top_k)

    def verify(self, template: np.ndarray, encoder: str, claim: str) -> Decision:
        """1:1: whether ``template`` matches the enrolled person ``claim`` (SITE/PERSON)."""
        return self._search(template, encoder, claim=claim, top_k=1)

    def status(self) -> dict[str, Any]:
        try:
            reply = self.http.get("/v1/status")
        except httpx.HTTPError as exc:
            raise TemplateError(f"the gallery at {self.url} did not answer: {_one_line(str(exc)) or type(exc).__name__}") from None
        if reply.status_code != 200:
            raise _refusal(reply, f"the gallery at {self.url}")
        result: dict[str, Any] = reply.json()
        return result


def fetch_public_keys(
    keyholder: str,
    target: Path,
    *,
    root_certificates: Path | None = None,
    insecure: bool = False,
    expect: str | None = None,
    client: httpx.Client | None = None,
) -> TemplateContext:
    """Fetch the key holder's public template keys (``GET /v1/context``) into ``target``.

    The bundle is checked (it must load, and name ``expect`` if given: the context id the key
    holder printed, compared out of band) before it is written atomically. An existing file
    holding another key set is never replaced: remove it first, after re-checking the id.

    Raises
    ------
    TemplateError
        If the key holder cannot be reached or refuses.
    KeyFileError
        If the bundle is not a template key set, is not ``expect``, or ``target`` holds another set.
    """
    url = keyholder.rstrip("/")
    http = client or httpx.Client(base_url=url, verify=_verify(url, root_certificates, insecure, "the key holder"), timeout=TIMEOUT_S)
    try:
        reply = http.get("/v1/context")
    except httpx.HTTPError as exc:
        raise TemplateError(f"the key holder at {url} did not answer: {_one_line(str(exc)) or type(exc).__name__}") from None
    finally:
        if client is None:
            http.close()
    if reply.status_code != 200:
        raise _refusal(reply, f"the key holder at {url}")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(reply.content)
        context = load_template_context(tmp)
        if expect is not None and context.id != expect:
            raise KeyFileError(f"the key holder at {url} serves key set {context.id}, not {expect}: do not use it; ask the key holder")
        if target.exists():
            current = load_template_context(target)
            if current.id != context.id:
                raise KeyFileError(f"{target} holds key set {current.id}, the key holder serves {context.id}: "
                                   "remove the old file to switch (then re-enroll)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return context


__all__ = ["TIMEOUT_S", "GalleryClient", "fetch_public_keys"]
