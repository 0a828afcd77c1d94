"""`fedface privacy`: a site's privacy ledger: budgets per data set, the epsilon spent on each, and its
integrity, checked against the site's signed receipts (docs/privacy.md)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedface.common.errors import ConfigError, LedgerError
from fedface.common.privacy.accounting import ACCOUNTANTS, format_epsilon
from fedface.common.privacy.ledger import LEDGER_ENV, PrivacyLedger, Spend, default_ledger_path
from fedface.common.privacy.receipts import (
    RECEIPT_PUBLIC_KEY_FILE,
    ReceiptCheck,
    check_ledger_against,
    load_public_key,
    read_receipts,
)
from fedface.simulations.console import err_console, print_json, user_errors

privacy_app = typer.Typer(
    help="The site's privacy ledger: each data set's budget and the epsilon its DP-SGD sessions spent.",
    no_args_is_help=True,
)

STATE_OK = "ok"
STATE_EXHAUSTED = "budget exhausted"
STATE_NO_BUDGET = "no budget set"

LedgerOption = Annotated[
    Optional[Path],
    typer.Option(
        "--ledger",
        envvar=LEDGER_ENV,
        show_envvar=True,
        help="Privacy ledger file (default ~/.fedface/privacy-ledger.sqlite).",
    ),
]
FormatOption = Annotated[
    str,
    typer.Option("--format", help="text (a table), or json: one JSON object on stdout's last line."),
]


def spend_state(spend: Spend) -> str:
    """``ok``, ``budget exhausted`` (nothing remains) or ``no budget set``."""
    if spend.budget is None:
        return STATE_NO_BUDGET
    return STATE_EXHAUSTED if spend.is_exhausted else STATE_OK


def spend_record(spend: Spend) -> dict[str, Any]:
    """A data set's spend as the JSON row of `fedface privacy status`.

    ``epsilon`` and ``remaining`` are exact; ``epsilon_display`` is rounded up and
    ``remaining_display`` down, so neither flatters the guarantee.
    """
    remaining = spend.remaining
    return {
        "dataset": spend.dataset,
        "sessions": spend.sessions,
        "steps": spend.steps,
        "epsilon": spend.epsilon,
        "epsilon_display": format_epsilon(spend.epsilon),
        "delta": spend.delta,
        "accountant": spend.accountant,
        "budget_epsilon": spend.budget.epsilon if spend.budget is not None else None,
        "remaining": remaining,
        "remaining_display": format_epsilon(remaining, rounding="down") if remaining is not None else None,
        "state": spend_state(spend),
    }


def _check_format(output_format: str) -> None:
    if output_format not in ("text", "json"):
        raise typer.BadParameter(f"expected text or json, got {output_format!r}", param_hint="--format")


def _existing_ledger(ledger: Path | None) -> Path:
    """The ledger file named (or the default); LedgerError when there is none."""
    path = ledger if ledger is not None else default_ledger_path()
    if not path.is_file():
        raise LedgerError(
            f"no privacy ledger exists at {path}: create one with `fedface privacy budget --dataset NAME "
            f"--epsilon E --delta D` or a private `fedface train`, or point --ledger / {LEDGER_ENV} at it"
        )
    return path


def _report(ledger_path: Path, spends: list[Spend], output_format: str) -> None:
    """Print the spends as a table on stdout, or as one JSON object."""
    records = [spend_record(spend) for spend in spends]
    if output_format == "json":
        print_json({"ledger": str(ledger_path), "datasets": records})
        return
    if not records:
        err_console.print(f"privacy ledger {ledger_path} holds no data sets yet")
        return
    table = Table(title=f"privacy ledger {ledger_path}", title_justify="left")
    for name, justify in (
        ("data set", "left"),
        ("sessions", "right"),
        ("steps", "right"),
        ("epsilon", "right"),
        ("delta", "right"),
        ("accountant", "left"),
        ("budget", "right"),
        ("remaining", "right"),
        ("state", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in records:
        state_style = {STATE_OK: "green", STATE_EXHAUSTED: "bold red"}.get(row["state"], "yellow")
        table.add_row(
            row["dataset"],
            str(row["sessions"]),
            str(row["steps"]),
            row["epsilon_display"],
            "-" if row["delta"] is None else f"{row['delta']:g}",
            row["accountant"],
            "-" if row["budget_epsilon"] is None else f"{row['budget_epsilon']:g}",
            "-" if row["remaining_display"] is None else row["remaining_display"],
            f"[{state_style}]{row['state']}[/]",
        )
    console = Console()
    if not console.is_terminal:  # piped: no 80-column default squeezing the columns
        console = Console(width=200)
    console.print(table)


@privacy_app.command()
def status(
    ledger: LedgerOption = None,
    dataset: Annotated[Optional[str], typer.Option(help="Only this data set (default: every data set in the ledger).")] = None,
    output_format: FormatOption = "text",
) -> None:
    """Show each data set's privacy spend against its budget, after checking the ledger's integrity.

    The epsilon spent composes every session ever charged to the data set, across runs and
    rounds; it is shown rounded up, the remaining budget rounded down.
    """
    _check_format(output_format)
    with user_errors():
        path = _existing_ledger(ledger)
        with PrivacyLedger(path, create=False) as book:
            book.verify()
            names = book.datasets()
            if dataset is not None:
                if dataset not in names:
                    known = ", ".join(repr(n) for n in names) or "none"
                    raise ConfigError(f"--dataset {dataset!r} is not in privacy ledger {path} (data sets: {known})")
                names = [dataset]
            spends = [book.spend(name) for name in names]
    _report(path, spends, output_format)


@privacy_app.command()
def budget(
    dataset: Annotated[str, typer.Option(help="Data set name (as `fedface train` records it, e.g. its data root).")],
    epsilon: Annotated[float, typer.Option(help="Total epsilon every session on the data set may spend together (> 0).")],
    delta: Annotated[float, typer.Option(help="Delta the spend is accounted at, in (0, 1); well below 1/examples.")],
    accountant: Annotated[str, typer.Option(help="rdp or prv (tighter, slower): how sessions are composed.")] = "rdp",
    ledger: LedgerOption = None,
    output_format: FormatOption = "text",
) -> None:
    """Set a data set's privacy budget (appended: the latest applies, earlier ones stay recorded).

    Creates the ledger file if there is none. Prints the data set's status under the new budget.
    """
    _check_format(output_format)
    if accountant not in ACCOUNTANTS:
        raise typer.BadParameter(f"expected {' or '.join(ACCOUNTANTS)}, got {accountant!r}", param_hint="--accountant")
    with user_errors():
        problems = []
        if not (math.isfinite(epsilon) and epsilon > 0):
            problems.append(f"--epsilon must be a finite number > 0, got {epsilon!r}")
        if not 0 < delta < 1:
            problems.append(f"--delta must be in (0, 1), got {delta!r}")
        if problems:
            raise ConfigError("; ".join(problems))
        path = ledger if ledger is not None else default_ledger_path()
        with PrivacyLedger(path) as book:
            book.verify()
            book.set_budget(dataset, epsilon=epsilon, delta=delta, accountant=accountant)  # type: ignore[arg-type]
            spend = book.spend(dataset)
    if spend.is_exhausted:
        err_console.print(
            f"[yellow]warning:[/] data set {dataset!r} has already spent epsilon {format_epsilon(spend.epsilon)}, "
            f"at or over the new budget {epsilon:g}: further private training on it will be refused"
        )
    _report(path, [spend], output_format)


@privacy_app.command()
def verify(
    ledger: LedgerOption = None,
    receipts: Annotated[
        Optional[Path],
        typer.Option(
            "--receipts",
            exists=True,
            dir_okay=False,
            help="JSON-lines file of the site's signed receipts as the server keeps them (without it: no rollback check).",
        ),
    ] = None,
    public_key: Annotated[
        Optional[Path], typer.Option("--public-key", help="The site's receipt public key (default: --state-dir's receipt.pub).")
    ] = None,
    state_dir: Annotated[
        Optional[Path], typer.Option("--state-dir", help="The site's state directory (default: the ledger's directory).")
    ] = None,
    output_format: FormatOption = "text",
) -> None:
    """Check the ledger's integrity and, with --receipts, that it was not rolled back.

    Without --receipts: the hash chains, ids, counters and triggers only, which a deleted last
    session or a restored older backup passes. With --receipts (the receipts the server keeps
    for this site, each signed by its receipt key): every receipted session and budget must
    still be in the ledger, unchanged, and no data set's epsilon below its receipted total.
    Exits 11 with one line naming the problem.
    """
    _check_format(output_format)
    if receipts is None and public_key is not None:
        raise typer.BadParameter("--public-key checks receipts: pass --receipts FILE too", param_hint="--public-key")
    with user_errors():
        path = _existing_ledger(ledger)
        key = None
        if receipts is not None:
            key_path = public_key if public_key is not None else (state_dir or path.parent) / RECEIPT_PUBLIC_KEY_FILE
            if not key_path.is_file():
                raise LedgerError(
                    f"no receipt public key at {key_path}: pass --public-key (the site's {RECEIPT_PUBLIC_KEY_FILE}) "
                    "or --state-dir"
                )
            key = load_public_key(key_path)
        found = read_receipts(receipts, key) if receipts is not None else None
        if found is not None and not found:
            raise LedgerError(f"receipts file {receipts} holds no receipts: nothing to check privacy ledger {path} against")
        with PrivacyLedger(path, create=False) as book:
            if found is None:
                book.verify()
                sessions = book.head()["sessions"][0]
                check = None
            else:
                check = check_ledger_against(book, found)
                sessions = check.ledger_sessions
    if output_format == "json":
        print_json(_verify_record(path, sessions, check))
    elif check is None:
        typer.echo(
            f"privacy ledger {path} ({sessions} sessions) passes its own integrity check (hash chains, ids, counters, triggers)"
        )
    else:
        since = f"; {check.uncovered} sessions charged since have no receipt yet" if check.uncovered else ""
        typer.echo(
            f"privacy ledger {path} ({sessions} sessions) is intact and matches its {check.receipts} receipts "
            f"(latest: {check.latest.describe()}){since}"
        )
    if check is None:
        err_console.print(
            "[yellow]warning:[/] without --receipts a deleted last session or a restored older backup cannot be "
            "detected: pass the receipts the server keeps for this site"
        )


@privacy_app.command()
def receipts(
    run_store: Annotated[Path, typer.Option("--run-store", help="The server's run store: a run directory (its runs.sqlite) or the file.")],
    out: Annotated[Path, typer.Option("--out", help="JSON-lines file to write, for `fedface privacy verify --receipts`.")],
    site: Annotated[Optional[str], typer.Option("--site", help="Only this site's receipts (default: every site's).")] = None,
) -> None:
    """Export the sites' signed ledger receipts that the server keeps.

    Run by the coordinator; a site checks its ledger against them with `fedface privacy verify
    --receipts`. Receipts the server found unreadable or signed by another key than the site's first are
    left out; those that showed a ledger going back are kept (they are the evidence). Each
    problem the server found on arrival is printed.
    """
    from fedface.server.receipts import export_receipts
    from fedface.server.store import RunStore

    with user_errors():
        if run_store.is_dir():
            run_store = run_store / "runs.sqlite"
        with RunStore(run_store, create=False) as store:
            stored = store.receipts(site=site)
        if not stored:
            raise LedgerError(f"run store {run_store} holds no receipts{f' of site {site}' if site else ''}: nothing to export")
        for r in stored:
            if r.problem is not None:
                err_console.print(f"run {r.run_id} round {r.round}, {r.site}: {r.problem}", markup=False)
        written = export_receipts(stored, out)
    err_console.print(f"wrote {written} receipts of {len({r.site for r in stored})} site(s) to {out}")


def _verify_record(path: Path, sessions: int, check: ReceiptCheck | None) -> dict[str, Any]:
    """`fedface privacy verify --format json`'s object (``receipts`` and the rest ``null`` without receipts)."""
    latest = None if check is None else check.latest
    receipt = None
    if latest is not None:
        receipt = {"session_id": latest.session_id, "created_at": latest.created_at, "run_id": latest.run_id, "round": latest.round}
    return {
        "ledger": str(path),
        "intact": True,
        "rollback_checked": check is not None,
        "sessions": sessions,
        "receipts": None if check is None else check.receipts,
        "latest_receipt": receipt,
        "sessions_after_latest_receipt": None if check is None else check.uncovered,
    }


__all__ = ["privacy_app", "spend_record", "spend_state"]
