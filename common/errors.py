"""fedface's exception tree and its exit codes.

Every error a user can cause (bad path, corrupt image, malformed config, exhausted budget,
tampered ciphertext, unauthenticated node) is a :class:`FedFaceError` subclass with its own
exit code. The CLI boundary catches only these (and pydantic's ``ValidationError``), prints
``ErrorName: message`` on one line to stderr and exits with the code. Anything else is a bug
and keeps its traceback.

Exit codes live in :data:`EXIT_CODES` with a help line each; ``__init_subclass__`` refuses a
subclass whose code is missing there, so the table and the tree cannot drift apart.
"""

from __future__ import annotations

from typing import ClassVar

# code -> one line of help. 0 is success, 1 is an unexpected failure (a bug: traceback shown),
# 2 is a usage error from the CLI parser (Typer/Click's own code).
EXIT_CODES: dict[int, str] = {
    3: "invalid configuration: fix the named key in the config file or flag",
    4: "data not found: check the path given to --data or the config's data.root",
    5: "unreadable or corrupt image: replace or remove the named file, or set data.on-error = 'skip'",
    6: "unknown data layout: point at an ORL, Yale A, Extended Yale B, Olivetti or ImageFolder directory",
    7: "not enough data for the requested split: lower the split sizes or add images",
    8: "checkpoint missing or unreadable: pass a checkpoint (or run directory) written by `fedface train` or `fedface simulate`",
    9: "run directory problem: choose a new --out directory or pass --overwrite",
    10: "privacy budget exhausted: the training would exceed the data set's budget; see `fedface privacy status`",
    11: "privacy ledger unreadable, tampered or behind its receipts: restore the newest backup of the ledger; never edit it by hand",
    12: "encrypted template or search refused (tampered, unsigned, replayed, wrong parameters or unknown site): nothing was stored; re-send from the site",
    13: "key file missing, unreadable or locked: create it with `fedface keys`, or set FEDFACE_KEY_PASSPHRASE for a passphrase-protected key",
}


class FedFaceError(Exception):
    """Base of every error that fedface reports to a user.

    Subclasses declare ``exit_code`` (a key of :data:`EXIT_CODES`).
    """

    exit_code: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("exit_code") is None:
            raise TypeError(f"{cls.__name__} must declare an exit_code")
        if cls.exit_code not in EXIT_CODES:
            raise TypeError(
                f"{cls.__name__}.exit_code={cls.exit_code} has no entry in fedface.common.errors.EXIT_CODES"
            )

    @property
    def help(self) -> str:
        """The exit code's help line."""
        return EXIT_CODES[self.exit_code]


class ConfigError(FedFaceError):
    """A configuration file or flag is malformed or inconsistent."""

    exit_code = 3


class DataNotFoundError(FedFaceError):
    """A data directory or file does not exist or holds no images."""

    exit_code = 4


class CorruptImageError(FedFaceError):
    """An image file could not be decoded; the message names the path and the reason."""

    exit_code = 5

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path
        self.reason = reason


class UnknownLayoutError(FedFaceError):
    """A directory matches none of the supported face-data layouts."""

    exit_code = 6


class SplitError(FedFaceError):
    """A requested split cannot be made from the data at hand."""

    exit_code = 7


class CheckpointError(FedFaceError):
    """A checkpoint is missing, unreadable or of the wrong kind."""

    exit_code = 8


class RunDirError(FedFaceError):
    """A run directory cannot be created or would overwrite another run."""

    exit_code = 9


class BudgetExhaustedError(FedFaceError):
    """A private training session would take a data set's privacy spend past its budget."""

    exit_code = 10


class LedgerError(FedFaceError):
    """A privacy ledger cannot be opened, is of an unknown schema, or fails its integrity check."""

    exit_code = 11


class TemplateError(FedFaceError):
    """An encrypted-template upload, revocation, query or result was refused; nothing stored changed.

    ``reason`` says what kind of refusal it is, for a service to answer with the right status:
    ``"invalid"`` (what the request holds), ``"forbidden"`` (who sent it: an unknown site, a bad
    signature, a stale or replayed envelope) or ``"limit"`` (over a query limit).
    """

    exit_code = 12
    REASONS = ("invalid", "forbidden", "limit")

    def __init__(self, message: str, reason: str = "invalid") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown TemplateError reason {reason!r}")
        super().__init__(message)
        self.reason = reason


class KeyFileError(FedFaceError):
    """A key file is missing, unreadable, malformed, or locked with a passphrase that was not given."""

    exit_code = 13


__all__ = [
    "EXIT_CODES",
    "BudgetExhaustedError",
    "CheckpointError",
    "ConfigError",
    "CorruptImageError",
    "DataNotFoundError",
    "FedFaceError",
    "KeyFileError",
    "LedgerError",
    "RunDirError",
    "SplitError",
    "TemplateError",
    "UnknownLayoutError",
]
