"""`fedface keys`: a CA and SuperLink certificate that verify, node keys Flower can read, nothing
overwritten; the publisher's key and signed apps: signatures Flower's SuperNode verifies, a run
config signature that covers every value, the hub hand-over Flower's SuperLink reads, and the
site's checks (its SuperNode's trusted entities, its ClientApp's mod)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from fedface.common.errors import ConfigError, RunDirError
from fedface.common.signing import (
    RUN_SIGNATURE_KEY,
    UntrustedAppError,
    key_id,
    load_private_key,
    load_public_key,
    new_private_key,
    sign_fab,
    sign_run_config,
    trusted_entities,
    verify_fab,
    verify_run_config,
)
from fedface.server.deploy import create_federation_keys, create_node_key, create_publisher_key
from fedface.server.publisher import AppHandover, build_app, hub_url
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


# --- the publisher's key and signed apps ---------------------------------------------------------


def test_publisher_key_pair_is_openssh_ed25519_private_0600_and_never_overwritten(tmp_path: Path) -> None:
    pair = create_publisher_key(tmp_path)

    private = load_ssh_private_key(pair.private_key.read_bytes(), password=None)
    public = load_public_key(pair.public_key)

    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert key_id(private.public_key()) == key_id(public)
    assert pair.public_key.read_text().startswith("ssh-ed25519 ") and pair.public_key.read_text().endswith(" publisher\n")
    assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
    before = pair.private_key.read_bytes()
    with pytest.raises(RunDirError, match="already exists"):
        create_publisher_key(tmp_path)
    assert pair.private_key.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["publisher.key", "publisher.pub"]  # no temporary file left


def test_keys_cli_publisher_writes_the_pair(tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["keys", "publisher", str(tmp_path / "pub"), "--name", "fed-publisher"])

    assert done.exit_code == 0, done.stderr
    assert isinstance(load_private_key(tmp_path / "pub" / "fed-publisher.key"), ed25519.Ed25519PrivateKey)
    assert isinstance(load_public_key(tmp_path / "pub" / "fed-publisher.pub"), ed25519.Ed25519PublicKey)


def test_a_node_key_is_not_a_publisher_key(tmp_path: Path) -> None:
    node = create_node_key(tmp_path, "site-a")

    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        load_private_key(node.private_key)
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        load_public_key(node.public_key)


def _flower_verifies(fab: bytes, records: list[dict[str, Any]], trusted: list[ed25519.Ed25519PublicKey]) -> bool:
    """Flower 1.42's SuperNode check, on the verification dict its SuperLink builds from a hub's answer."""
    from flwr.superlink.servicer.control.control_handlers import _format_verification
    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab

    return _verify_fab(Fab("", fab, _format_verification(records)), trusted_entities(trusted))


def test_fab_signature_is_the_one_flowers_supernode_verifies() -> None:
    key, other = new_private_key(), new_private_key()
    fab = b"PK\x03\x04 a FAB's bytes"
    records = [sign_fab(fab, key)]

    assert _flower_verifies(fab, records, [key.public_key()])
    assert verify_fab(fab, records, [key.public_key()]) == key_id(key.public_key())
    # altered bytes, or a key the site does not trust: refused by Flower and by fedface alike
    assert not _flower_verifies(fab + b"!", records, [key.public_key()])
    assert not _flower_verifies(fab, records, [other.public_key()])
    assert verify_fab(fab + b"!", records, [key.public_key()]) is None
    assert verify_fab(fab, [sign_fab(fab, other)], [key.public_key()]) is None


RUN_CONFIG = {"scenario": "", "scenario-toml": "[federation]\nrounds = 2\n", "run-dir": "/srv/runs/a", "sites": 0, "rounds": 0, "epsilon": 8.0}


def test_a_run_config_asking_for_an_infinite_epsilon_can_be_signed_and_checked() -> None:
    # `fedface server run --epsilon inf`: signed like any other, then refused by the sites' policy
    key = new_private_key()
    config = {**RUN_CONFIG, "epsilon": float("inf")}
    signed = {**config, RUN_SIGNATURE_KEY: sign_run_config(config, key)}

    assert verify_run_config(signed, [key.public_key()]) == key_id(key.public_key())
    with pytest.raises(UntrustedAppError, match="does not match"):
        verify_run_config({**signed, "epsilon": 8.0}, [key.public_key()])


def test_run_config_signature_covers_every_key_and_value() -> None:
    key = new_private_key()
    trusted = [key.public_key()]
    signed = {**RUN_CONFIG, RUN_SIGNATURE_KEY: sign_run_config(RUN_CONFIG, key)}

    assert verify_run_config(signed, trusted) == key_id(key.public_key())
    for altered in (
        {**signed, "epsilon": 50.0},
        {**signed, "scenario-toml": "[federation]\nrounds = 20\n"},
        {**signed, "extra": 1},
        {k: v for k, v in signed.items() if k != "run-dir"},
    ):
        with pytest.raises(UntrustedAppError, match="does not match what publisher"):
            verify_run_config(altered, trusted)
    with pytest.raises(UntrustedAppError, match="not signed"):
        verify_run_config({**RUN_CONFIG, RUN_SIGNATURE_KEY: ""}, trusted)
    with pytest.raises(UntrustedAppError, match="not a publisher this site trusts"):
        verify_run_config(signed, [new_private_key().public_key()])
    with pytest.raises(UntrustedAppError, match="does not match"):
        verify_run_config({**signed, RUN_SIGNATURE_KEY: signed[RUN_SIGNATURE_KEY][:-4] + "AAAA"}, trusted)


def _app_pyproject() -> str:
    from importlib import resources

    return resources.files("fedface.simulations").joinpath("flwr_app", "pyproject.toml").read_text()


def test_signed_app_carries_its_run_config_as_the_sites_read_it() -> None:
    from flwr.common.config import get_fused_config_from_fab
    from flwr.supercore.run import Run

    key = new_private_key()
    signed_app = build_app(_app_pyproject(), {"scenario-toml": "[privacy]\nepsilon = 4.0\n", "rounds": 3, "epsilon": 4.0}, key)
    run = Run.create_empty(7)

    # what a SuperNode puts in the ClientApp's context: the FAB's defaults fused with the run's overrides
    config = get_fused_config_from_fab(signed_app.fab, run)
    assert config["rounds"] == 3 and config["scenario-toml"] == "[privacy]\nepsilon = 4.0\n" and config["data"] == ""
    assert verify_run_config(config, [key.public_key()]) == key_id(key.public_key())
    assert _flower_verifies(signed_app.fab, list(signed_app.verifications), [key.public_key()])
    assert signed_app.spec == "@fedface/fedface-app==0.1.0"
    run.override_config = {"epsilon": 50.0}
    with pytest.raises(UntrustedAppError, match="does not match"):
        verify_run_config(get_fused_config_from_fab(signed_app.fab, run), [key.public_key()])
    # the same run config and key make the same FAB (Flower's builder is deterministic)
    assert build_app(_app_pyproject(), {"scenario-toml": "[privacy]\nepsilon = 4.0\n", "rounds": 3, "epsilon": 4.0}, key).fab == signed_app.fab
    unsigned = build_app(_app_pyproject(), {"rounds": 3}, None)
    assert unsigned.verifications == () and get_fused_config_from_fab(unsigned.fab, Run.create_empty(8))[RUN_SIGNATURE_KEY] == ""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_app_handover_answers_flowers_hub_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    import requests
    from flwr.supercore.utils import request_download_link

    key = new_private_key()
    signed_app = build_app(_app_pyproject(), {"rounds": 1}, key)
    port = _free_port()

    with AppHandover(signed_app, port) as handover:
        # the SuperLink's own client for Flower's hub, pointed at fedface's
        url, records, _ = request_download_link("@fedface/fedface-app", "0.1.0", f"{hub_url(port)}/hub/fetch-fab", "fab_url")
        fab = requests.get(url, timeout=10).content
        with pytest.raises(ValueError, match="not found"):
            request_download_link("@someone/else", "0.1.0", f"{hub_url(port)}/hub/fetch-fab", "fab_url")
        with pytest.raises(ConfigError, match="another `fedface server run`"):
            AppHandover(signed_app, port)
    assert fab == signed_app.fab
    assert records is not None and _flower_verifies(fab, records, [key.public_key()])
    assert handover.requests[:2] == ["POST /v1/hub/fetch-fab @fedface/fedface-app==0.1.0", "GET /v1/fabs/0.1.0.fab"]


def _site_toml(tmp_path: Path, **extra: Any) -> Path:
    from fedface.client.siteconfig import SiteConfig

    (tmp_path / "faces").mkdir(exist_ok=True)
    path = tmp_path / "site.toml"
    budget = {"policy": {"budget-epsilon": 10.0}} if "policy" in SiteConfig.model_fields else {"budget-epsilon": 10.0}
    path.write_text(tomli_w.dumps({"name": "site-a", "data": "faces", "state-dir": "state", **budget, **extra}))
    return path


def test_trusted_app_mod_passes_only_runs_signed_by_a_trusted_publisher(tmp_path: Path) -> None:
    from flwr.common import Context, RecordDict

    from fedface.client.trust import trusted_app_mod

    pair = create_publisher_key(tmp_path / "keys")
    key = load_private_key(pair.private_key)
    site = _site_toml(tmp_path, **{"trusted-publishers": ["keys/publisher.pub"]})  # relative to the site's TOML
    calls: list[int] = []

    def handle(run_config: dict[str, Any], node_config: dict[str, Any] | None = None) -> str:
        ctxt = Context(run_id=1, node_id=2, node_config=node_config or {"site-config": str(site)}, state=RecordDict(), run_config=run_config)
        return trusted_app_mod(None, ctxt, lambda msg, c: calls.append(1) or "answered")  # type: ignore[arg-type,func-returns-value]

    signed = {**RUN_CONFIG, RUN_SIGNATURE_KEY: sign_run_config(RUN_CONFIG, key)}
    assert handle(signed) == "answered"
    for refused in ({**signed, "epsilon": 50.0}, dict(RUN_CONFIG), {**RUN_CONFIG, RUN_SIGNATURE_KEY: sign_run_config(RUN_CONFIG, new_private_key())}):
        with pytest.raises(UntrustedAppError):
            handle(refused)
    assert calls == [1]  # nothing after the mod ran for a refused run
    # a test federation's node on shared data (no site config) is not checked
    assert handle(dict(RUN_CONFIG), {"partition-id": 0}) == "answered"


def test_site_starts_its_supernode_with_flowers_trusted_entities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities, _validate_public_keys_ed25519

    import fedface.simulations.commands.deploy as deploy

    pair = create_publisher_key(tmp_path / "keys")
    site = _site_toml(tmp_path, **{"trusted-publishers": [str(pair.public_key)]})
    started: list[list[str]] = []
    monkeypatch.setattr(deploy.os, "execvpe", lambda file, args, env: started.append(list(args)))

    done = CliRunner().invoke(app, ["site", "join", "-c", str(site), "--insecure"])

    assert done.exit_code == 0, done.stderr
    (args,) = started
    entities_file = Path(args[args.index("--trusted-entities") + 1])
    entities = _try_obtain_trusted_entities(entities_file)  # Flower's own reader and check
    assert entities is not None
    _validate_public_keys_ed25519(entities)
    assert entities == trusted_entities([load_public_key(pair.public_key)])


def test_a_deployed_site_that_trusts_no_publisher_does_not_start(tmp_path: Path) -> None:
    site = _site_toml(tmp_path)

    done = CliRunner().invoke(app, ["site", "join", "-c", str(site), "--root-certificates", str(site), "--key", str(site)])

    assert done.exit_code == 3
    assert done.stderr.strip().startswith("ConfigError:") and "trusts no publisher" in done.stderr
