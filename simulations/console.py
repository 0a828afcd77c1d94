"""Terminal plumbing shared by the CLI commands: logging to stderr, the error boundary, JSON out.

Human messages (logs, progress, errors) go to stderr; machine-readable results go to stdout.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler

from fedface.common.config import format_validation_error
from fedface.common.errors import FedFaceError

err_console = Console(stderr=True)


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """fedface's loggers to stderr: WARNING if quiet, INFO by default, DEBUG with -v."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger("fedface")
    root.handlers.clear()
    handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn fedface's own errors into ``ErrorName: message`` on stderr and their exit code.

    Only :class:`FedFaceError` and pydantic's ``ValidationError`` are caught: anything else is
    a bug and keeps its traceback.
    """
    try:
        yield
    except FedFaceError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    except ValidationError as exc:
        print(f"ConfigError: {format_validation_error(exc, 'command-line flags')}", file=sys.stderr)
        raise typer.Exit(3) from None


def print_json(obj: Any) -> None:
    """One JSON object on one line of stdout (the last line a caller should parse)."""
    sys.stdout.write(json.dumps(obj, sort_keys=False, allow_nan=True) + "\n")
    sys.stdout.flush()


__all__ = ["err_console", "print_json", "setup_logging", "user_errors"]
