"""`fedface keys`: a CA and SuperLink certificate that verify, node keys Flower can read, nothing overwritten."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from fedface.common.errors import ConfigError, RunDirError
from fedface.server.deploy import create_federation_keys, create_node_key
from fedface.simulations.cli import app


def test_server_certificate_is_signed_by_the_ca_and_names_every_host(tmp_path: Path) -> None:
    # Act
    keys = create_federation_keys(tmp_path, hosts=["127.0.0.1", "fed.example.org"])

    # Assert
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["fed.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(keys.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()  # type: ignore[union-attr]
    assert stat.S_IMODE(keys.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.server_key.stat().st_mode) == 0o600


def test_node_key_pair_is_openssh_ecdsa_on_a_nist_curve_and_matches(tmp_path: Path) -> None:
    node = create_node_key(tmp_path, "site-a")

    private = load_ssh_private_key(node.private_key.read_bytes(), password=None)
    public = load_ssh_public_key(node.public_key.read_bytes())

    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    assert node.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert stat.S_IMODE(node.private_key.stat().st_mode) == 0o600


def test_keys_are_never_overwritten(tmp_path: Path) -> None:
    create_node_key(tmp_path, "site-a")
    fed = create_federation_keys(tmp_path / "fed", hosts=["127.0.0.1"])
    before = (tmp_path / "site-a.key").read_bytes(), fed.ca_key.read_bytes()

    with pytest.raises(RunDirError, match="already exists"):
        create_node_key(tmp_path, "site-a")
    with pytest.raises(RunDirError, match="already exists"):
        create_federation_keys(tmp_path / "fed", hosts=["127.0.0.1"])
    assert ((tmp_path / "site-a.key").read_bytes(), fed.ca_key.read_bytes()) == before


@pytest.mark.parametrize("name", ["", "../escape", "a b", ".hidden"])
def test_node_name_must_be_a_plain_file_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="plain file name"):
        create_node_key(tmp_path, name)


def test_keys_cli_init_and_node_write_the_files_and_refuse_a_second_init(tmp_path: Path) -> None:
    runner = CliRunner()

    first = runner.invoke(app, ["keys", "init", str(tmp_path / "fed"), "--host", "127.0.0.1"])
    node = runner.invoke(app, ["keys", "node", str(tmp_path / "nodes"), "--name", "site-000"])
    again = runner.invoke(app, ["keys", "init", str(tmp_path / "fed"), "--host", "127.0.0.1"])

    assert first.exit_code == 0, first.stderr
    assert node.exit_code == 0, node.stderr
    assert sorted(p.name for p in (tmp_path / "fed").iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]
    assert (tmp_path / "nodes" / "site-000.pub").is_file()
    assert again.exit_code == 9
    assert again.stderr.strip().startswith("RunDirError:") and len(again.stderr.strip().splitlines()) == 1
