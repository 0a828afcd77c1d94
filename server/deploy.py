"""Keys and certificates of a deployed federation (`fedface keys`).

- **TLS**: a federation CA (self-signed, EC P-384) and a SuperLink server certificate signed
  by it, naming the hosts and IP addresses the sites connect to. Sites trust the CA
  (``flower-supernode --root-certificates ca.pem``); the SuperLink presents the server
  certificate (``--ssl-certfile``, ``--ssl-keyfile``, ``--ssl-ca-certfile``).
- **Node authentication**: each site has its own EC P-384 key pair in OpenSSH format (what
  Flower's ``--auth-supernode-private-key`` and ``flwr supernode register`` read). The private
  key is created at the site and never leaves it; only the ``.pub`` file is registered with
  the SuperLink, which then refuses every node whose key is not registered.
- **App signing**: the publisher of fedface's app (the coordinator) has an Ed25519 key pair in
  OpenSSH format (:func:`create_publisher_key`). ``fedface server run --publisher-key`` signs
  every app it sends with the private key; each site lists the ``.pub`` files it trusts
  (``trusted-publishers`` in its site.toml) and runs nothing else (:mod:`fedface.common.signing`).

Written with ``cryptography`` (Flower's own dependency); keys are written atomically with mode
0600 from the start, certificates and public keys 0644, and an existing file is never overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedface.common.errors import ConfigError, RunDirError
from fedface.common.io import atomic_write_new
from fedface.common.signing import new_private_key, private_key_bytes, public_key_line

CURVE = ec.SECP384R1()
CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class FederationKeys:
    """Paths of a federation's CA and SuperLink certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    """Paths of one site's node-authentication key pair."""

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class PublisherKey:
    """Paths of the app publisher's signing key pair."""

    private_key: Path
    public_key: Path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    if not atomic_write_new(path, data, mode):
        raise RunDirError(f"{path} already exists: fedface never overwrites keys; choose another directory or remove it yourself")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_federation_keys(directory: str | Path, *, hosts: Sequence[str], name: str = "fedface federation") -> FederationKeys:
    """A CA and a SuperLink certificate for ``hosts`` (DNS names or IP addresses) in ``directory``."""
    if not hosts:
        raise ConfigError("name at least one host (DNS name or IP address) the sites will connect to, e.g. --host 127.0.0.1")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(CURVE)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    keys = FederationKeys(out / "ca.pem", out / "ca.key", out / "server.pem", out / "server.key")
    for path in (keys.ca_cert, keys.ca_key, keys.server_cert, keys.server_key):
        if path.exists():
            raise RunDirError(f"{path} already exists: fedface never overwrites keys; choose another directory or remove it yourself")
    _write_new(keys.ca_key, _pem_key(ca_key), 0o600)
    _write_new(keys.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_new(keys.server_key, _pem_key(server_key), 0o600)
    _write_new(keys.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return keys


def _key_pair_paths(directory: str | Path, name: str, what: str) -> tuple[Path, Path]:
    if not name or any(c in name for c in "/\\ \t\n") or name.startswith("."):
        raise ConfigError(f"{what} name {name!r} must be a plain file name (letters, digits, '-', '_')")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    pair = out / f"{name}.key", out / f"{name}.pub"
    for path in pair:
        if path.exists():
            raise RunDirError(f"{path} already exists: fedface never overwrites keys; choose another name or remove it yourself")
    return pair


def create_node_key(directory: str | Path, name: str) -> NodeKey:
    """A site's node-authentication key pair (OpenSSH, EC P-384): ``<name>.key`` and ``<name>.pub``."""
    node = NodeKey(*_key_pair_paths(directory, name, "node"))
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode()
    _write_new(node.private_key, private, 0o600)
    _write_new(node.public_key, public, 0o644)
    return node


def create_publisher_key(directory: str | Path, name: str = "publisher") -> PublisherKey:
    """The app publisher's signing key pair (OpenSSH, Ed25519): ``<name>.key`` and ``<name>.pub``.

    The ``.pub`` file goes to every site (``trusted-publishers``); the private key stays with
    whoever runs `fedface server run` (and never on a site)."""
    pair = PublisherKey(*_key_pair_paths(directory, name, "publisher"))
    key = new_private_key()
    _write_new(pair.private_key, private_key_bytes(key), 0o600)
    _write_new(pair.public_key, f"{public_key_line(key.public_key())} {name}\n".encode(), 0o644)
    return pair


__all__ = ["FederationKeys", "NodeKey", "PublisherKey", "create_federation_keys", "create_node_key", "create_publisher_key"]
