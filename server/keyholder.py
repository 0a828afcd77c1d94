"""The key holder: the only party with the template secret key, run apart from the server.

It decrypts nothing but what the checks and decisions below need, and hands out nothing but
decisions, signed by it and sealed to the site that asked. It answers only the gallery server
(every request is signed with the server's Ed25519 key) and only for envelopes that a
registered site signed, which it verifies itself.

Search (:meth:`KeyHolder.decide`)
    1. The server's signature on the request; the site's signed query (registered site,
       signature, time, a nonce this key holder has never seen, its key set, its own per-site
       query limit, 1 <= top-k <= :data:`MAX_TOP_K`, a well-formed reply key).
    2. The query is one real unit-length template, tiled: the server sends, computed from the
       query ciphertext, the query minus its rotation by ``d`` and the query minus its complex
       conjugate (every slot must decrypt to zero, real and imaginary parts, within
       :data:`CHECK_TOL`), and ``R q`` for a fresh random orthogonal ``R`` it keeps secret
       (real, the same in every tile, of unit norm in float64: a norm from linear values,
       which cannot wrap around the modulus as a sum of squares can). A scaled or mixed query, with which a site could read a template
       back coordinate by coordinate from threshold decisions, is refused before any result is
       decrypted.
    3. It decrypts the protected results ``mask * (score - threshold)``: it learns which slots
       are above the threshold and their order, and the scores up to the unknown mask (an
       integer in [2, 16]) and threshold, not the labels (encrypted under a key sealed to the
       site).
    4. It adds Gaussian noise (sigma :data:`FLOOD_SIGMA`, of the order of the CKKS error; from a
       generator seeded by the OS's CSPRNG) to the decrypted values before deriving anything,
       so that decisions at a tie or at the threshold do not follow the exact values. The
       defence against Li-Micciancio key recovery is that no value ever leaves: only the
       decision does. identify: the top-k slots above the threshold (with the encrypted label
       chunks of those slots), or none; verify: whether any template of the claimed person is
       above the threshold.
    5. It pads the decision to a length that depends only on top-k (a match and no match look
       alike on the wire), seals it to the query's reply key bound to the query's digest, and
       signs the sealed decision with its decision key (in ``templates.pub``, so that the site
       can tell it from one the server made up).

Enrollment (:meth:`KeyHolder.check_enrollment`)
    The server sends, with the site's signed upload, the squared norm minus one of every slot
    of the block and two randomly signed sums of its ciphertexts; the key holder refuses a
    block whose enrolled slots are not unit templates, whose empty slots are not empty, or
    whose sums have an imaginary part (a complex slot could hide a scaled-up real template
    from the norm check). A site cannot enroll a template that would match every query.

Collusion: the key holder and the server together can decrypt everything; the key holder and
a querying site together learn the protected score vectors of that site's queries; the server
and a site together can send the key holder ciphertexts other than scores. docs/templates.md,
"Threat model".
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedface.common.crypto.ckks import MAX_PROTECTED, SLOTS
from fedface.common.crypto.envelope import (
    DECISION_CONTEXT,
    LABEL_BYTES,
    REQUEST_CONTEXT,
    NonceStore,
    label_chunk,
    open_envelope,
    open_signed_frame,
    seal_to,
    unpack_frame,
)
from fedface.common.crypto.keyfiles import TemplateContext
from fedface.common.errors import TemplateError

logger = logging.getLogger(__name__)

#: Noise added to decrypted protected values before a decision, in protected units (mask *
#: score, mask >= 2): at most about 5e-4 in score units.
FLOOD_SIGMA = 2.0**-10
#: How far from zero a query's or an enrollment's check values may decrypt (the CKKS error of a
#: sum of 128 squares is about 1e-4; a query scaled by 1 % already misses it).
CHECK_TOL = 1e-2
MAX_TOP_K = 10


def decide(values: list[np.ndarray], *, top_k: int, candidates: list[tuple[int, int]] | None,
           rng: np.random.Generator, sigma: float = FLOOD_SIGMA) -> dict[str, Any]:
    """The decision from decrypted protected values (one array per block, valid slots only).

    Noise first, then: with ``candidates`` (verify) ``{"match": any candidate > 0}``; else
    (identify) ``{"match": bool, "slots": [[block, slot], ...]}``, the top-k above zero, best first.
    """
    flooded = [v + rng.normal(0.0, sigma, size=v.shape) for v in values]
    if candidates is not None:
        return {"match": bool(any(flooded[b][s] > 0 for b, s in candidates))}
    hits = [(float(v[s]), b, int(s)) for b, v in enumerate(flooded) for s in np.flatnonzero(v > 0)]
    hits.sort(reverse=True)
    return {"match": bool(hits), "slots": [[b, s] for _, b, s in hits[:top_k]]}


def decision_length(kind: str, top_k: int) -> int:
    """The fixed length a decision is padded to: it depends on the kind and top-k only."""
    per_chunk = len(json.dumps([2**31, "0" * 2 * LABEL_BYTES])) + 2
    return 32 if kind == "verify" else 48 + top_k * per_chunk


class KeyHolder:
    """Decides protected search results for registered sites; holds the template secret key."""

    def __init__(
        self,
        directory: str | Path,
        context: TemplateContext,
        site_key: Callable[[str], Ed25519PublicKey | None],
        server_key: Ed25519PublicKey,
        *,
        max_queries_per_hour: int = 1000,
        seed: int | None = None,
    ) -> None:
        if context.keys.secret_key is None or context.decision_key is None:
            raise TemplateError("the key holder needs the template secret key (templates.secret)")
        self.context = context
        self.engine = context.engine()
        self.site_key = site_key
        self.server_key = server_key
        self.max_queries_per_hour = max_queries_per_hour
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.nonces = NonceStore(Path(directory) / "keyholder-nonces.sqlite")
        self._rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.nonces.close()

    def _request(self, data: bytes, kinds: tuple[str, ...]) -> tuple[dict[str, Any], list[bytes], Any]:
        frame = open_signed_frame(self.server_key, data, REQUEST_CONTEXT, "the request to the key holder")
        header, parts = unpack_frame(frame, "key holder request")
        if not parts:
            raise TemplateError("key holder request carries no envelope")
        env = open_envelope(parts[0], self.site_key, self.nonces, kinds=kinds)
        if env.header.get("context") != self.context.id:
            raise TemplateError(f"{env.kind} from {env.site!r} was made under key set {env.header.get('context')!r}, not {self.context.id!r}")
        if header.get("kind") != env.kind:
            raise TemplateError(f"key holder request says {header.get('kind')!r} but the site sent {env.kind!r}")
        return header, parts, env

    def _all_near(self, part: bytes, level: str, count: int | None = None) -> bool:
        """Every slot (complex: real and imaginary part) within CHECK_TOL of 0, or of 0 in the
        first ``count`` slots and of -1 in the rest."""
        values = self.engine.decrypt_complex(self.engine.load(part, level))  # type: ignore[arg-type]
        if count is None:
            return bool(np.all(np.abs(values) <= CHECK_TOL))
        return bool(np.all(np.abs(values[:count]) <= CHECK_TOL) and np.all(np.abs(values[count:] + 1.0) <= CHECK_TOL))

    def _unit_rotated(self, part: bytes) -> bool:
        """``R q`` (the server's secret random rotation of the query): real, the same in every
        tile, and of unit norm, computed in float64 from linear values that cannot wrap."""
        values = self.engine.decrypt_complex(self.engine.load(part, "result"))
        d = self.engine.dim
        tiles = values.real.reshape(SLOTS // d, d)
        mean = tiles.mean(axis=0)
        return bool(np.all(np.abs(values.imag) <= CHECK_TOL) and np.all(np.abs(tiles - mean) <= CHECK_TOL)
                    and abs(float(mean @ mean) - 1.0) <= 2 * CHECK_TOL)

    def check_enrollment(self, data: bytes) -> None:
        """Refuse (TemplateError) an enrollment whose templates are not unit length; None if it is fine."""
        header, parts, env = self._request(data, ("enroll",))
        labels = env.header.get("labels")
        if len(parts) < 3 or not isinstance(labels, list) or not 1 <= len(labels) <= SLOTS:
            raise TemplateError("enrollment check: expected the site's upload, its norms and at least one signed sum")
        real = all(np.all(np.abs(self.engine.decrypt_complex(self.engine.load(p, "gallery")).imag) <= CHECK_TOL) for p in parts[2:])
        if not (real and self._all_near(parts[1], "result", len(labels))):
            raise TemplateError(f"enrollment from {env.site!r} holds templates that are not unit length (or data in empty slots): "
                                "enroll with `fedface site enroll`")

    def decide(self, data: bytes) -> bytes:
        """The signed, sealed decision for one request; TemplateError (nothing released) if refused."""
        header, parts, query = self._request(data, ("identify", "verify"))
        if self.nonces.count_since(query.site, time.time() - 3600) > self.max_queries_per_hour:
            raise TemplateError(f"{query.site!r} asked for more than {self.max_queries_per_hour} decisions in the last hour", "limit")
        top_k = query.header.get("top_k", 1)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
            raise TemplateError(f"top_k must be an integer from 1 to {MAX_TOP_K}")
        try:
            reply = bytes.fromhex(str(query.header.get("reply_key")))
        except ValueError:
            reply = b""
        if len(reply) != 32:
            raise TemplateError("the query's reply key is not a 32-byte X25519 public key")
        identify = query.kind == "identify"
        counts = header.get("counts")
        n_results = len(parts) - 4 - (1 if identify else 0)
        if not isinstance(counts, list) or n_results < 1 or len(counts) != n_results or not all(
                isinstance(c, int) and 1 <= c <= SLOTS for c in counts):
            raise TemplateError("key holder request: block counts do not match its results")
        if not (self._all_near(parts[3], "query") and self._all_near(parts[2], "query") and self._unit_rotated(parts[1])):
            raise TemplateError(f"query from {query.site!r} is not one unit-length template, tiled: nothing was decided")
        values = [self.engine.decrypt(self.engine.load(part, "result"))[:count]
                  for count, part in zip(counts, parts[4 : 4 + n_results], strict=True)]
        if any(np.any(np.abs(v) > MAX_PROTECTED + 1.0) for v in values):
            raise TemplateError(f"query from {query.site!r}: a protected result is out of range: nothing was decided")
        candidates = None
        if not identify:
            raw = header.get("candidates")
            try:
                candidates = [(int(b), int(s)) for b, s in raw]  # type: ignore[union-attr]
            except (TypeError, ValueError):
                raise TemplateError("verify request: malformed candidates") from None
            if not candidates or not all(0 <= b < len(counts) and 0 <= s < counts[b] for b, s in candidates):
                raise TemplateError("verify request: no candidate, or one outside the results")
        with self._lock:
            decision = decide(values, top_k=top_k, candidates=candidates, rng=self._rng)
        if identify:
            table = parts[-1]
            offsets = np.concatenate([[0], np.cumsum(counts)])
            if len(table) != int(offsets[-1]) * LABEL_BYTES:
                raise TemplateError("key holder request: the label table does not match the results")
            decision["chunks"] = [[int(offsets[b] + s), label_chunk(table, int(offsets[b] + s)).hex()] for b, s in decision.pop("slots")]
        text = json.dumps(decision, separators=(",", ":"))
        length = decision_length(query.kind, top_k)
        sealed = seal_to(reply, text.ljust(length).encode(), query.digest)
        logger.info("decision for %s (%s)", query.site, query.kind)
        return self.context.decision_key.sign(DECISION_CONTEXT + query.digest + sealed) + sealed  # type: ignore[union-attr]


__all__ = ["CHECK_TOL", "FLOOD_SIGMA", "MAX_TOP_K", "KeyHolder", "decide", "decision_length"]
