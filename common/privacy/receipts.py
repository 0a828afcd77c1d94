"""Rollback evidence for a site's privacy ledger: signed receipts that live outside the site.

A ledger's hash chains (:mod:`~fedface.common.privacy.ledger`) catch an edited or removed row,
but not a file that is *consistently* shorter: the last session deleted with the triggers and
SQLite's counter put back, or an older backup copied over the file. Both under-count the spend
and pass :meth:`~fedface.common.privacy.ledger.PrivacyLedger.verify`. A receipt closes that gap
as far as a copy kept elsewhere can.

The receipt
    Each charge yields a :class:`Receipt` (:func:`issue_receipt`): the ledger's identity, the
    data set, the session's id in the ledger (the sessions chain's sequence number) and its
    ``row_hash``, the budgets chain's head (last id and ``row_hash``), the data set's epsilon
    total after the charge with its delta and accountant, the run and round, and the time. It
    is signed with the site's Ed25519 *receipt key* and travels with the round's reply as one
    compact JSON string (:meth:`Receipt.to_json`, about 600 bytes); the server keeps it. The
    ledger's identity is the first 32 hex digits of its first session's ``row_hash``: every copy
    of the file keeps it, a new file has another, and no ledger needs a new column or meta row.

The check
    :func:`check_ledger_against` holds a ledger against receipts it is given back (from the
    server, or a JSON-lines file of them, :func:`read_receipts`): after the ledger's own
    :meth:`verify`, every receipt's session and budget row must be in the ledger with the
    receipted ``row_hash``, and the data set's epsilon at the receipt's delta and accountant must
    not be below the receipted one. A deleted last session leaves the ledger *behind* its
    receipts; a restored older backup is behind them or, once charged again, *differs* from
    them at the first re-used id; a reset ``sqlite_sequence`` the same. Each is a
    :class:`~fedface.common.errors.LedgerError` of one line.

What a receipt cannot do (see docs/privacy.md, "Rollback evidence: receipts")
    It detects a rollback to *before* the latest receipt that is checked; a rollback to a state
    after it, a site that sends no receipts, or receipts that are lost or withheld, go
    unnoticed. The signature proves a receipt came from the site's key, so the server cannot
    forge or alter one (it can only withhold); it does not make the site honest, since the site
    holds the key.

The key
    :func:`receipt_key` loads or creates ``receipt.key`` (PKCS#8 PEM, mode 0600) and
    ``receipt.pub`` (SubjectPublicKeyInfo PEM, 0644) in the site's state directory, each
    written atomically and never overwritten. Receipts carry the raw public key (base64url), so
    the server can check each one on arrival and pin the first key a site used.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedface.common.errors import LedgerError
from fedface.common.io import atomic_write_new, atomic_write_text
from fedface.common.privacy.accounting import ACCOUNTANTS, compute_epsilon, format_epsilon
from fedface.common.privacy.ledger import GENESIS_HASH, PrivacyLedger, Session

RECEIPT_VERSION = 1
RECEIPT_KEY_FILE = "receipt.key"
RECEIPT_PUBLIC_KEY_FILE = "receipt.pub"
LEDGER_ID_DIGITS = 32

_DOMAIN = b"fedface-privacy-receipt-v1\n"  # signed before the payload: a receipt signature is nothing else
_EPSILON_RTOL = 1e-9  # accountant float noise; a lost session moves epsilon by far more
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX_ID = re.compile(rf"[0-9a-f]{{{LEDGER_ID_DIGITS}}}")
_FIX = (
    "restore the newest backup of the ledger (one that holds every receipted session) and check it with "
    "`fedface privacy verify --receipts`; charge nothing to it until that passes"
)


@dataclass(frozen=True)
class Receipt:
    """A site's signed statement of its ledger's state right after one charge.

    ``session_id`` is the charged session's id (the sessions chain's sequence number) and
    ``session_hash`` its ``row_hash``; ``budget_id`` / ``budget_hash`` are the budgets chain's
    last row when the receipt was issued (``0`` and 64 zeros before any budget). ``epsilon`` is
    the data set's total after the charge, at ``delta`` with ``accountant``. ``public_key`` and
    ``signature`` (base64url, no padding) are empty until :func:`sign`.
    """

    ledger_id: str
    dataset: str
    session_id: int
    session_hash: str
    budget_id: int
    budget_hash: str
    epsilon: float
    delta: float
    accountant: str
    run_id: str
    round: int | None
    created_at: str
    public_key: str = ""
    signature: str = ""

    def payload(self) -> bytes:
        """The bytes the signature covers: a domain tag and the canonical JSON of every field but ``signature``."""
        body = {"v": RECEIPT_VERSION, **dataclasses.asdict(self)}
        del body["signature"]
        return _DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8")

    def to_json(self) -> str:
        """The signed receipt as one line of compact JSON (one ``str`` for a Flower metrics dict)."""
        if not self.signature:
            raise ValueError("sign the receipt before serialising it")
        body = {"v": RECEIPT_VERSION, **dataclasses.asdict(self)}
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> Receipt:
        """Parse :meth:`to_json`'s output, checking its shape (not its signature: :func:`verify_signature`).

        Raises
        ------
        LedgerError
            When ``text`` is not a fedface receipt of this version.
        """
        try:
            raw = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"not a fedface privacy receipt (not JSON: {exc})") from None
        names = {f.name for f in dataclasses.fields(cls)} | {"v"}
        if not isinstance(raw, dict) or set(raw) != names:
            found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise LedgerError(f"not a fedface privacy receipt (fields {found}, expected {sorted(names)})")
        if raw.pop("v") != RECEIPT_VERSION:
            raise LedgerError(f"privacy receipt of an unknown version; this fedface reads version {RECEIPT_VERSION}")
        problems = _shape_problems(raw)
        if problems:
            raise LedgerError(f"not a well-formed fedface privacy receipt: {'; '.join(problems)}")
        return cls(**{**raw, "epsilon": float(raw["epsilon"]), "delta": float(raw["delta"])})

    def describe(self) -> str:
        """``receipt of session 12 (signed <time>, run R round 3)``, for messages."""
        where = f"run {self.run_id}" + ("" if self.round is None else f" round {self.round}")
        return f"receipt of session {self.session_id} (signed {self.created_at}, {where})"


@dataclass(frozen=True)
class ReceiptKey:
    """A site's receipt signing key and where its two files are."""

    private_key: Ed25519PrivateKey
    private_path: Path
    public_path: Path

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public half (what verifies the site's receipts)."""
        return self.private_key.public_key()

    @property
    def public_id(self) -> str:
        """The raw public key in base64url, as receipts carry it."""
        return public_key_id(self.public_key)


@dataclass(frozen=True)
class ReceiptCheck:
    """What :func:`check_ledger_against` found: the ledger matches ``receipts`` receipts.

    ``latest`` is the receipt of the highest session; ``ledger_sessions`` the ledger's session
    count, so ``ledger_sessions - latest.session_id`` sessions are newer than any receipt (the
    receipts can say nothing of those).
    """

    receipts: int
    latest: Receipt
    ledger_sessions: int

    @property
    def uncovered(self) -> int:
        """Sessions charged after the latest receipt."""
        return self.ledger_sessions - self.latest.session_id


# --- the key -----------------------------------------------------------------------------------


def receipt_key(state_dir: str | Path, *, create: bool = True) -> ReceiptKey:
    """The site's receipt key in ``state_dir`` (``receipt.key``, ``receipt.pub``), created if missing.

    A new private key is written atomically with mode 0600 and an existing one is never
    overwritten (of two processes creating it at once, both end up with the one that was first);
    a missing ``receipt.pub`` is written again from the private key.

    Raises
    ------
    LedgerError
        When the key is missing (``create=False``), unreadable, not Ed25519, or ``receipt.pub``
        does not belong to it.
    """
    directory = Path(state_dir)
    private_path, public_path = directory / RECEIPT_KEY_FILE, directory / RECEIPT_PUBLIC_KEY_FILE
    if not private_path.exists():
        if not create:
            raise LedgerError(f"no receipt key at {private_path}: a site creates it with its first receipt")
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        _write_new(private_path, pem, 0o600)
    private = _read_pem(
        private_path,
        lambda data: serialization.load_pem_private_key(data, password=None),
        "receipt key",
        "check its permissions or restore it from a backup",
    )
    if not isinstance(private, Ed25519PrivateKey):
        raise LedgerError(f"{private_path} is not an Ed25519 receipt key; restore it from a backup")
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not public_path.exists():
        _write_new(public_path, public_pem, 0o644)
    elif public_key_id(load_public_key(public_path)) != public_key_id(private.public_key()):
        raise LedgerError(
            f"{public_path} is not the public half of {private_path}: move it away; it is written again from the key"
        )
    return ReceiptKey(private, private_path, public_path)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """A site's receipt public key from its PEM file (``receipt.pub``).

    Raises
    ------
    LedgerError
        When the file cannot be read or is not an Ed25519 public key.
    """
    p = Path(path)
    key = _read_pem(p, serialization.load_pem_public_key, "receipt public key", "pass the site's receipt.pub")
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"{p} is not an Ed25519 receipt public key; pass the site's receipt.pub")
    return key


def public_key_id(key: Ed25519PublicKey) -> str:
    """The raw public key in base64url, as a receipt carries it (``Receipt.public_key``): which
    receipts of a file a site signed."""
    return _b64(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


# --- issuing and checking one receipt ----------------------------------------------------------


def issue_receipt(ledger: PrivacyLedger, session: Session, key: ReceiptKey | Ed25519PrivateKey) -> Receipt:
    """The signed receipt of ``session``, just charged to ``ledger``.

    Raises
    ------
    LedgerError
        When ``session`` is not in ``ledger``.
    """
    session_hash = ledger.row_hash("sessions", session.id)
    first_hash = ledger.row_hash("sessions", 1)
    if session_hash is None or first_hash is None:
        raise LedgerError(
            f"session {session.id} is not in privacy ledger {ledger.path}: issue its receipt from the ledger that charged it"
        )
    budget_id, budget_hash = ledger.head()["budgets"]
    receipt = Receipt(
        ledger_id=first_hash[:LEDGER_ID_DIGITS],
        dataset=session.dataset,
        session_id=session.id,
        session_hash=session_hash,
        budget_id=budget_id,
        budget_hash=budget_hash,
        epsilon=float(session.epsilon_after),
        delta=float(session.epsilon_delta),
        accountant=session.epsilon_accountant,
        run_id=session.run_id,
        round=session.round,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return sign(receipt, key)


def sign(receipt: Receipt, key: ReceiptKey | Ed25519PrivateKey) -> Receipt:
    """``receipt`` with ``public_key`` set to ``key``'s and signed by it."""
    private = key.private_key if isinstance(key, ReceiptKey) else key
    unsigned = dataclasses.replace(receipt, public_key=public_key_id(private.public_key()), signature="")
    return dataclasses.replace(unsigned, signature=_b64(private.sign(unsigned.payload())))


def verify_signature(receipt: Receipt, public_key: Ed25519PublicKey | None = None) -> None:
    """Check ``receipt``'s signature, under ``public_key`` if given, else under the key it carries.

    With ``public_key`` the receipt must also name that key: a receipt of another site is
    refused. Without it only integrity is shown (anyone can sign with a key of their own): the
    server should pin the first key each site used.

    Raises
    ------
    LedgerError
        When the receipt is unsigned, of another key, or altered after signing.
    """
    if not receipt.signature or not receipt.public_key:
        raise LedgerError(f"the {receipt.describe()} is not signed: take the receipts the server keeps")
    if public_key is not None and receipt.public_key != public_key_id(public_key):
        raise LedgerError(
            f"the {receipt.describe()} is signed by receipt key {receipt.public_key[:12]}..., not by this "
            f"site's key {public_key_id(public_key)[:12]}...: it is another site's receipt, or the wrong public key was given"
        )
    try:
        signer = public_key if public_key is not None else Ed25519PublicKey.from_public_bytes(_unb64(receipt.public_key))
        signer.verify(_unb64(receipt.signature), receipt.payload())
    except (InvalidSignature, ValueError):  # ValueError: not base64 or not a key (binascii.Error is one)
        raise LedgerError(
            f"the {receipt.describe()} fails its signature check: it was altered after the site signed it; "
            "take the receipts the server keeps again"
        ) from None


def parse_receipt(text: str, public_key: Ed25519PublicKey | None = None) -> Receipt:
    """:meth:`Receipt.from_json` then :func:`verify_signature`: what the server does with a reply's receipt."""
    receipt = Receipt.from_json(text)
    verify_signature(receipt, public_key)
    return receipt


def check_receipt_follows(previous: Receipt, current: Receipt) -> None:
    """Check that a site's ``current`` receipt can follow its ``previous`` one (both verified).

    For the server, on each reply of a site within a run (a site's replies in one run come one
    after the other): the ledger must be the same, its chains must not have gone back, and the
    data set's epsilon at the same delta and accountant must not have gone down. The same
    receipt twice (a repeated reply) passes.

    Raises
    ------
    LedgerError
        Naming what went back.
    """
    where = f"the site's {current.describe()}"
    if current.public_key != previous.public_key:
        raise LedgerError(f"{where} is signed by another receipt key than its {previous.describe()}: the site's key changed")
    if current.ledger_id != previous.ledger_id:
        raise LedgerError(
            f"{where} is of ledger {current.ledger_id}, its {previous.describe()} of ledger {previous.ledger_id}: "
            "the site's ledger was replaced"
        )
    for table, prev_id, prev_hash, cur_id, cur_hash in (
        ("session", previous.session_id, previous.session_hash, current.session_id, current.session_hash),
        ("budget", previous.budget_id, previous.budget_hash, current.budget_id, current.budget_hash),
    ):
        if cur_id < prev_id or (cur_id == prev_id and cur_hash != prev_hash):
            raise LedgerError(
                f"{where} shows {table} {cur_id} after its {previous.describe()} showed {table} {prev_id}: "
                "the site's ledger went back (a deleted session or a restored older backup)"
            )
    accounting = (current.dataset, current.delta, current.accountant)
    if accounting == (previous.dataset, previous.delta, previous.accountant) and _below(current.epsilon, previous.epsilon):
        raise LedgerError(
            f"{where} gives data set {current.dataset!r} epsilon {current.epsilon!r}, below the {previous.epsilon!r} of its "
            f"{previous.describe()}: the site's ledger went back"
        )


# --- a ledger against its receipts -------------------------------------------------------------


def check_ledger_against(
    ledger: PrivacyLedger, receipts: Sequence[Receipt], *, public_key: Ed25519PublicKey | None = None
) -> ReceiptCheck:
    """Check ``ledger`` against receipts it issued: :meth:`verify`, then nothing receipted may be missing.

    Parameters
    ----------
    ledger
        The site's ledger.
    receipts
        Receipts of this ledger, e.g. :func:`read_receipts` of a file the server exported; the
        newest matters most, every one is checked.
    public_key
        The site's receipt public key; when given every signature is checked under it (pass
        ``None`` only for receipts already checked, as :func:`read_receipts` does).

    Returns
    -------
    ReceiptCheck
        How many receipts matched, the latest, and the ledger's session count.

    Raises
    ------
    LedgerError
        One line naming the first problem: the ledger fails :meth:`verify`; a receipt is
        unsigned, altered or another key's; the ledger is another file than the receipts'; a
        receipted row differs (a restored backup charged again, a reset sequence); the ledger
        ends before a receipted row (a deleted last session, a restored older backup); the data
        set's epsilon is below a receipted total.
    """
    if not receipts:
        raise LedgerError(f"no receipts to check privacy ledger {ledger.path} against: pass the receipts the server keeps")
    for receipt in receipts:
        if public_key is not None:
            verify_signature(receipt, public_key)
    keys = {r.public_key for r in receipts}
    if len(keys) > 1:
        raise LedgerError(f"the receipts are signed by {len(keys)} different keys: pass the receipts of one site")
    ledger.verify()
    path = ledger.path
    by_session = sorted(receipts, key=lambda r: (r.session_id, r.budget_id))
    first_hash = ledger.row_hash("sessions", 1)
    identity = None if first_hash is None else first_hash[:LEDGER_ID_DIGITS]
    foreign = [r for r in by_session if r.ledger_id != identity]
    if foreign:
        now = "holds no session" if identity is None else f"is ledger {identity}"
        raise LedgerError(
            f"privacy ledger {path} is not the ledger of its receipts: the {foreign[-1].describe()} is of ledger "
            f"{foreign[-1].ledger_id}, this file {now}; it was replaced by another file or emptied; {_FIX}"
        )
    heads = ledger.head()
    for receipt in by_session:  # oldest first: a divergence names the first re-used row
        for table, row_id, row_hash in (
            ("sessions", receipt.session_id, receipt.session_hash),
            ("budgets", receipt.budget_id, receipt.budget_hash),
        ):
            last_id = heads[table][0]
            stored = GENESIS_HASH if row_id == 0 else ledger.row_hash(table, row_id)
            if stored is not None and stored != row_hash:
                raise LedgerError(
                    f"privacy ledger {path} differs from its receipts: its {table} row {row_id} is not the one the "
                    f"{receipt.describe()} vouches for; the ledger was rolled back (an older backup restored, or rows "
                    f"deleted and the sequence reset) and charged again; {_FIX}"
                )
            if row_id > last_id:
                raise LedgerError(
                    f"privacy ledger {path} is behind its receipts: the {receipt.describe()} vouches for {table} row "
                    f"{row_id} (data set {receipt.dataset!r} at epsilon {format_epsilon(receipt.epsilon)}), but the "
                    f"ledger's {table} end at row {last_id}; the last {table} were deleted or an older backup "
                    f"restored; {_FIX}"
                )
    highest: dict[tuple[str, float, str], Receipt] = {}
    for receipt in receipts:
        group = (receipt.dataset, receipt.delta, receipt.accountant)
        if group not in highest or receipt.epsilon > highest[group].epsilon:
            highest[group] = receipt
    for (dataset, delta, accountant), receipt in highest.items():
        try:
            epsilon = compute_epsilon(ledger.history(dataset), delta=delta, accountant=accountant)  # type: ignore[arg-type]
        except ValueError as exc:
            raise LedgerError(
                f"cannot account data set {dataset!r} of privacy ledger {path} with {accountant}: {exc}"
            ) from None
        if _below(epsilon, receipt.epsilon):
            raise LedgerError(
                f"privacy ledger {path} under-counts data set {dataset!r}: epsilon {format_epsilon(epsilon)} at delta "
                f"{delta:g} ({accountant}), but the {receipt.describe()} gives {format_epsilon(receipt.epsilon)}; {_FIX}"
            )
    return ReceiptCheck(receipts=len(receipts), latest=by_session[-1], ledger_sessions=heads["sessions"][0])


def receipts_of_ledger(
    ledger: PrivacyLedger, receipts: Sequence[Receipt], public_key: Ed25519PublicKey | None = None
) -> tuple[list[Receipt], list[Receipt]]:
    """``receipts`` split into this ledger's and other sites' (a file of every site's receipts).

    A receipt is this ledger's when it is signed by ``public_key`` (the site's ``receipt.pub``),
    names this ledger (its ``ledger_id``) or names one of its data sets: each of those must
    then pass :func:`check_ledger_against`, so one of them under another key is still caught,
    and with the key so is one of a replaced ledger or of a data set the ledger lost. Only a
    receipt of another key, another ledger and another data set is another site's.
    """
    first_hash = ledger.row_hash("sessions", 1)
    identity = None if first_hash is None else first_hash[:LEDGER_ID_DIGITS]
    datasets = set(ledger.datasets())
    key_id = None if public_key is None else public_key_id(public_key)
    mine, others = [], []
    for receipt in receipts:
        ours = receipt.public_key == key_id or receipt.ledger_id == identity or receipt.dataset in datasets
        (mine if ours else others).append(receipt)
    return mine, others


# --- receipt files ------------------------------------------------------------------------------


def write_receipts(path: str | Path, receipts: Iterable[Receipt | str]) -> int:
    """Write receipts (objects or their :meth:`~Receipt.to_json` strings) to ``path`` atomically, one per line.

    Each is checked under the key it carries first, so a file never holds a malformed or
    altered receipt. Returns how many were written.

    Raises
    ------
    LedgerError
        On a malformed or altered receipt (nothing is written).
    """
    lines = []
    for item in receipts:
        receipt = parse_receipt(item) if isinstance(item, str) else item
        verify_signature(receipt)
        lines.append(receipt.to_json() + "\n")
    atomic_write_text(path, "".join(lines))
    return len(lines)


def read_receipts(path: str | Path, public_key: Ed25519PublicKey | None = None) -> list[Receipt]:
    """The receipts of a JSON-lines file (blank lines skipped), each signature checked.

    Under ``public_key`` when given (every receipt must be that site's), else under the key
    each one carries.

    Raises
    ------
    LedgerError
        Naming the file and line of an unreadable, malformed, altered or foreign receipt.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"cannot read receipts file {p}: {exc}") from None
    receipts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            receipts.append(parse_receipt(line, public_key))
        except LedgerError as exc:
            raise LedgerError(f"receipts file {p} line {number}: {exc}") from None
    return receipts


# --- helpers -----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _below(value: float, floor: float) -> bool:
    """``value`` is below ``floor`` by more than float noise."""
    return value < floor - _EPSILON_RTOL * max(1.0, abs(floor)) if math.isfinite(floor) else value < floor


def _shape_problems(raw: dict[str, Any]) -> list[str]:
    """What is wrong with a parsed receipt's fields (empty: nothing)."""

    def is_int(value: object, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    def is_real(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)

    def is_b64(value: object, size: int) -> bool:
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_-]*", value):
            return False
        try:
            return len(_unb64(value)) == size
        except ValueError:  # binascii.Error is one
            return False

    checks = {
        "ledger_id": isinstance(raw["ledger_id"], str) and _HEX_ID.fullmatch(raw["ledger_id"]) is not None,
        "dataset": isinstance(raw["dataset"], str) and bool(raw["dataset"]),
        "session_id": is_int(raw["session_id"], 1),
        "session_hash": isinstance(raw["session_hash"], str) and _HEX64.fullmatch(raw["session_hash"]) is not None,
        "budget_id": is_int(raw["budget_id"], 0),
        "budget_hash": isinstance(raw["budget_hash"], str) and _HEX64.fullmatch(raw["budget_hash"]) is not None,
        "epsilon": is_real(raw["epsilon"]) and raw["epsilon"] >= 0,
        "delta": is_real(raw["delta"]) and 0 < raw["delta"] < 1,
        "accountant": raw["accountant"] in ACCOUNTANTS,
        "run_id": isinstance(raw["run_id"], str) and bool(raw["run_id"]),
        "round": raw["round"] is None or is_int(raw["round"], 0),
        "created_at": isinstance(raw["created_at"], str) and _is_time(raw["created_at"]),
        "public_key": is_b64(raw["public_key"], 32),
        "signature": is_b64(raw["signature"], 64),
    }
    return [f"bad {name} {raw[name]!r}" for name, ok in checks.items() if not ok]


def _is_time(text: str) -> bool:
    try:
        dt.datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a key file atomically unless it exists (then another process was first: its key stands)."""
    try:
        atomic_write_new(path, data, mode)
    except OSError as exc:
        raise LedgerError(f"cannot write receipt key {path}: {exc}; check the state directory's permissions") from None


def _read_pem(path: Path, load: Callable[[bytes], object], what: str, fix: str) -> object:
    """``load`` of ``path``'s bytes; one-line LedgerError naming ``what`` and ``fix`` otherwise."""
    try:
        return load(path.read_bytes())
    except OSError as exc:
        raise LedgerError(f"cannot read {what} {path}: {exc}; {fix}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise LedgerError(f"{path} is not a readable {what} ({exc}); {fix}") from None


__all__ = [
    "LEDGER_ID_DIGITS",
    "RECEIPT_KEY_FILE",
    "RECEIPT_PUBLIC_KEY_FILE",
    "RECEIPT_VERSION",
    "Receipt",
    "ReceiptCheck",
    "ReceiptKey",
    "check_ledger_against",
    "check_receipt_follows",
    "issue_receipt",
    "load_public_key",
    "parse_receipt",
    "public_key_id",
    "read_receipts",
    "receipt_key",
    "receipts_of_ledger",
    "sign",
    "verify_signature",
    "write_receipts",
]
