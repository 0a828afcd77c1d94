"""The key holder: the only party with the template secret key, run apart from the server.

It decrypts nothing but *protected* search results, and hands out nothing but decisions,
sealed to the site that asked. For each :class:`~fedface.server.gallery.DecisionRequest`:

1. It verifies the site's signed query itself (registered site, signature, time, a nonce it has
   never seen, its own key set), so neither the server nor anyone else can ask it for
   decisions on queries no site made, or replay one; it keeps its own per-site query limit.
2. It decrypts the protected results ``mask * (score - threshold)``: it learns which slots are
   above the threshold and their order, not the scores (the server's mask and threshold are
   unknown to it), and it cannot read the labels (encrypted under a key sealed to the site).
3. It **floods** the decrypted values with Gaussian noise (sigma :data:`FLOOD_SIGMA`, in the
   protected units, far above the CKKS error) before anything is derived from them
   (Li-Micciancio: exact decrypted CKKS values together with the ciphertext reveal the secret
   key), and it never hands out a value, only:
   identify: the top-k slots above the threshold (the label chunks of those slots), or none;
   verify: whether any template of the claimed person is above the threshold.
4. It seals that decision to the query's reply key, bound to the query's digest.

Collusion: the key holder and the server together can decrypt everything; the key holder and
a querying site together learn the protected score vectors of that site's queries (enough, over
many chosen queries, to estimate templates). docs/templates.md, "Threat model".
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedface.common.crypto.envelope import NonceStore, label_chunk, open_envelope, seal_to, unpack_frame
from fedface.common.crypto.keyfiles import TemplateContext
from fedface.common.errors import TemplateError

logger = logging.getLogger(__name__)

#: Flooding noise, in protected units (mask * score, mask >= 2): about 5e-4 in score units at
#: most, 3x the measured CKKS error (max 1.6e-4) and far below any useful decision margin.
FLOOD_SIGMA = 2.0**-10
SLOTS_PER_BLOCK = 4096


def decide(values: list[np.ndarray], *, top_k: int, candidates: list[tuple[int, int]] | None,
           rng: np.random.Generator, sigma: float = FLOOD_SIGMA) -> dict[str, Any]:
    """The decision from decrypted protected values (one array per block, valid slots only).

    Flooding first, then: with ``candidates`` (verify) ``{"match": any candidate > 0}``; else
    (identify) ``{"match": bool, "slots": [[block, slot], ...]}``, the top-k above zero, best first.
    """
    flooded = [v + rng.normal(0.0, sigma, size=v.shape) for v in values]
    if candidates is not None:
        return {"match": bool(any(flooded[b][s] > 0 for b, s in candidates))}
    hits = [(float(v[s]), b, int(s)) for b, v in enumerate(flooded) for s in np.flatnonzero(v > 0)]
    hits.sort(reverse=True)
    return {"match": bool(hits), "slots": [[b, s] for _, b, s in hits[:top_k]]}


class KeyHolder:
    """Decides protected search results for registered sites; holds the template secret key."""

    def __init__(
        self,
        directory: str | Path,
        context: TemplateContext,
        site_key: Callable[[str], Ed25519PublicKey | None],
        *,
        max_queries_per_hour: int = 1000,
        seed: int | None = None,
    ) -> None:
        if context.keys.secret_key is None:
            raise TemplateError("the key holder needs the template secret key (templates.secret)")
        self.context = context
        self.engine = context.engine()
        self.site_key = site_key
        self.max_queries_per_hour = max_queries_per_hour
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.nonces = NonceStore(Path(directory) / "keyholder-nonces.sqlite")
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.nonces.close()

    def decide(self, frame: bytes) -> bytes:
        """The sealed decision for one request frame; TemplateError (nothing released) if refused."""
        header, parts = unpack_frame(frame, "decision request")
        if not parts:
            raise TemplateError("decision request carries no query")
        query = open_envelope(parts[0], self.site_key, self.nonces, kinds=("identify", "verify"))
        if query.header.get("context") != self.context.id:
            raise TemplateError(f"query from {query.site!r} was made under key set {query.header.get('context')!r}, not {self.context.id!r}")
        if self.nonces.count_since(query.site, time.time() - 3600) > self.max_queries_per_hour:
            raise TemplateError(f"{query.site!r} asked for more than {self.max_queries_per_hour} decisions in the last hour", "limit")
        if header.get("kind") != query.kind:
            raise TemplateError(f"decision request says {header.get('kind')!r} but the site asked for {query.kind!r}")
        counts = header.get("counts")
        top_k = query.header.get("top_k", 1)
        identify = query.kind == "identify"
        n_results = len(parts) - 1 - (1 if identify else 0)
        if not isinstance(counts, list) or len(counts) != n_results or not all(isinstance(c, int) and 1 <= c <= SLOTS_PER_BLOCK for c in counts):
            raise TemplateError("decision request: block counts do not match its results")
        values = []
        for count, part in zip(counts, parts[1 : 1 + n_results], strict=True):
            values.append(self.engine.decrypt(self.engine.load(part, "result"))[:count])
        candidates = None
        if not identify:
            raw = header.get("candidates")
            if not isinstance(raw, list) or not raw:
                raise TemplateError("verify request names no candidate templates")
            try:
                candidates = [(int(b), int(s)) for b, s in raw]
            except (TypeError, ValueError):
                raise TemplateError("verify request: malformed candidates") from None
            if not all(0 <= b < len(counts) and 0 <= s < counts[b] for b, s in candidates):
                raise TemplateError("verify request: a candidate is outside the results")
        with self._lock:
            decision = decide(values, top_k=int(top_k), candidates=candidates, rng=self._rng)
        if identify:
            table = parts[-1]
            offsets = np.concatenate([[0], np.cumsum(counts)])
            decision["chunks"] = [(int(offsets[b] + s), label_chunk(table, int(offsets[b] + s)).hex()) for b, s in decision.pop("slots")]
        logger.info("decision for %s (%s): %s", query.site, query.kind, "match" if decision["match"] else "no match")
        return seal_to(bytes.fromhex(query.header["reply_key"]), json.dumps(decision).encode(), query.digest)


__all__ = ["FLOOD_SIGMA", "KeyHolder", "decide"]
