"""`fedface console`: the administrators' web console (docs/console.md)."""

from __future__ import annotations

import typer

console_app = typer.Typer(
    help="The administrators' web console: runs, rounds, sites, privacy spend, gallery and audit log, live.",
    no_args_is_help=True,
)

__all__ = ["console_app"]
