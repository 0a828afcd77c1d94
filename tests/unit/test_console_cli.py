"""`fedface console init-admin` and `serve`: bad input is one line and a non-zero exit, before
anything is served (a path through a file, a password of spaces, a store that is not one, a
port in use, a TLS key and certificate that do not belong together)."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from fedface.server.store import RunStore
from fedface.simulations.cli import app

runner = CliRunner()
PASSWORD = "a long enough console password"


@pytest.fixture
def admin_dir(tmp_path: Path) -> Path:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    result = runner.invoke(app, ["console", "init-admin", "--admin-dir", str(tmp_path / "admin"), "--password-file", str(tmp_path / "pw")])
    assert result.exit_code == 0, result.stderr
    return tmp_path / "admin"


def _one_line(result: object, code: int, start: str) -> None:
    assert result.exit_code == code, result.stderr  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith(start), lines


def test_init_admin_refuses_a_file_for_a_directory_and_a_path_through_one(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    _one_line(runner.invoke(app, ["console", "init-admin", "--admin-dir", str(pw), "--password-file", str(pw)]), 3, "ConfigError: --admin-dir")
    _one_line(runner.invoke(app, ["console", "init-admin", "--admin-dir", str(pw / "admin"), "--password-file", str(pw)]), 3,
              "ConfigError: cannot write the console admin")


def test_init_admin_refuses_a_password_of_spaces(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(" " * 20 + "\n")
    result = runner.invoke(app, ["console", "init-admin", "--admin-dir", str(tmp_path / "a"), "--password-file", str(tmp_path / "pw")])
    _one_line(result, 3, "ConfigError: the console password cannot be only spaces")
    assert not (tmp_path / "a" / "admin.json").exists()


def test_serve_refuses_a_store_that_is_not_one(tmp_path: Path, admin_dir: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"\x00not sqlite" * 100)
    _one_line(runner.invoke(app, ["console", "serve", "--store", str(junk), "--admin-dir", str(admin_dir)]), 9, "RunDirError:")


def test_serve_refuses_a_port_in_use(tmp_path: Path, admin_dir: Path) -> None:
    with RunStore(tmp_path / "run" / "runs.sqlite"):
        pass
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["console", "serve", "--store", str(tmp_path / "run"), "--admin-dir", str(admin_dir), "--port", str(port)])
    _one_line(result, 3, f"ConfigError: cannot listen on 127.0.0.1:{port}")


def test_serve_refuses_a_swapped_tls_certificate_and_key(tmp_path: Path, admin_dir: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    args = ["console", "serve", "--store", str(tmp_path / "run"), "--admin-dir", str(admin_dir)]
    swapped = runner.invoke(app, [*args, "--tls-cert", str(tmp_path / "server.key"), "--tls-key", str(tmp_path / "server.pem")])
    _one_line(swapped, 3, "ConfigError: --tls-cert")
    assert "swapped" in swapped.stderr
