"""Key files at rest: a site's Ed25519 signing key and the template encryption keys.

Every private key is written once, atomically, with mode 0600 from the start
(:func:`~fedface.common.io.atomic_write_new`), and never overwritten; configs hold the paths,
never key material. A passphrase is optional: given (``FEDFACE_KEY_PASSPHRASE``, or the
``passphrase`` argument), the signing key is a PKCS#8 file encrypted by ``cryptography``'s best
available scheme and the template secret key is sealed with scrypt (n=2^15, r=8, p=1) and
AES-256-GCM. A locked key without its passphrase, or with a wrong one, is a one-line
:class:`~fedface.common.errors.KeyFileError`.

Template keys (made by the key holder, ``fedface keys templates``)
    ``templates.pub``: the *public bundle* (parameters, public key, relinearisation key, three
    Galois keys, and the public half of the key holder's Ed25519 decision-signing key) that the
    server and every site get; its :func:`context_id` names the key set in every upload and
    query. ``templates.secret``: the CKKS secret key and the decision-signing key; it stays with
    the key holder. Rotation (:func:`rotate_template_keys`) moves both into ``retired/<context-id>/``
    and makes a new set; sites then re-enroll (see docs/templates.md, "Keys").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fedface.common.crypto.ckks import KeyMaterial, TemplateEngine, TemplateParams, generate_keys
from fedface.common.errors import KeyFileError
from fedface.common.io import atomic_write_new

PASSPHRASE_ENV = "FEDFACE_KEY_PASSPHRASE"
PUBLIC_BUNDLE = "templates.pub"
SECRET_FILE = "templates.secret"
_BUNDLE_MAGIC = b"FFKEYS1\n"
_SECRET_MAGIC = b"FFSECRET1\n"
_SITE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _passphrase(passphrase: str | None) -> bytes | None:
    value = passphrase if passphrase is not None else os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def _pack(header: dict[str, object], parts: list[bytes], magic: bytes) -> bytes:
    hb = json.dumps({**header, "sizes": [len(p) for p in parts]}, sort_keys=True).encode()
    return magic + struct.pack(">I", len(hb)) + hb + b"".join(parts)


def _unpack(data: bytes, magic: bytes, path: Path) -> tuple[dict[str, object], list[bytes]]:
    try:
        if not data.startswith(magic):
            raise ValueError("bad magic")
        (hlen,) = struct.unpack_from(">I", data, len(magic))
        start = len(magic) + 4
        header = json.loads(data[start : start + hlen])
        pos, parts = start + hlen, []
        for size in header["sizes"]:
            parts.append(data[pos : pos + size])
            pos += size
        if pos != len(data) or any(len(p) != s for p, s in zip(parts, header["sizes"], strict=True)):
            raise ValueError("truncated")
        return header, parts
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise KeyFileError(f"{path} is not a fedface key file ({exc}): recreate it with `fedface keys`") from None


# -- a site's signing key --------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    private_key: Path
    public_key: Path


def create_signing_key(directory: str | Path, name: str, passphrase: str | None = None) -> KeyPair:
    """``<name>.key`` (PKCS#8 PEM, 0600, optionally encrypted) and ``<name>.pub``; never overwrites."""
    d = Path(directory)
    pair = KeyPair(d / f"{name}.key", d / f"{name}.pub")
    for p in (pair.private_key, pair.public_key):
        if p.exists():
            raise KeyFileError(f"{p} exists: keys are never overwritten; rotate with `fedface keys site --rotate`")
    key = Ed25519PrivateKey.generate()
    pw = _passphrase(passphrase)
    enc = serialization.BestAvailableEncryption(pw) if pw else serialization.NoEncryption()
    if not atomic_write_new(pair.private_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc), 0o600):
        raise KeyFileError(f"{pair.private_key} appeared while the key was made: keys are never overwritten")
    if not atomic_write_new(pair.public_key, key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644):
        raise KeyFileError(f"{pair.public_key} appeared while the key was made: remove {pair.private_key} and retry")
    return pair


def rotate_signing_key(directory: str | Path, name: str, passphrase: str | None = None) -> KeyPair:
    """Move the current pair to ``retired/<name>-<fingerprint>.*`` and create a new one."""
    d = Path(directory)
    old = KeyPair(d / f"{name}.key", d / f"{name}.pub")
    if old.public_key.exists():
        fp = fingerprint(load_verify_key(old.public_key))
        retired = d / "retired"
        retired.mkdir(parents=True, exist_ok=True)
        for p in (old.private_key, old.public_key):
            if p.exists():
                os.replace(p, retired / f"{name}-{fp}{p.suffix}")
    return create_signing_key(d, name, passphrase)


def load_signing_key(path: str | Path, passphrase: str | None = None) -> Ed25519PrivateKey:
    p = Path(path)
    if not p.is_file():
        raise KeyFileError(f"signing key {p} not found: create it with `fedface keys site`")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=_passphrase(passphrase))
    except TypeError:
        raise KeyFileError(f"signing key {p} is passphrase-protected: set {PASSPHRASE_ENV}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"signing key {p} is unreadable or the passphrase is wrong") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{p} is not an Ed25519 key: create one with `fedface keys site`")
    return key


def load_verify_key(path: str | Path) -> Ed25519PublicKey:
    p = Path(path)
    if not p.is_file():
        raise KeyFileError(f"public key {p} not found: it is the .pub file `fedface keys site` wrote")
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{p} is not a PEM public key: it is the .pub file `fedface keys site` wrote") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{p} is not an Ed25519 public key")
    return key


def fingerprint(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw public key."""
    return hashlib.sha256(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest()[:16]


class SiteKeys:
    """The registered sites: a directory of ``<site>.pub`` files (Ed25519, from `fedface keys site`).

    Callable with a site's name: its public key, or ``None`` for an unknown site (or a name that
    is not a plain site name). Files are re-read when they change, so registering or removing a
    site needs no restart. Both the gallery server and the key holder keep one.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise KeyFileError(f"site key directory {self.dir} not found: create it and register sites with `fedface gallery register`")
        self._cache: dict[str, tuple[float, Ed25519PublicKey]] = {}

    def __call__(self, site: str) -> Ed25519PublicKey | None:
        if not _SITE_NAME.fullmatch(site):
            return None
        path = self.dir / f"{site}.pub"
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        hit = self._cache.get(site)
        if hit is None or hit[0] != mtime:
            hit = (mtime, load_verify_key(path))
            self._cache[site] = hit
        return hit[1]

    def register(self, site: str, public_key: str | Path) -> Path:
        """Copy a site's public key in as ``<site>.pub`` (checked first; an existing one is never replaced)."""
        if not _SITE_NAME.fullmatch(site):
            raise KeyFileError(f"site name {site!r} must be letters, digits, '.', '_' or '-'")
        key = load_verify_key(public_key)
        target = self.dir / f"{site}.pub"
        data = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        if not atomic_write_new(target, data, 0o644):
            if target.read_bytes() != data:
                raise KeyFileError(f"{target} exists with another key: remove it first to re-register {site} under a new key")
        return target

    def sites(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.pub") if _SITE_NAME.fullmatch(p.stem))


# -- template keys ---------------------------------------------------------------------------


def context_id(params: TemplateParams, public_key: bytes, decision_public: bytes) -> str:
    """The key set's name: parameters, CKKS public key and the key holder's decision-signing key
    (first 16 hex digits of a SHA-256)."""
    return hashlib.sha256(params.id.encode() + b"\0" + public_key + b"\0" + decision_public).hexdigest()[:16]


@dataclass(frozen=True)
class TemplateContext:
    """A loaded key set: parameters, CKKS keys, the key holder's decision-verifying key, and its id.

    With the secret part loaded (the key holder only): ``keys.secret_key`` and ``decision_key``
    (the Ed25519 key that signs every decision, so that a site can tell a decision from the key
    holder from one a server made up).
    """

    params: TemplateParams
    keys: KeyMaterial
    decision_public: bytes
    id: str
    decision_key: Ed25519PrivateKey | None = None

    def engine(self) -> TemplateEngine:
        return TemplateEngine(self.params, self.keys)

    def decision_verifier(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.decision_public)

    def public_bundle(self) -> bytes:
        k = self.keys
        return _pack({"params": self.params.to_json(), "context": self.id},
                     [k.public_key, k.relin_keys, k.galois_keys, self.decision_public], _BUNDLE_MAGIC)


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def create_template_keys(directory: str | Path, dim: int, passphrase: str | None = None) -> TemplateContext:
    """A new key set in ``directory``: ``templates.pub`` (give it out) and ``templates.secret``
    (0600, keep: the CKKS secret key and the decision-signing key)."""
    d = Path(directory)
    for name in (PUBLIC_BUNDLE, SECRET_FILE):
        if (d / name).exists():
            raise KeyFileError(f"{d / name} exists: keys are never overwritten; use `fedface keys templates --rotate`")
    params = TemplateParams(dim=dim)
    keys = generate_keys(dim)
    signer = Ed25519PrivateKey.generate()
    decision_public = _raw_public(signer)
    ctx = TemplateContext(params, KeyMaterial(keys.public_key, keys.relin_keys, keys.galois_keys), decision_public,
                          context_id(params, keys.public_key, decision_public))
    assert keys.secret_key is not None
    raw_signer = signer.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    secret = struct.pack(">I", len(keys.secret_key)) + keys.secret_key + raw_signer
    pw = _passphrase(passphrase)
    header: dict[str, object] = {"context": ctx.id, "protected": bool(pw)}
    if pw:
        salt, nonce = os.urandom(16), os.urandom(12)
        k = Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(pw)
        header |= {"salt": salt.hex(), "nonce": nonce.hex()}
        secret = AESGCM(k).encrypt(nonce, secret, ctx.id.encode())
    # the secret first: a public bundle never exists without its secret beside it
    if not atomic_write_new(d / SECRET_FILE, _pack(header, [secret], _SECRET_MAGIC), 0o600):
        raise KeyFileError(f"{d / SECRET_FILE} appeared while the key set was made: keys are never overwritten")
    if not atomic_write_new(d / PUBLIC_BUNDLE, ctx.public_bundle(), 0o644):
        raise KeyFileError(f"{d / PUBLIC_BUNDLE} appeared while the key set was made: remove {d / SECRET_FILE} and retry")
    return ctx


def rotate_template_keys(directory: str | Path, dim: int | None = None, passphrase: str | None = None) -> tuple[str, TemplateContext]:
    """Create a new key set and retire the current one to ``retired/<id>/``; (old id, new set).

    ``dim`` None keeps the current set's dimension. The new set is made in a scratch folder
    first, so a failure leaves the current set in place.
    """
    d = Path(directory)
    old = load_template_context(d / PUBLIC_BUNDLE)
    scratch = d / f".rotating-{os.getpid()}"
    if scratch.exists():
        shutil.rmtree(scratch)
    new = create_template_keys(scratch, dim or old.params.dim, passphrase)
    target = d / "retired" / old.id
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in (PUBLIC_BUNDLE, SECRET_FILE):
        if (d / name).exists():
            os.replace(d / name, target / name)
    for name in (SECRET_FILE, PUBLIC_BUNDLE):
        os.replace(scratch / name, d / name)
    scratch.rmdir()
    return old.id, new


def _key_file(path: str | Path, name: str, missing: str) -> Path:
    """``path``, or ``path/name`` when it is a key directory; KeyFileError (``missing`` naming it) if absent."""
    p = Path(path)
    if p.is_dir():
        p = p / name
    if not p.is_file():
        raise KeyFileError(missing.format(p))
    return p


def load_template_context(path: str | Path, secret: str | Path | None = None, passphrase: str | None = None) -> TemplateContext:
    """The public bundle at ``path`` (a file or a key directory), with the secret part if ``secret`` is given."""
    p = _key_file(path, PUBLIC_BUNDLE, "template public keys {} not found: the key holder makes them with `fedface keys templates`")
    header, parts = _unpack(p.read_bytes(), _BUNDLE_MAGIC, p)
    if len(parts) != 4 or len(parts[3]) != 32:
        raise KeyFileError(f"{p} does not hold a public, relinearisation, Galois and decision key: fetch the key holder's current templates.pub")
    params = TemplateParams.from_json(header.get("params"))
    ctx = TemplateContext(params, KeyMaterial(*parts[:3]), parts[3], context_id(params, parts[0], parts[3]))
    if header.get("context") != ctx.id:
        raise KeyFileError(f"{p} is damaged: its keys do not match the context id it names")
    if secret is None:
        return ctx
    s = _key_file(secret, SECRET_FILE, "template secret key {} not found")
    sh, sparts = _unpack(s.read_bytes(), _SECRET_MAGIC, s)
    if sh.get("context") != ctx.id or len(sparts) != 1:
        raise KeyFileError(f"{s} belongs to key set {sh.get('context')}, not {ctx.id} ({p}): use the pair made together")
    blob = sparts[0]
    if sh.get("protected"):
        pw = _passphrase(passphrase)
        if not pw:
            raise KeyFileError(f"template secret key {s} is passphrase-protected: set {PASSPHRASE_ENV}")
        k = Scrypt(salt=bytes.fromhex(str(sh["salt"])), length=32, n=2**15, r=8, p=1).derive(pw)
        try:
            blob = AESGCM(k).decrypt(bytes.fromhex(str(sh["nonce"])), blob, ctx.id.encode())
        except InvalidTag:
            raise KeyFileError(f"wrong passphrase for {s}") from None
    try:
        (n,) = struct.unpack_from(">I", blob)
        sk, raw_signer = blob[4 : 4 + n], blob[4 + n :]
        signer = Ed25519PrivateKey.from_private_bytes(raw_signer)
    except (struct.error, ValueError):
        raise KeyFileError(f"{s} is damaged: recreate the key set with `fedface keys templates --rotate`") from None
    if _raw_public(signer) != ctx.decision_public:
        raise KeyFileError(f"{s} does not hold the decision key of {p}: use the pair made together")
    return TemplateContext(params, KeyMaterial(*parts[:3], secret_key=sk), ctx.decision_public, ctx.id, signer)


__all__ = [
    "PASSPHRASE_ENV",
    "PUBLIC_BUNDLE",
    "SECRET_FILE",
    "KeyPair",
    "SiteKeys",
    "TemplateContext",
    "context_id",
    "create_signing_key",
    "create_template_keys",
    "fingerprint",
    "load_signing_key",
    "load_template_context",
    "load_verify_key",
    "rotate_signing_key",
    "rotate_template_keys",
]
