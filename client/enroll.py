"""A site's side of the encrypted gallery: templates, encrypted and signed before they leave.

- :func:`person_templates`: one template per enrolled person, the normalised mean of the
  (test-time augmented) embeddings of that person's images under the federation's encoder.
- :class:`TemplateClient`: encrypts (CKKS, the key holder's public keys), signs (the site's
  Ed25519 key) and frames every upload, revocation and query
  (:mod:`fedface.common.crypto.envelope`), and opens the sealed decision of a query. Nothing
  it produces holds a template or a score in the clear: enrollments carry only ciphertexts
  and pseudonymous person ids, queries one ciphertext and a one-time reply key.

What a site learns from a search is the decision (:class:`Decision`): the matched identities
above the threshold (identify) or whether the claim holds (verify), never a score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedface.common.crypto.ckks import SLOTS, encoder_id
from fedface.common.crypto.envelope import (
    DECISION_CONTEXT,
    LABEL_KEY_CONTEXT,
    decrypt_label,
    envelope_digest,
    make_envelope,
    open_sealed,
    public_bytes,
    reply_key,
)
from fedface.common.crypto.keyfiles import TemplateContext
from fedface.common.errors import TemplateError


@dataclass(frozen=True)
class Encoder:
    """The federation's encoder as a site uses it for templates."""

    module: torch.nn.Module
    id: str
    image_size: tuple[int, int]
    flip_tta: bool
    shift_tta: int
    device: torch.device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> Encoder:
        """The encoder of a checkpoint or run directory (`fedface simulate`'s last round, `fedface train`'s model)."""
        from fedface.common.checkpoint import find_checkpoint, load_checkpoint
        from fedface.common.models import build_encoder
        from fedface.common.training import select_device

        ckpt = load_checkpoint(find_checkpoint(path))
        cfg = ckpt.config
        size = tuple(cfg.data.image_size)
        module = build_encoder(cfg.model, image_size=size)
        module.load_state_dict(ckpt.encoder_state)
        dev = select_device(device)
        module.to(dev).eval()
        return cls(module, encoder_id(ckpt.encoder_state), size, cfg.evaluation.flip_tta, cfg.evaluation.shift_tta, dev)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Unit embeddings (N, D) of preprocessed images (N, H, W) in [0, 1]."""
        from fedface.common.training import embed

        x = torch.from_numpy(np.asarray(images, dtype=np.float32)).unsqueeze(1)
        return embed(self.module, x, device=self.device, flip_tta=self.flip_tta, shift_tta=self.shift_tta).astype(np.float64)


def person_templates(embeddings: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(person ids, unit templates): each person's normalised mean embedding."""
    out_names, out = [], []
    for k, name in enumerate(names):
        rows = embeddings[labels == k]
        if len(rows) == 0:
            continue
        m = rows.mean(axis=0)
        out_names.append(str(name))
        out.append(m / np.linalg.norm(m))
    return out_names, np.asarray(out)


@dataclass(frozen=True)
class Decision:
    """What a search tells the site that asked."""

    match: bool
    identities: tuple[str, ...] = ()  # identify: SITE/PERSON above the threshold, best first


@dataclass(frozen=True)
class PendingQuery:
    """A signed, encrypted query and the one-time key that opens its reply."""

    envelope: bytes
    reply_key: X25519PrivateKey
    kind: str = "identify"

    @property
    def digest(self) -> bytes:
        return envelope_digest(self.envelope)


class TemplateClient:
    """Encrypts, signs and frames a site's template traffic."""

    def __init__(self, site: str, signing_key: Ed25519PrivateKey, context: TemplateContext) -> None:
        self.site = site
        self.key = signing_key
        self.context = context
        self.engine = context.engine()

    def enroll_envelopes(self, people: Sequence[str], templates: np.ndarray, encoder: str) -> list[bytes]:
        """One signed envelope per block of up to 4,096 people."""
        if len(people) != len(templates) or not len(people):
            raise TemplateError(f"{len(people)} person ids for {len(templates)} templates")
        out = []
        for start in range(0, len(people), SLOTS):
            names = list(people[start : start + SLOTS])
            cts = self.engine.encrypt_block(templates[start : start + SLOTS])
            out.append(make_envelope(self.key, "enroll", self.site, cts, labels=names, context=self.context.id,
                                     encoder=encoder, dim=self.context.params.dim))
        return out

    def revoke_envelope(self, people: Sequence[str], *, everyone: bool = False, contexts: Sequence[str] | None = None) -> bytes:
        """Revoke named people (or, with ``everyone``, all) of this site, in every key set or only ``contexts``."""
        fields: dict[str, object] = {"labels": list(people), "all": everyone, "context": self.context.id, "encoder": "*"}
        if contexts is not None:
            fields["contexts"] = list(contexts)
        return make_envelope(self.key, "revoke", self.site, [], **fields)

    def query(self, template: np.ndarray, encoder: str, *, claim: str | None = None, top_k: int = 1) -> PendingQuery:
        """A signed encrypted query: identify (1:N) or, with ``claim`` (SITE/PERSON), verify (1:1)."""
        rk = reply_key()
        fields = {"context": self.context.id, "encoder": encoder, "reply_key": public_bytes(rk).hex(), "top_k": top_k}
        if claim is not None:
            fields["claim"] = claim
        env = make_envelope(self.key, "verify" if claim else "identify", self.site, [self.engine.encrypt_query(template)], **fields)
        return PendingQuery(env, rk, "verify" if claim else "identify")

    def read_decision(self, pending: PendingQuery, signed_decision: bytes, sealed_label_key: bytes = b"") -> Decision:
        """Check the key holder's signature on the decision, open it (and, for identify, the
        server's sealed label key); TemplateError if anything does not verify."""
        digest = pending.digest
        sig, sealed = signed_decision[:64], signed_decision[64:]
        try:
            self.context.decision_verifier().verify(sig, DECISION_CONTEXT + digest + sealed)
        except InvalidSignature:
            raise TemplateError("the search result is not signed by the key holder of this key set: refused (the server may have made it up)") from None
        try:
            decision = json.loads(open_sealed(pending.reply_key, sealed, digest).decode().rstrip(" "))
        except (ValueError, UnicodeDecodeError):
            raise TemplateError("the search result is not a decision") from None
        if not isinstance(decision, dict) or not isinstance(decision.get("match"), bool):
            raise TemplateError("the search result is not a decision")
        if pending.kind == "verify":
            if set(decision) != {"match"}:
                raise TemplateError("the answer to a verify query is not a verify decision")
            return Decision(match=decision["match"])
        chunks = decision.get("chunks")
        if set(decision) != {"match", "chunks"} or not isinstance(chunks, list) or decision["match"] != bool(chunks):
            raise TemplateError("the answer to an identify query is not an identify decision")
        if not chunks:
            return Decision(match=False)
        keyiv = open_sealed(pending.reply_key, sealed_label_key, digest)
        if not keyiv.startswith(LABEL_KEY_CONTEXT) or len(keyiv) != len(LABEL_KEY_CONTEXT) + 48:
            raise TemplateError("the search result's label key is malformed")
        key, iv = keyiv[len(LABEL_KEY_CONTEXT) : -16], keyiv[-16:]
        try:
            names = tuple(decrypt_label(key, iv, int(slot), bytes.fromhex(chunk)) for slot, chunk in chunks)
        except (TypeError, ValueError):
            raise TemplateError("a label in the search result does not decrypt: the result was altered") from None
        return Decision(match=True, identities=names)


__all__ = ["Decision", "Encoder", "PendingQuery", "TemplateClient", "person_templates"]
