"""Publisher signatures on fedface's Flower App: what lets a site run only apps it trusts.

A publisher (the coordinator, or whoever releases the federation's app) holds an Ed25519 key
in OpenSSH format; each site lists the publisher public keys it trusts. Two signatures, by the
same key, travel with every run (``fedface server run --publisher-key``):

- **the FAB's**, in Flower's own format: Ed25519 over ``signed_at`` (8 bytes, big-endian) +
  SHA-256 of the FAB's bytes, under the key's :func:`key_id`. The SuperNode checks it itself
  (``flower-supernode --trusted-entities``) before it installs or loads anything of the app.
- **the run config's** (:data:`RUN_SIGNATURE_KEY`): Ed25519 over :func:`canonical_run_config`,
  every run-config key but the signature itself (the scenario's text included). The FAB
  carries the run config as its defaults, but a SuperLink can override any of them when it
  starts a run; fedface's ClientApp refuses a run whose config is not exactly what the
  publisher signed (:func:`verify_run_config`).

Pure crypto on bytes and mappings (``cryptography``); nothing here touches the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedface.common.errors import ConfigError

#: The run-config key holding the publisher's signature of the rest of the run config.
RUN_SIGNATURE_KEY = "publisher-signature"
#: Domain separation: a run-config signature can never be mistaken for a FAB signature.
RUN_CONFIG_CONTEXT = b"fedface run config v1\n"
KEY_ID_PREFIX = "fedface-"


class UntrustedAppError(Exception):
    """A run's app or run config carries no valid signature by a publisher the site trusts."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_private_key() -> ed25519.Ed25519PrivateKey:
    """A fresh publisher key."""
    return ed25519.Ed25519PrivateKey.generate()


def private_key_bytes(key: ed25519.Ed25519PrivateKey) -> bytes:
    """The key as an OpenSSH private key file (what ``flwr app review`` reads too)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())


def public_key_line(key: ed25519.Ed25519PublicKey) -> str:
    """``ssh-ed25519 <base64>``: the form Flower's trusted-entities file maps key ids to."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode("ascii")


def key_id(key: ed25519.Ed25519PublicKey) -> str:
    """The key's id: ``fedface-`` and the first 128 bits of SHA-256 of its raw bytes, in hex.

    It only names the key; a signature is always checked against the trusted key itself."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_ID_PREFIX + hashlib.sha256(raw).hexdigest()[:32]


def load_private_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    """A publisher's private key (OpenSSH Ed25519, from `fedface keys publisher`); ConfigError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"publisher key {p} not found: create one with `fedface keys publisher DIR`")
    try:
        key = serialization.load_ssh_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"publisher key {p} is not an unencrypted OpenSSH private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"publisher key {p} is not an Ed25519 key: create one with `fedface keys publisher DIR`")
    return key


def load_public_key(path: str | Path) -> ed25519.Ed25519PublicKey:
    """A publisher's public key (``ssh-ed25519 ...``, the ``.pub`` file); ConfigError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"trusted publisher key {p} not found: ask the publisher for its .pub file")
    try:
        key = serialization.load_ssh_public_key(p.read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"trusted publisher key {p} is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"trusted publisher key {p} is not an Ed25519 key (ssh-ed25519 ...)")
    return key


def trusted_entities(keys: Iterable[ed25519.Ed25519PublicKey]) -> dict[str, str]:
    """Flower's trusted-entities mapping (key id -> ``ssh-ed25519 ...``) for ``keys``."""
    return {key_id(k): public_key_line(k) for k in keys}


def fab_message(fab: bytes, signed_at: int) -> bytes:
    """What a FAB signature signs, as Flower 1.42 verifies it: ``signed_at`` + SHA-256(fab)."""
    return signed_at.to_bytes(8, byteorder="big") + hashlib.sha256(fab).digest()


def sign_fab(fab: bytes, key: ed25519.Ed25519PrivateKey, *, signed_at: int | None = None) -> dict[str, Any]:
    """One verification record of Flower's format: ``public_key_id``, ``signature``
    (base64url), ``signed_at`` (Unix seconds)."""
    at = int(time.time()) if signed_at is None else int(signed_at)
    return {"public_key_id": key_id(key.public_key()), "signature": _b64url(key.sign(fab_message(fab, at))), "signed_at": at}


def verify_fab(fab: bytes, records: Iterable[Mapping[str, Any]], trusted: Iterable[ed25519.Ed25519PublicKey]) -> str | None:
    """The key id of the first trusted key that signed ``fab`` among ``records``, or None."""
    by_id = {key_id(k): k for k in trusted}
    for record in records:
        key = by_id.get(str(record.get("public_key_id", "")))
        if key is None:
            continue
        try:
            key.verify(_unb64url(str(record["signature"])), fab_message(fab, int(record["signed_at"])))
        except (InvalidSignature, KeyError, ValueError, TypeError, OverflowError):
            continue
        return key_id(key)
    return None


def canonical_run_config(run_config: Mapping[str, Any]) -> bytes:
    """The bytes a run-config signature covers: every key but :data:`RUN_SIGNATURE_KEY`,
    as sorted compact JSON, after :data:`RUN_CONFIG_CONTEXT`."""
    body = {str(k): v for k, v in run_config.items() if k != RUN_SIGNATURE_KEY}
    # allow_nan: an infinite epsilon (a non-private run, which the sites' policy then refuses)
    # is a value a run config may carry; "Infinity" is as canonical as any other float's text
    return RUN_CONFIG_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode("utf-8")


def sign_run_config(run_config: Mapping[str, Any], key: ed25519.Ed25519PrivateKey) -> str:
    """The value of :data:`RUN_SIGNATURE_KEY` for ``run_config``: ``<key id>:<base64url signature>``."""
    return f"{key_id(key.public_key())}:{_b64url(key.sign(canonical_run_config(run_config)))}"


def verify_run_config(run_config: Mapping[str, Any], trusted: Iterable[ed25519.Ed25519PublicKey]) -> str:
    """The id of the trusted key that signed ``run_config``; UntrustedAppError saying why not."""
    value = str(run_config.get(RUN_SIGNATURE_KEY) or "")
    if not value:
        raise UntrustedAppError("app refused: the run is not signed by a publisher (no publisher-signature in its run config)")
    kid, _, sig = value.partition(":")
    key = {key_id(k): k for k in trusted}.get(kid)
    if key is None:
        raise UntrustedAppError(f"app refused: the run is signed by {kid!r}, which is not a publisher this site trusts")
    try:
        key.verify(_unb64url(sig), canonical_run_config(run_config))
    except (InvalidSignature, ValueError):
        raise UntrustedAppError(
            f"app refused: the run config does not match what publisher {kid} signed (altered after signing)"
        ) from None
    return kid


__all__ = [
    "KEY_ID_PREFIX",
    "RUN_CONFIG_CONTEXT",
    "RUN_SIGNATURE_KEY",
    "UntrustedAppError",
    "canonical_run_config",
    "fab_message",
    "key_id",
    "load_private_key",
    "load_public_key",
    "new_private_key",
    "private_key_bytes",
    "public_key_line",
    "sign_fab",
    "sign_run_config",
    "trusted_entities",
    "verify_fab",
    "verify_run_config",
]
