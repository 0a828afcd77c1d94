"""The encrypted gallery: templates stored and searched under encryption, at the server.

The server holds the public template keys (parameters, public, relinearisation and Galois
keys), never the secret key: it can store, add and multiply ciphertexts, and can read none.

Storage (``gallery.sqlite``, beside the run store)
    ``blocks``: one row per enrolled block (up to 4,096 templates of one site): the site, the
    key set (``context``) and encoder version (``encoder``) it was made under, its labels (the
    site's pseudonymous person ids) and its ciphertexts. ``events``: an append-only log of
    every request, accepted or refused, with the reason (refusals of the sender at most once a
    minute per claimed site). Replay protection keeps its nonces in ``gallery-nonces.sqlite``
    (:class:`~fedface.common.crypto.envelope.NonceStore`). ``secure_delete`` is on, so a
    revoked block's bytes are overwritten, not just unlinked. Every change is one transaction:
    a refused or failed upload leaves the gallery exactly as it was, and searchable.

Versions
    A query names its key set and encoder; it is searched against the blocks enrolled under
    exactly those, so a template of one encoder is never compared with another's. Re-enrolling
    under a new encoder (or after a key rotation) makes a new version beside the old one.

Enrollment (:meth:`Gallery.enroll`)
    The upload is verified (site, signature, time, nonce, key set, dimension, every ciphertext's
    parameters, level and scale, no person enrolled twice under one encoder); the server computes
    each slot's squared norm under encryption and the key holder checks that every enrolled
    slot holds a unit template and every other slot nothing; then one transaction stores it.

Search (:meth:`Gallery.search`)
    The query envelope is verified (site, signature, time, nonce, key set, query limit, top-k),
    the query is rotated once, and the checks that it is one unit template, tiled, are computed
    under encryption; each block of the version is scored homomorphically, and each result is
    *protected*: ``mask * (score - threshold)`` with a fresh random mask per query
    (:meth:`~fedface.common.crypto.ckks.TemplateEngine.protect`). The labels of every slot are
    encrypted under a fresh key of the query, and that key is sealed to the querying site. The
    key holder gets, signed by the server's key, the site's signed query, the checks, the
    protected results and the encrypted labels; it can read neither a template, nor a score's
    scale or offset, nor a label, and the server cannot read the decision it relays, nor make
    one up (the key holder signs it).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import seal
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedface.common.crypto.ckks import MAX_MASK, SLOTS, TemplateEngine
from fedface.common.crypto.envelope import (
    LABEL_KEY_CONTEXT,
    REQUEST_CONTEXT,
    Envelope,
    NonceStore,
    encrypt_labels,
    open_envelope,
    pack_frame,
    pack_labels,
    peek_site,
    seal_to,
    sign_frame,
)
from fedface.common.crypto.keyfiles import TemplateContext
from fedface.common.errors import TemplateError
from fedface.server.keyholder import MAX_TOP_K

logger = logging.getLogger(__name__)

GALLERY_FILE = "gallery.sqlite"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    context TEXT NOT NULL,
    encoder TEXT NOT NULL,
    count INTEGER NOT NULL,
    labels TEXT NOT NULL,
    ciphertexts BLOB NOT NULL,
    sizes TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS blocks_version ON blocks (context, encoder);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS events_append_only_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the gallery event log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_append_only_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the gallery event log is append-only'); END;
"""


@dataclass
class _Block:
    id: int
    site: str
    labels: list[str]
    cts: list[seal.Ciphertext] = field(repr=False)


class KeyHolderPort(Protocol):
    """How the gallery reaches the key holder: in process (:class:`~fedface.server.keyholder.KeyHolder`)
    or over HTTP (:class:`~fedface.server.services.KeyHolderLink`). Requests are signed by the server."""

    def check_enrollment(self, data: bytes) -> None: ...

    def decide(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class SearchResult:
    """What goes back to the site for one query: two sealed parts only it can open."""

    sealed_decision: bytes  # signed by the key holder, sealed to the site's reply key
    sealed_label_key: bytes  # identify: the label table's key, sealed to the site by the server
    blocks: int
    slots: int
    request_bytes: int  # the size of the request the key holder got
    server_s: float
    keyholder_s: float


class Gallery:
    """An encrypted gallery in ``directory``; sites' public keys come from ``site_key``."""

    def __init__(
        self,
        directory: str | Path,
        context: TemplateContext,
        site_key: Callable[[str], Ed25519PublicKey | None],
        *,
        keyholder: KeyHolderPort,
        signing_key: Ed25519PrivateKey,
        threshold: float,
        max_queries_per_hour: int = 1000,
    ) -> None:
        if not -1.0 < threshold < 1.0:
            raise TemplateError(f"threshold {threshold} must be a cosine between -1 and 1")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / GALLERY_FILE
        self.context = context
        if context.keys.secret_key is not None:
            raise TemplateError("the gallery server must not hold the template secret key: give it templates.pub only")
        self.engine: TemplateEngine = context.engine()
        self.site_key = site_key
        self.keyholder = keyholder
        self._signing_key = signing_key
        self.threshold = float(threshold)
        self.max_queries_per_hour = max_queries_per_hour
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA secure_delete=ON")
        self._conn.executescript(_SCHEMA)
        self.nonces = NonceStore(self.dir / "gallery-nonces.sqlite")
        self._lock = threading.RLock()
        self._cache: dict[tuple[str, str], list[_Block]] = {}
        self._labels: dict[tuple[str, str], bytes] = {}  # packed label table of a version's blocks
        self._unverified: dict[str, tuple[float, int]] = {}

    def close(self) -> None:
        self._conn.close()
        self.nonces.close()

    # -- bookkeeping -----------------------------------------------------------------------

    def record(self, site: str, kind: str, outcome: str, detail: str) -> None:
        """Append one event to the gallery's log (site names cut to 64 characters, details to 500)."""
        with self._lock:
            self._conn.execute("INSERT INTO events (time, site, kind, outcome, detail) VALUES (?, ?, ?, ?, ?)",
                               (time.time(), site[:64], kind[:32], outcome[:32], detail[:500]))

    def _refused(self, site: str, kind: str, exc: TemplateError) -> None:
        """Log a refusal. Refusals of who sent a request (unknown site, bad signature, stale,
        replay) need no key to cause, so they are logged at most once a minute per claimed site,
        with a count: nobody can fill the append-only log by sending junk."""
        detail = str(exc)
        if exc.reason == "forbidden":
            now = time.time()
            if len(self._unverified) > 10_000:
                self._unverified.clear()
            start, n = self._unverified.get(site[:64], (0.0, 0))
            if now - start < 60.0:
                self._unverified[site[:64]] = (start, n + 1)
                return
            self._unverified[site[:64]] = (now, 0)
            if n:
                detail += f" (and {n} more refusals like it in the minute before)"
        self.record(site, kind, "refused", detail)

    def _open(self, data: bytes, kinds: tuple[str, ...]) -> Envelope:
        """Verify an envelope; every refusal is logged before it is raised."""
        try:
            claimed = peek_site(data)
        except TemplateError as exc:
            self._refused("?", "/".join(kinds), exc)
            raise
        try:
            env = open_envelope(data, self.site_key, self.nonces, kinds=kinds)
            if env.header.get("context") != self.context.id:
                raise TemplateError(
                    f"{env.kind} from {env.site!r} was made under template key set {env.header.get('context')!r}, but this "
                    f"gallery uses {self.context.id!r}: fetch the current templates.pub and re-enroll"
                )
            if not isinstance(env.header.get("encoder"), str) or not env.header["encoder"]:
                raise TemplateError(f"{env.kind} from {env.site!r} names no encoder version")
        except TemplateError as exc:
            self._refused(claimed, "/".join(kinds), exc)
            raise
        return env

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest events, newest first."""
        with self._lock:
            return _events(self._conn, limit)

    def versions(self) -> list[dict[str, Any]]:
        """Enrolled (context, encoder) versions with their sites and template counts."""
        with self._lock:
            return _versions(self._conn)

    def template_count(self, encoder: str | None = None) -> int:
        q = "SELECT COALESCE(SUM(count), 0) FROM blocks WHERE context = ?" + (" AND encoder = ?" if encoder else "")
        with self._lock:
            return int(self._conn.execute(q, (self.context.id, encoder) if encoder else (self.context.id,)).fetchone()[0])

    # -- enrollment and revocation ---------------------------------------------------------

    def enroll(self, data: bytes) -> dict[str, Any]:
        """Store one signed block of a site's encrypted templates; TemplateError (nothing stored) if refused."""
        with self._lock:
            env = self._open(data, ("enroll",))
            try:
                labels = env.header.get("labels")
                if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels) or len(labels) > SLOTS:
                    raise TemplateError(f"enroll from {env.site!r}: labels must be a list of 1 to {SLOTS} person ids")
                if len(set(labels)) != len(labels):
                    raise TemplateError(f"enroll from {env.site!r} names a person twice")
                pack_labels([f"{env.site}/{x}" for x in labels])  # checks each fits a label slot
                if env.header.get("dim") != self.context.params.dim or len(env.parts) != self.engine.dim:
                    raise TemplateError(f"enroll from {env.site!r} has dimension {env.header.get('dim')} and {len(env.parts)} "
                                        f"ciphertexts; this gallery's parameters need {self.context.params.dim} and {self.engine.dim}")
                block = [self.engine.load(part, "gallery") for part in env.parts]  # parameters, level and scale of each
                taken = self._enrolled_labels(env.site, self.context.id, env.header["encoder"]) & set(labels)
                if taken:
                    raise TemplateError(f"enroll from {env.site!r}: {', '.join(sorted(taken)[:5])} already enrolled under this encoder; "
                                        "revoke them first (`fedface site revoke`)")
                # the key holder checks every enrolled slot holds a real unit template, every other slot nothing
                signs = [[1 if secrets.randbits(1) else -1 for _ in range(self.engine.dim)] for _ in range(2)]
                checks = [c.to_string() for c in self.engine.block_checks(block, signs)]
                self.keyholder.check_enrollment(self._sign({"kind": "enroll"}, [data, *checks]))
            except TemplateError as exc:
                self._refused(env.site, "enroll", exc)
                raise
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(
                    "INSERT INTO blocks (site, context, encoder, count, labels, ciphertexts, sizes, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (env.site, self.context.id, env.header["encoder"], len(labels), json.dumps(labels), b"".join(env.parts),
                     json.dumps([len(p) for p in env.parts]), time.time()),
                )
                self.record(env.site, "enroll", "accepted", f"block {cur.lastrowid}: {len(labels)} templates, encoder {env.header['encoder']}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._cache.pop((self.context.id, env.header["encoder"]), None)
            return {"block": cur.lastrowid, "templates": len(labels), "encoder": env.header["encoder"], "context": self.context.id}

    def _enrolled_labels(self, site: str, context: str, encoder: str) -> set[str]:
        rows = self._conn.execute("SELECT labels FROM blocks WHERE site = ? AND context = ? AND encoder = ?", (site, context, encoder))
        return {x for (labels,) in rows for x in json.loads(labels)}

    def revoke(self, data: bytes) -> dict[str, Any]:
        """Delete every block of the site holding a named person (every version, or those of the
        key sets the envelope names in ``contexts``); reports who else was in them."""
        with self._lock:
            env = self._open(data, ("revoke",))
            labels = env.header.get("labels")
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or (not labels and not env.header.get("all")):
                self.record(env.site, "revoke", "refused", "no labels")
                raise TemplateError(f"revoke from {env.site!r} names nobody: pass the person ids, or revoke all")
            contexts = env.header.get("contexts")
            if contexts is not None and (not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts)):
                self.record(env.site, "revoke", "refused", "malformed contexts")
                raise TemplateError(f"revoke from {env.site!r}: contexts must be a list of key-set ids")
            wanted = set(labels)
            rows = [r for r in self._conn.execute("SELECT id, labels, context, encoder FROM blocks WHERE site = ?", (env.site,))
                    if contexts is None or r[2] in contexts]
            hit = [(bid, json.loads(lab), ctx, enc) for bid, lab, ctx, enc in rows if env.header.get("all") or wanted & set(json.loads(lab))]
            revoked = sorted({x for _, lab, _, _ in hit for x in lab if env.header.get("all") or x in wanted})
            dropped = sorted({x for _, lab, _, _ in hit for x in lab} - set(revoked))
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for bid, _, _, _ in hit:
                    self._conn.execute("DELETE FROM blocks WHERE id = ?", (bid,))
                self.record(env.site, "revoke", "accepted", f"{len(hit)} blocks deleted: {len(revoked)} revoked, {len(dropped)} to re-enroll")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            for _, _, ctx, enc in hit:
                self._cache.pop((ctx, enc), None)
            # secure_delete overwrote the pages; the checkpoint moves them out of the WAL too
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return {"blocks": len(hit), "revoked": revoked, "re_enroll": dropped, "unknown": sorted(wanted - set(revoked))}

    # -- search ----------------------------------------------------------------------------

    def _blocks(self, encoder: str) -> list[_Block]:
        key = (self.context.id, encoder)
        if key not in self._cache:
            rows = self._conn.execute("SELECT id, site, labels, ciphertexts, sizes FROM blocks WHERE context = ? AND encoder = ? ORDER BY id", key)
            blocks = []
            for bid, site, labels, blob, sizes in rows:
                cts, pos = [], 0
                for size in json.loads(sizes):
                    cts.append(self.engine.load(blob[pos : pos + size], "gallery"))
                    pos += size
                blocks.append(_Block(bid, site, json.loads(labels), cts))
            self._cache[key] = blocks
            self._labels[key] = pack_labels([f"{b.site}/{x}" for b in blocks for x in b.labels])
        return self._cache[key]

    def preload(self, encoder: str) -> int:
        """Load a version's ciphertexts into memory (the first search does it otherwise); its template count."""
        with self._lock:
            return sum(len(b.labels) for b in self._blocks(encoder))

    def _sign(self, header: dict[str, Any], parts: list[bytes]) -> bytes:
        return sign_frame(self._signing_key, pack_frame(header, parts), REQUEST_CONTEXT)

    def search(self, data: bytes) -> SearchResult:
        """Score a signed query (identify: 1:N; verify: 1:1 against a claimed person) under
        encryption and have the key holder decide; TemplateError if either refuses."""
        with self._lock:
            t0 = time.perf_counter()
            env = self._open(data, ("identify", "verify"))
            try:
                since = time.time() - 3600
                if self.nonces.count_since(env.site, since) > self.max_queries_per_hour:
                    raise TemplateError(f"{env.site!r} sent more than {self.max_queries_per_hour} queries in the last hour: "
                                        "the gallery limits queries so that decisions cannot be mined; try later", "limit")
                if len(env.parts) != 1 or not isinstance(env.header.get("reply_key"), str) or not _is_hex(env.header["reply_key"]):
                    raise TemplateError(f"{env.kind} from {env.site!r} must carry one query ciphertext and a reply key")
                top_k = env.header.get("top_k", 1)
                if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
                    raise TemplateError(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
                query = self.engine.load(env.parts[0], "query")
                blocks = self._blocks(env.header["encoder"])
                if not blocks:
                    raise TemplateError(f"nobody is enrolled under encoder {env.header['encoder']} and key set {self.context.id}: "
                                        "enroll with this encoder first (`fedface site enroll`)")
                if env.kind == "verify":
                    claim = env.header.get("claim")
                    if not isinstance(claim, str) or "/" not in claim:
                        raise TemplateError("verify needs a claimed identity as SITE/PERSON")
                    site, _, person = claim.partition("/")
                    candidates = [(i, b.labels.index(person)) for i, b in enumerate(blocks) if b.site == site and person in b.labels]
                    if not candidates:
                        raise TemplateError(f"{claim} is not enrolled under encoder {env.header['encoder']}")
                    searched = sorted({i for i, _ in candidates})
                else:
                    candidates, searched = [], list(range(len(blocks)))
            except TemplateError as exc:
                self._refused(env.site, env.kind, exc)
                raise
            mask = 2 + secrets.randbelow(MAX_MASK - 1)  # in [2, MAX_MASK]
            rotations = self.engine.rotations(query)
            tiling, imag = self.engine.query_checks(query, rotations)
            # a fresh secret random orthogonal matrix: the key holder reads the query's norm from R q, not its direction
            gauss = np.random.default_rng(secrets.randbits(128)).standard_normal((self.engine.dim, self.engine.dim))
            norm = self.engine.rotated_query(rotations, np.linalg.qr(gauss)[0])
            results = [self.engine.protect(self.engine.score_block(rotations, blocks[i].cts), mask, self.threshold).to_string() for i in searched]
            counts = [len(blocks[i].labels) for i in searched]
            header: dict[str, Any] = {"kind": env.kind, "counts": counts}
            parts = [data, norm.to_string(), tiling.to_string(), imag.to_string(), *results]
            sealed_key = b""
            if env.kind == "verify":
                index = {b: n for n, b in enumerate(searched)}
                header["candidates"] = [[index[b], s] for b, s in candidates]
            else:
                label_key, iv, table = encrypt_labels(self._labels[(self.context.id, env.header["encoder"])])
                parts.append(table)
                sealed_key = seal_to(bytes.fromhex(env.header["reply_key"]), LABEL_KEY_CONTEXT + label_key + iv, env.digest)
            request = self._sign(header, parts)
            t1 = time.perf_counter()
            try:
                sealed = self.keyholder.decide(request)
            except TemplateError as exc:
                self.record(env.site, env.kind, "refused", f"by the key holder: {exc}")
                raise
            t2 = time.perf_counter()
            self.record(env.site, env.kind, "decided", f"{sum(counts)} templates in {len(searched)} blocks")
            return SearchResult(sealed, sealed_key, len(searched), sum(counts), len(request), t1 - t0, t2 - t1)


def _events(conn: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT time, site, kind, outcome, detail FROM events ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    return [dict(zip(("time", "site", "kind", "outcome", "detail"), r, strict=True)) for r in rows]


def _versions(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT context, encoder, site, COUNT(*), SUM(count) FROM blocks GROUP BY context, encoder, site ORDER BY context, encoder, site"
    ).fetchall()
    return [dict(zip(("context", "encoder", "site", "blocks", "templates"), r, strict=True)) for r in rows]


def read_status(directory: str | Path, events: int = 20) -> dict[str, Any]:
    """Template counts per version and site, and the latest events, of a gallery on disk
    (read-only; no keys needed). TemplateError if ``directory`` holds no gallery."""
    path = Path(directory) / GALLERY_FILE
    if not path.is_file():
        raise TemplateError(f"no gallery at {path}: pass the --store directory of `fedface gallery serve`")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        versions, recent = _versions(conn), _events(conn, events)
    except sqlite3.DatabaseError as exc:
        raise TemplateError(f"{path} is not a fedface gallery ({exc})") from None
    finally:
        conn.close()
    return {"templates": sum(int(v["templates"]) for v in versions), "versions": versions, "events": recent}


def _is_hex(text: str) -> bool:
    try:
        return len(bytes.fromhex(text)) == 32
    except ValueError:
        return False


__all__ = ["GALLERY_FILE", "Gallery", "KeyHolderPort", "SearchResult", "read_status"]
