"""`fedface keys`: certificates, node keys and the app publisher's key of a deployed federation,
and the keys of the encrypted gallery (the key holder's template key set, a site's signing key)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedface.simulations.console import err_console, print_json, setup_logging, user_errors

keys_app = typer.Typer(
    help="TLS certificates, node-authentication keys for the sites, the publisher's app-signing key, "
    "the key holder's template encryption keys and the sites' template signing keys.",
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


def _check_format(output_format: str) -> None:
    if output_format not in ("text", "json"):
        raise typer.BadParameter(f"expected text or json, got {output_format!r}", param_hint="--format")


@keys_app.command("templates")
def templates(
    directory: Annotated[Path, typer.Argument(help="The key holder's key directory: templates.pub (public) and templates.secret (mode 0600).")],
    dim: Annotated[Optional[int], typer.Option(help="Template (embedding) dimension: the encoder's embedding-dim (default 128; with --rotate, the current set's).")] = None,
    rotate: Annotated[bool, typer.Option(help="Retire the current key set to retired/<context-id>/ and make a new one (sites then re-enroll).")] = False,
    output_format: Annotated[str, typer.Option("--format", help="text, or json: the key set as one JSON object on stdout.")] = "text",
) -> None:
    """Create (or with --rotate, replace) the CKKS template key set. Run it at the key holder.

    templates.secret never leaves the key holder (encrypted with FEDFACE_KEY_PASSPHRASE if set).
    The sites fetch templates.pub from the key holder (`fedface site fetch-keys`) and compare
    the printed context id with the one the key holder tells them out of band."""
    _check_format(output_format)
    setup_logging()
    from fedface.common.crypto.keyfiles import PUBLIC_BUNDLE, SECRET_FILE, create_template_keys, rotate_template_keys

    with user_errors():
        directory.mkdir(parents=True, exist_ok=True)
        old = None
        if rotate:
            old, ctx = rotate_template_keys(directory, dim)
        else:
            ctx = create_template_keys(directory, dim or 128)
    what = f"rotated key set {old} to retired/{old}/; new" if old else "new"
    err_console.print(f"{what} template key set {ctx.id} (dim {ctx.params.dim}): {directory / PUBLIC_BUNDLE} (give it out), "
                      f"{directory / SECRET_FILE} (keep it here); sites check the id {ctx.id}", soft_wrap=True)
    if output_format == "json":
        print_json({"context": ctx.id, "dim": ctx.params.dim, "params": ctx.params.id, "public_keys": str(directory / PUBLIC_BUNDLE),
                    "secret_key": str(directory / SECRET_FILE), "retired": old})


@keys_app.command("site")
def site_key(
    directory: Annotated[Path, typer.Argument(help="Directory for <name>.key (private, mode 0600) and <name>.pub.")],
    name: Annotated[str, typer.Option(help="The site's name (the name in its site.toml).")],
    rotate: Annotated[bool, typer.Option(help="Move the current pair to retired/ and make a new one (register the new .pub again).")] = False,
    output_format: Annotated[str, typer.Option("--format", help="text, or json: the key paths and fingerprint as one JSON object on stdout.")] = "text",
) -> None:
    """Create a site's template signing key (Ed25519, PEM): every enrollment, revocation and
    query the site sends is signed with it. The private key is encrypted with
    FEDFACE_KEY_PASSPHRASE if set. Register the .pub with the gallery server and the key holder
    (`fedface gallery register`)."""
    _check_format(output_format)
    setup_logging()
    from fedface.common.crypto.keyfiles import create_signing_key, fingerprint, load_verify_key, rotate_signing_key

    with user_errors():
        directory.mkdir(parents=True, exist_ok=True)
        pair = rotate_signing_key(directory, name) if rotate else create_signing_key(directory, name)
        fp = fingerprint(load_verify_key(pair.public_key))
    err_console.print(f"signing key {pair.private_key} (keep it at the site); public key {pair.public_key} (register it), "
                      f"fingerprint {fp}", soft_wrap=True)
    if output_format == "json":
        print_json({"private_key": str(pair.private_key), "public_key": str(pair.public_key), "fingerprint": fp})


__all__ = ["keys_app"]
