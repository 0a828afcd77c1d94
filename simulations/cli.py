"""The `fedface` command: assembles each side's commands into one Typer app."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Optional

import typer

from fedface.simulations.bench import bench_app
from fedface.simulations.commands.console import console_app
from fedface.simulations.commands.deploy import server_app, site_app
from fedface.simulations.commands.evaluate import evaluate
from fedface.simulations.commands.gallery import (
    gallery_app,
    keyholder_app,
    site_enroll,
    site_fetch_keys,
    site_identify,
    site_revoke,
    site_verify,
)
from fedface.simulations.commands.keys import keys_app
from fedface.simulations.commands.privacy import privacy_app
from fedface.simulations.commands.report import report_app
from fedface.simulations.commands.simulate import simulate
from fedface.simulations.commands.train import train

app = typer.Typer(
    name="fedface",
    help="Privacy-preserving federated face recognition: GRU face encoders, DP-SGD, Flower.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals can hold keys and embeddings
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)


def _version() -> str:
    try:
        return version("fedface")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fedface {_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Privacy-preserving federated face recognition."""


app.command()(train)
app.command()(evaluate)
app.command()(simulate)
site_app.command("enroll")(site_enroll)
site_app.command("revoke")(site_revoke)
site_app.command("identify")(site_identify)
site_app.command("verify")(site_verify)
site_app.command("fetch-keys")(site_fetch_keys)
app.add_typer(bench_app, name="bench")
app.add_typer(privacy_app, name="privacy")
app.add_typer(keys_app, name="keys")
app.add_typer(server_app, name="server")
app.add_typer(site_app, name="site")
app.add_typer(gallery_app, name="gallery")
app.add_typer(keyholder_app, name="keyholder")
app.add_typer(console_app, name="console")
app.add_typer(report_app, name="report")


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
