"""`fedface keys`: certificates, node keys and the app publisher's key of a deployed federation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedface.simulations.console import err_console, setup_logging, user_errors

keys_app = typer.Typer(
    help="TLS certificates for the SuperLink, node-authentication keys for the sites, the publisher's app-signing key.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@keys_app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="Directory for ca.pem, ca.key, server.pem, server.key (created; existing files are never overwritten).")],
    host: Annotated[list[str], typer.Option("--host", help="DNS name or IP address the sites connect to (repeat for several).")],
) -> None:
    """Create the federation's CA and the SuperLink's TLS certificate (EC P-384).

    Give ca.pem to every site; keep ca.key offline; server.pem and server.key go to the SuperLink.
    """
    setup_logging()
    from fedface.server.deploy import create_federation_keys

    with user_errors():
        keys = create_federation_keys(directory, hosts=host)
    err_console.print(f"CA {keys.ca_cert} (key {keys.ca_key}); SuperLink certificate {keys.server_cert} for {', '.join(host)}")


@keys_app.command("node")
def node(
    directory: Annotated[Path, typer.Argument(help="Directory for <name>.key (private, mode 0600) and <name>.pub.")],
    name: Annotated[str, typer.Option(help="The site's name.")],
) -> None:
    """Create a site's node-authentication key pair (OpenSSH, EC P-384).

    Run it at the site: the private key never leaves it. Register the .pub file with the
    SuperLink (`flwr supernode register <name>.pub <connection>`); unregistered nodes are refused.
    """
    setup_logging()
    from fedface.server.deploy import create_node_key

    with user_errors():
        key = create_node_key(directory, name)
    err_console.print(f"private key {key.private_key} (keep it at the site); public key {key.public_key} (register it)")


@keys_app.command("publisher")
def publisher(
    directory: Annotated[Path, typer.Argument(help="Directory for <name>.key (private, mode 0600) and <name>.pub.")],
    name: Annotated[str, typer.Option(help="The key's file name.")] = "publisher",
) -> None:
    """Create the app publisher's signing key pair (OpenSSH, Ed25519).

    `fedface server run --publisher-key <name>.key` signs every app it sends with it. Give the
    .pub file to every site (`trusted-publishers` in its site.toml): a site runs only apps
    signed by a key it trusts.
    """
    setup_logging()
    from fedface.server.deploy import create_publisher_key

    with user_errors():
        key = create_publisher_key(directory, name)
    err_console.print(f"signing key {key.private_key} (keep it with the coordinator); public key {key.public_key} (give it to every site)")


__all__ = ["keys_app"]
