"""`fedface report`: reports a privacy or compliance officer reads and signs (docs/privacy.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedface.common.errors import ConfigError
from fedface.common.io import atomic_write_text
from fedface.simulations.console import err_console, user_errors

report_app = typer.Typer(
    help="Reports: each site's privacy spend per run and over its lifetime, with plots, for the officer who signs it off.",
    no_args_is_help=True,
)


@report_app.command()
def privacy(
    run_dir: Annotated[
        Optional[Path],
        typer.Argument(help="A run directory (`fedface simulate --out`, a server's --run-dir) or its run store file (runs.sqlite)."),
    ] = None,
    ledger: Annotated[
        Optional[Path], typer.Option("--ledger", help="Instead of a run: a site's own privacy ledger file (ledger.sqlite).")
    ] = None,
    receipts: Annotated[
        Optional[Path],
        typer.Option("--receipts", help="With --ledger: the site's receipts (`fedface privacy receipts --out`) to check it against."),
    ] = None,
    run_id: Annotated[Optional[str], typer.Option("--run", help="The run to report on (default: the run store's latest).")] = None,
    site: Annotated[
        Optional[str], typer.Option("--site", help="Only this site (of the run), or this data set (of the ledger).")
    ] = None,
    ledger_dir: Annotated[
        Optional[Path],
        typer.Option("--ledger-dir", help="With RUN_DIR: the folder of the sites' ledgers, <dir>/<site>/ledger.sqlite (default: the one the run's ledgers.json names)."),
    ] = None,
    output_format: Annotated[str, typer.Option("--format", help="html (one standalone file), json, md or csv.")] = "md",
    out: Annotated[
        Optional[Path],
        typer.Option("--out", help="Write the report to this file (atomically) instead of stdout; its folder must exist."),
    ] = None,
) -> None:
    """Report each site's privacy spend: mechanism, accountant, epsilon per run and lifetime, budget,
    group privacy, receipts, and a statement an officer can sign.

    For a run (RUN_DIR): every site of the run, its figures from the sites' ledgers when they are
    reachable (a simulate run's ledgers.json, or --ledger-dir) and held to the bit against the run
    store and its receipts, otherwise from the run store as the sites reported them. For a site
    (--ledger): every data set of its ledger and every run it joined. Epsilon is shown rounded
    up, what remains of a budget down; JSON carries the exact figures.
    """
    from fedface.server.reports import privacy_report_for_ledger, privacy_report_for_run
    from fedface.server.reports.render import FORMATS, render_report
    from fedface.server.reports.sections import plural

    with user_errors():
        if output_format not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}: pass --format html, json, md or csv")
        if out is not None:
            _check_out(out, output_format)
        if (run_dir is None) == (ledger is None):
            raise ConfigError(
                "pass exactly one of RUN_DIR (a run's report) or --ledger FILE (a site's own report), "
                f"got {'both' if ledger is not None else 'neither'}"
            )
        if ledger is not None:
            wrong = [name for name, value in (("--run", run_id), ("--ledger-dir", ledger_dir)) if value is not None]
            if wrong:
                verb, them = ("goes", "it") if len(wrong) == 1 else ("go", "them")
                raise ConfigError(f"{' and '.join(wrong)} {verb} with RUN_DIR, not --ledger: drop {them} or report on the run")
            report = privacy_report_for_ledger(ledger, site=site, receipts_path=receipts)
        elif receipts is not None:
            raise ConfigError(
                "--receipts goes with --ledger: a run's report checks the receipts its run store keeps; "
                "pass --ledger FILE --receipts FILE to check a site's ledger"
            )
        elif run_dir is not None:
            report = privacy_report_for_run(run_dir, run_id=run_id, site=site, ledger_dir=ledger_dir)
        text = render_report(report, output_format)
        if out is not None:
            try:
                atomic_write_text(out, text)
            except OSError as exc:
                raise ConfigError(
                    f"cannot write --out {out} ({exc.strerror or exc}): pass a file path you can write to"
                ) from None
    if out is not None:
        counts = f"{plural(len(report['sites']), 'site')}, {plural(len(report['problems']), 'problem')}"
        err_console.print(f"wrote the privacy report ({output_format}, {counts}) to {out}", markup=False)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def _check_out(out: Path, output_format: str) -> None:
    """Refuse an ``--out`` that is not a file path in an existing folder, before any work.

    Raises
    ------
    ConfigError
        When ``out`` is a directory, or its folder does not exist or is not a folder.
    """
    if out.is_dir():
        example = out / f"report.{output_format}"
        raise ConfigError(f"--out {out} is a directory: --out must be a file path, e.g. --out {example}")
    folder = out.parent
    if not folder.exists():
        raise ConfigError(
            f"--out {out}: its folder {folder} does not exist: create it first, or pass a file path in an existing folder"
        )
    if not folder.is_dir():
        raise ConfigError(f"--out {out}: {folder} is not a folder: --out must be a file path in an existing folder")


__all__ = ["privacy", "report_app"]
