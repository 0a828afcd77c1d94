"""`fedface report`: reports a privacy or compliance officer reads and signs (docs/privacy.md)."""

from __future__ import annotations

import typer

report_app = typer.Typer(
    help="Reports: each site's privacy spend per run and over its lifetime, with plots, for the officer who signs it off.",
    no_args_is_help=True,
)

__all__ = ["report_app"]
