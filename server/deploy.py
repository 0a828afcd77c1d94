"""Keys and certificates of a deployed federation (`fedface keys`).

- **TLS**: a federation CA (self-signed, EC P-384) and a SuperLink server certificate signed
  by it, naming the hosts and IP addresses the sites connect to. Sites trust the CA
  (``flower-supernode --root-certificates ca.pem``); the SuperLink presents the server
  certificate (``--ssl-certfile``, ``--ssl-keyfile``, ``--ssl-ca-certfile``).
- **Node authentication**: each site has its own EC P-384 key pair in OpenSSH format (what
  Flower's ``--auth-supernode-private-key`` and ``flwr supernode register`` read). The private
  key is created at the site and never leaves it; only the ``.pub`` file is registered with
  the SuperLink, which then refuses every node whose key is not registered.

Written with ``cryptography`` (Flower's own dependency); keys are written atomically with mode
0600, certificates and public keys 0644, and an existing file is never overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedface.common.errors import ConfigError, RunDirError
from fedface.common.io import atomic_write_bytes

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


def _write_new(path: Path, data: bytes, mode: int) -> None:
    if path.exists():
        raise RunDirError(f"{path} already exists: fedface never overwrites keys; choose another directory or remove it yourself")
    atomic_write_bytes(path, data)
    os.chmod(path, mode)


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


def create_node_key(directory: str | Path, name: str) -> NodeKey:
    """A site's node-authentication key pair (OpenSSH, EC P-384): ``<name>.key`` and ``<name>.pub``."""
    if not name or any(c in name for c in "/\\ \t\n") or name.startswith("."):
        raise ConfigError(f"node name {name!r} must be a plain file name (letters, digits, '-', '_')")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(CURVE)
    node = NodeKey(out / f"{name}.key", out / f"{name}.pub")
    for path in (node.private_key, node.public_key):
        if path.exists():
            raise RunDirError(f"{path} already exists: fedface never overwrites keys; choose another name or remove it yourself")
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode()
    _write_new(node.private_key, private, 0o600)
    _write_new(node.public_key, public, 0o644)
    return node


__all__ = ["FederationKeys", "NodeKey", "create_federation_keys", "create_node_key"]
