"""The evidence a privacy report holds its figures against: a ledger's integrity, the sites'
signed receipts, and how many images each person has at a site.

Each check returns what it found as report fields (``problems`` one line each) instead of
raising: a report of a tampered ledger or a rolled-back site must still be written, and say so.

Receipts
    With the site's ledger at hand, its receipts (those the server kept, or a file exported by
    ``fedface privacy receipts``) are held against it with
    :func:`~fedface.common.privacy.receipts.check_ledger_against` (nothing receipted may be
    missing, no data set's epsilon below a receipted total), and every receipt's epsilon must
    equal, to the bit, the ledger session it vouches for and the spend the run store recorded
    for its round. Without the ledger (a deployed server's store) only the receipts' signatures,
    their one key, and their epsilons against the run store can be checked: a rollback of the
    ledger is then not checked, so ``verified`` is ``None`` (not ``True``) and the summary says
    the receipts are consistent, not checked against the site's ledger.

People
    A ``fedface simulate`` run directory names every image of every site (``split.json``,
    ``partition.json``); loading the faces they name gives, per site, how many people it holds
    and the most images one person has there (counts only, never a name). Anything else is
    "unknown", never guessed.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedface.common.errors import FedFaceError, LedgerError
from fedface.common.privacy.ledger import PrivacyLedger, Session
from fedface.common.privacy.receipts import (
    RECEIPT_PUBLIC_KEY_FILE,
    Receipt,
    ReceiptCheck,
    check_ledger_against,
    load_public_key,
    parse_receipt,
    public_key_id,
    read_receipts,
    receipts_of_ledger,
    verify_signature,
)
from fedface.server.receipts import StoredReceipt
from fedface.server.reports.sections import plural

#: Receipts the server refused to trust on arrival (``fedface privacy receipts`` leaves them out too).
UNTRUSTED_KINDS = ("unreadable", "foreign-key")
NOT_CHECKED = "not checked: no receipts given"
#: How receipts checked without the site's ledger are labelled: among themselves and against the
#: run store only, so a rollback of the ledger is not ruled out (``verified`` is ``None``).
CONSISTENT = "consistent (not checked against the site's ledger)"


def same_bits(a: float | None, b: float | None) -> bool:
    """Whether two floats are the same IEEE double, bit for bit (``None`` only equals ``None``)."""
    if a is None or b is None:
        return a is b
    return struct.pack("<d", float(a)) == struct.pack("<d", float(b))


def integrity(book: PrivacyLedger) -> str:
    """``"ok"`` when the ledger passes :meth:`~PrivacyLedger.verify`, else its one-line error."""
    try:
        book.verify()
    except LedgerError as exc:
        return str(exc)
    return "ok"


def receipts_result(
    *, checked: bool, count: int, problems: list[str], summary: str, against: str | None, check: ReceiptCheck | None = None,
    consistent_only: bool = False, left_out: int = 0,
) -> dict[str, Any]:
    """The report's ``receipts`` object. ``verified`` is true only when the receipts were held
    against the site's ledger and passed; with ``consistent_only`` (no ledger: the receipts
    checked among themselves and against the run store, a rollback not checked) it is ``None``
    unless a problem was found (then ``False``). ``left_out``: receipts of other sites in a
    receipts file, not held against this ledger."""
    if not checked:
        verified = None
    elif problems:
        verified = False
    else:
        verified = None if consistent_only else True
    latest = None
    if check is not None:
        r = check.latest
        latest = {"session_id": r.session_id, "run_id": r.run_id, "round": r.round, "created_at": r.created_at}
    return {
        "checked": checked,
        "verified": verified,
        "against": against,
        "count": count,
        "left_out": left_out,
        "problems": problems,
        "summary": summary,
        "latest": latest,
        "sessions_after_latest": None if check is None else check.uncovered,
    }


def _where(run_id: str, round_: int | None) -> str:
    return f"run {run_id}" + ("" if round_ is None else f" round {round_}")


def _epsilon_checks(
    receipts: Sequence[Receipt], *, sessions: Mapping[int, Session] | None, reported: Mapping[tuple[str, int], float]
) -> list[str]:
    """Each receipt's epsilon against the ledger session it names and the run store's figure of its round."""
    problems = []
    for r in receipts:
        session = None if sessions is None else sessions.get(r.session_id)
        if session is not None and session.dataset == r.dataset and not same_bits(session.epsilon_after, r.epsilon):
            problems.append(
                f"the {r.describe()} gives epsilon {r.epsilon!r}, but the ledger's session {r.session_id} "
                f"records {session.epsilon_after!r}"
            )
        if r.round is not None and (r.run_id, r.round) in reported and not same_bits(reported[(r.run_id, r.round)], r.epsilon):
            problems.append(
                f"the {r.describe()} gives epsilon {r.epsilon!r}, but the run store records "
                f"{reported[(r.run_id, r.round)]!r} for {_where(r.run_id, r.round)}"
            )
    return problems


def _parse_stored(stored: Sequence[StoredReceipt], key: Any) -> tuple[list[Receipt], list[str]]:
    """The stored receipts the server trusted, parsed (under ``key`` if given); the problems seen."""
    parsed, problems = [], []
    for s in stored:
        where = _where(s.run_id, s.round)
        if s.problem is not None:
            problems.append(f"{where}: the server found on arrival: {s.problem}")
        if s.problem_kind in UNTRUSTED_KINDS:
            continue
        try:
            parsed.append(parse_receipt(s.receipt, key))
        except LedgerError as exc:
            problems.append(f"{where}: {exc}")
    return parsed, problems


def _against_ledger(book: PrivacyLedger, receipts: list[Receipt]) -> tuple[ReceiptCheck | None, list[str]]:
    try:
        return check_ledger_against(book, receipts), []
    except LedgerError as exc:
        return None, [str(exc)]


def _passed(check: ReceiptCheck, count: int) -> str:
    since = ""
    if check.uncovered:
        since = f"; {plural(check.uncovered, 'session')} charged since {'has' if check.uncovered == 1 else 'have'} no receipt yet"
    return (
        f"the ledger matches its {plural(count, 'receipt')} (latest: {check.latest.describe()}): it was not rolled back "
        f"behind {'it' if count == 1 else 'them'}{since}"
    )


def stored_receipts_with_ledger(
    stored: Sequence[StoredReceipt],
    book: PrivacyLedger,
    *,
    key_dir: Path,
    reported: Mapping[tuple[str, int], float],
) -> dict[str, Any]:
    """The receipts the run store keeps for one site, held against that site's ledger."""
    if not stored:
        return receipts_result(
            checked=False, count=0, problems=[], against=None,
            summary="not checked: the run store holds no receipts of this site",
        )
    key_path = key_dir / RECEIPT_PUBLIC_KEY_FILE
    key = None
    note = ""
    if key_path.is_file():
        try:
            key = load_public_key(key_path)
        except LedgerError as exc:
            note = f" ({exc}; signatures checked under the key each receipt carries)"
    else:
        note = f" (no {RECEIPT_PUBLIC_KEY_FILE} beside the ledger: signatures checked under the key each receipt carries)"
    parsed, problems = _parse_stored(stored, key)
    check = None
    if parsed:
        check, found = _against_ledger(book, parsed)
        problems += found
    sessions = {s.id: s for s in book.sessions()}
    problems += _epsilon_checks(parsed, sessions=sessions, reported=reported)
    if problems:
        summary = f"{plural(len(stored), 'receipt')} held against the ledger: {plural(len(problems), 'problem')}{note}"
    elif check is not None:
        summary = _passed(check, len(parsed)) + note
    else:
        summary = "no receipt the server trusted"
    return receipts_result(checked=True, count=len(stored), problems=problems, summary=summary, against="ledger", check=check)


def stored_receipts_alone(stored: Sequence[StoredReceipt], *, reported: Mapping[tuple[str, int], float]) -> dict[str, Any]:
    """The receipts the run store keeps for one site, without its ledger: signatures, one key, epsilons."""
    if not stored:
        return receipts_result(
            checked=False, count=0, problems=[], against=None,
            summary="not checked: the run store holds no receipts of this site",
        )
    parsed, problems = _parse_stored(stored, None)
    if len({r.public_key for r in parsed}) > 1:
        problems.append(f"the site's receipts are signed by {len({r.public_key for r in parsed})} different keys")
    problems += _epsilon_checks(parsed, sessions=None, reported=reported)
    rollback = (
        "the site's ledger was not available, so a rollback of it is not checked: the site checks that with "
        "`fedface report privacy --ledger LEDGER --receipts FILE` (receipts from `fedface privacy receipts`)"
    )
    if problems:
        summary = f"{plural(len(stored), 'receipt')} in the run store: {plural(len(problems), 'problem')}; {rollback}"
    else:
        are = "is" if len(parsed) == 1 else "are"
        summary = (
            f"{CONSISTENT}: {plural(len(parsed), 'receipt')} in the run store {are} signed by one key and agree with its "
            f"figures; {rollback}"
        )
    return receipts_result(
        checked=True, count=len(stored), problems=problems, summary=summary, against="run store", consistent_only=True
    )


def receipts_file(book: PrivacyLedger, path: Path | None, *, key_path: Path | None = None) -> tuple[list[Receipt], dict[str, Any]]:
    """A receipts file (``fedface privacy receipts``) held against a ledger: the receipts read and the result.

    The file may hold every site's receipts (the export without ``--site``): only this
    ledger's (:func:`~fedface.common.privacy.receipts.receipts_of_ledger`: signed by the
    ``receipt.pub`` beside the ledger, or naming the ledger or one of its data sets) are held
    against it, each under the site's key as before; the others are counted in ``left_out``
    and named in the summary. A file of other sites' receipts only is one problem that says so.

    Raises
    ------
    LedgerError
        When ``path`` is given but is not a file (what to check against is missing).
    """
    if path is None:
        return [], receipts_result(checked=False, count=0, problems=[], summary=NOT_CHECKED, against=None)
    if not path.is_file():
        raise LedgerError(f"receipts file {path} does not exist: export it with `fedface privacy receipts --run-store ... --out FILE`")
    key_file = key_path if key_path is not None else book.path.parent / RECEIPT_PUBLIC_KEY_FILE
    problems: list[str] = []
    key = None
    if not key_file.is_file():
        problems.append(f"no receipt public key at {key_file}: the receipts cannot be tied to this site")
    else:
        try:
            key = load_public_key(key_file)
        except LedgerError as exc:
            problems.append(str(exc))
    try:
        every = read_receipts(path)  # each signature under the key it carries: an altered receipt fails here
    except LedgerError as exc:
        every = []
        problems.append(str(exc))
    mine, others = receipts_of_ledger(book, every, key)
    receipts: list[Receipt] = []
    if mine and key is not None:
        foreign = [r for r in mine if r.public_key != public_key_id(key)]
        if foreign:
            problems.append(_foreign(path, foreign, key))
        receipts = [r for r in mine if r.public_key == public_key_id(key)]
    check = None
    if receipts:
        check, found = _against_ledger(book, receipts)
        problems += found
        problems += _epsilon_checks(receipts, sessions={s.id: s for s in book.sessions()}, reported={})
    elif every and not mine:
        problems = [_only_others(path, others, book, signed=key is not None)]  # the one problem: the wrong file
    elif not every and not problems:
        problems.append(f"receipts file {path} holds no receipts")
    left = _left_out(others) if mine else ""
    if problems or check is None:
        summary = f"receipts file {path.name} held against the ledger: {plural(len(problems), 'problem')}{left}"
    else:
        summary = _passed(check, len(receipts)) + left
    return receipts, receipts_result(
        checked=True, count=len(receipts), problems=problems, summary=summary, against="ledger", check=check,
        left_out=len(others),
    )


def _datasets(receipts: Sequence[Receipt]) -> str:
    return ", ".join(map(repr, sorted({r.dataset for r in receipts})))


def _left_out(others: Sequence[Receipt]) -> str:
    if not others:
        return ""
    return f"; {plural(len(others), 'receipt')} of other sites (data sets {_datasets(others)}) left out"


def _foreign(path: Path, foreign: Sequence[Receipt], key: Any) -> str:
    """The problem of this ledger's receipts (its data sets, or itself) that its site's key did not sign."""
    first = f"the {foreign[0].describe()} is not signed by this site's key"
    try:
        verify_signature(foreign[0], key)
    except LedgerError as exc:
        first = str(exc)
    more = f" (and {plural(len(foreign) - 1, 'more receipt')} of this ledger's data sets like it)" if len(foreign) > 1 else ""
    return (
        f"receipts file {path}: {first}{more}; if another site uses the same data set name, export this site's receipts "
        "alone with `fedface privacy receipts --site SITE`"
    )


def _only_others(path: Path, others: Sequence[Receipt], book: PrivacyLedger, *, signed: bool) -> str:
    """The one problem of a receipts file that holds no receipt of this ledger."""
    names = book.datasets()
    site = names[0] if len(names) == 1 else "SITE"  # a site's data set is named after it unless privacy.dataset is set
    return (
        f"receipts file {path} holds receipts of other sites only (data sets {_datasets(others)}), none of this "
        f"ledger's data sets ({', '.join(map(repr, names)) or 'none'})" + (" nor signed by its site's key" if signed else "")
        + f": export this site's with `fedface privacy receipts --run-store RUN_STORE --site {site} --out FILE`"
    )


def people_of_run(run_dir: Path | None, data: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], str]:
    """Per simulated site name: ``{identities, max_images_per_person}`` from the run directory's
    ``split.json`` and ``partition.json`` and the faces they name; and where that came from
    (or why it is unknown)."""
    if run_dir is None:
        return {}, "unknown: the run store alone does not record images per person"
    split_path, partition_path = run_dir / "split.json", run_dir / "partition.json"
    if not (split_path.is_file() and partition_path.is_file()):
        return {}, f"unknown: {run_dir} holds no split.json and partition.json (not a `fedface simulate` run)"
    from fedface.common.data import SitePartition, Split, load_faces
    from fedface.common.federated import site_name

    try:
        size = tuple(int(v) for v in data.get("image-size", (32, 32)))
        faces = load_faces(
            str(data.get("root", "")), layout=data.get("layout", "auto"), size=size, on_error=data.get("on-error", "fail")
        )
        train = faces.subset(Split.load(split_path, faces).train)
        partition = SitePartition.load(partition_path, train)
    except (FedFaceError, OSError, TypeError, ValueError) as exc:
        return {}, f"unknown: the faces named by {partition_path.name} could not be loaded ({type(exc).__name__})"
    out = {}
    for k, idx in enumerate(partition.sites):
        counts = np.bincount(train.labels[idx]) if idx.size else np.zeros(0, dtype=np.int64)
        out[site_name(k)] = {
            "identities": int(np.count_nonzero(counts)),
            "max_images_per_person": int(counts.max()) if counts.size else 0,
        }
    return out, f"{split_path.name} and {partition_path.name} of the run directory, and the faces they name"


__all__ = [
    "CONSISTENT",
    "NOT_CHECKED",
    "UNTRUSTED_KINDS",
    "integrity",
    "people_of_run",
    "receipts_file",
    "receipts_result",
    "same_bits",
    "stored_receipts_alone",
    "stored_receipts_with_ledger",
]
