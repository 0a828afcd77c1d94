"""Privacy budget reports: what each site of a run, or each data set of a ledger, spent, as a
plain JSON-able dict (the report's JSON format, schema ``fedface.privacy-report/1``, which the
renderers and the console's privacy page show).

Two builders:

:func:`privacy_report_for_run`
    A run of a run store. Where the sites' ledgers are reachable (``--ledger-dir``, or the
    ``ledgers.json`` of a ``fedface simulate`` run directory) the mechanism and every epsilon
    come from each site's ledger, and are held against the run store's figures (to the bit)
    and the signed receipts it keeps; otherwise (a deployed server's store) from the run store
    alone, as the sites reported them, with the receipts' signatures and figures checked.
    Each site object names where its figures came from (``figures_from``).
:func:`privacy_report_for_ledger`
    A site's own report from its ledger file: every data set, every run it joined, the ledger's
    integrity, and the check against a receipts file when one is given.

The run store is read only through :mod:`fedface.server.queries` and the store's read
methods. Numbers are exact floats (never rounded); only text rounds, the safe way. No image,
embedding, key or identity name is ever read into a report: counts only.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedface.common.errors import ConfigError, LedgerError, RunDirError
from fedface.common.privacy.ledger import PrivacyLedger
from fedface.server.queries import RoundRow, run_timeline, site_spend_series
from fedface.server.reports import evidence
from fedface.server.reports.sections import PROTECTIONS, SCHEMA, run_epsilon_unknown
from fedface.server.reports.sites import FROM_STORE, finish_site, ledger_site, run_site_from_ledger, run_site_from_store
from fedface.server.run_records import RunSummary
from fedface.server.store import RunStore

STORE_FILE = "runs.sqlite"
LEDGERS_FILE = "ledgers.json"
LEDGER_FILE = "ledger.sqlite"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _version() -> str | None:
    try:
        return importlib.metadata.version("fedface")
    except importlib.metadata.PackageNotFoundError:
        return None


def _envelope(kind: str, paths: dict[str, str | None], figures: str) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "generated_at": _now(),
        "fedface_version": _version(),
        "source": {"kind": kind, "figures": figures, "paths": paths},
        "protections": PROTECTIONS,
    }


# --- the run report ----------------------------------------------------------------------------


def _resolve_store(path: Path) -> tuple[Path, Path | None]:
    """(run store file, run directory or None) of a run directory or a run store file."""
    path = Path(path)
    if path.is_dir():
        store = path / STORE_FILE
        if not store.is_file():
            raise RunDirError(
                f"no run store ({STORE_FILE}) in {path}: pass the directory of a `fedface simulate` run or a "
                "deployed server's --run-dir, or the run store file itself"
            )
        return store, path
    if path.is_file():
        return path, path.parent if (path.parent / LEDGERS_FILE).is_file() or (path.parent / "partition.json").is_file() else None
    raise RunDirError(
        f"run directory {path} does not exist: pass the directory of a `fedface simulate` run (it holds {STORE_FILE}) "
        "or a run store file"
    )


def _pick_run(store: RunStore, run_id: str | None) -> RunSummary:
    runs = store.runs()
    if not runs:
        raise RunDirError(f"run store {store.path} holds no run yet: report on it once a run has started")
    if run_id is None:
        return runs[-1]
    for run in runs:
        if run.run_id == run_id:
            return run
    known = ", ".join(r.run_id for r in runs[-10:])
    raise RunDirError(f"no run {run_id!r} in run store {store.path} (its runs: {known}): pass --run with one of them")


def _ledger_root(run_dir: Path | None, ledger_dir: Path | None) -> tuple[Path | None, str]:
    """The folder of the sites' ledgers, and how it was found (or why there is none)."""
    if ledger_dir is not None:
        if not Path(ledger_dir).is_dir():
            raise LedgerError(
                f"ledger directory {ledger_dir} does not exist: pass the folder holding <site>/{LEDGER_FILE} "
                f"(the one a simulate run's {LEDGERS_FILE} names)"
            )
        return Path(ledger_dir), "given"
    if run_dir is None or not (run_dir / LEDGERS_FILE).is_file():
        return None, "not checked: no ledger here (a deployed server's store holds none); the figures are the sites' reports"
    try:
        return Path(json.loads((run_dir / LEDGERS_FILE).read_text(encoding="utf-8"))["ledger_dir"]), LEDGERS_FILE
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"cannot read {run_dir / LEDGERS_FILE} ({exc}): pass --ledger-dir DIR") from None


def _run_section(run: RunSummary, sites: Sequence[str]) -> dict[str, Any]:
    privacy = run.config.get("privacy", {})
    target = privacy.get("epsilon")
    return {
        "run_id": run.run_id,
        "status": run.status,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "rounds_planned": run.rounds_planned,
        "rounds_done": run.rounds_done,
        "secagg": run.secagg,
        "sites": run.sites,
        "site_names": list(sites),
        "target_epsilon": float(target) if isinstance(target, (int, float)) and math.isfinite(target) else None,
        "error": run.error,
    }


def _metric(metrics: dict[str, float], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None or math.isnan(value) else value


def _accuracy_vs_epsilon(rows: Sequence[RoundRow], sites: Sequence[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        here = [r for s in sites for r in s["rounds"] if r["run_id"] == run_id and r["round"] == row.round]
        life = [r["epsilon_lifetime"] for r in here if r["epsilon_lifetime"] is not None]
        runs = [r["epsilon_run"] for r in here if r["epsilon_run"] is not None]
        # a site whose run epsilon is unknown here could be the largest: then so is the largest
        unknown = any(run_epsilon_unknown(s, row.round) for s in sites)
        out.append({
            "round": row.round,
            "verif_acc": _metric(row.metrics, "verif_acc"),
            "verif_auc": _metric(row.metrics, "verif_auc"),
            # an expression run's held-out figures (None in an identity run, and the other way round)
            "expression_acc": _metric(row.metrics, "expression_acc"),
            "expression_macro_f1": _metric(row.metrics, "expression_macro_f1"),
            "max_epsilon_lifetime": max(life, default=None),
            "max_epsilon_run": None if unknown else max(runs, default=None),
        })
    return out


def privacy_report_for_run(
    store_path: Path, *, run_id: str | None = None, site: str | None = None, ledger_dir: Path | None = None
) -> dict[str, Any]:
    """The privacy report of one run: one object per site of the run (see the module docstring).

    Parameters
    ----------
    store_path
        A run store file (``runs.sqlite``) or a run directory holding one.
    run_id
        The run; ``None``: the store's latest.
    site
        Only this site; ``None``: every site the run sampled or heard from.
    ledger_dir
        The folder of the sites' ledgers (``<ledger_dir>/<site>/ledger.sqlite``); ``None``: the
        one a simulate run directory's ``ledgers.json`` names, else none (run store figures).

    Raises
    ------
    RunDirError
        When there is no such directory or run store, the store holds no run, or no run ``run_id``.
    ConfigError
        When ``site`` is not a site of the run.
    LedgerError
        When ``ledger_dir`` is given but missing, or a site's ledger is not a fedface ledger.
    """
    store_file, run_dir = _resolve_store(store_path)
    root, how = _ledger_root(run_dir, ledger_dir)
    generated = _now()
    with RunStore(store_file, create=False) as store:
        run = _pick_run(store, run_id)
        _, rows = run_timeline(store, run.run_id)
        reports = store.site_reports(run_id=run.run_id)
        sampled = {name for record in store.rounds(run.run_id) for name in record.sampled}
        names = sorted({*sampled, *(p.site for r in rows for p in r.participation), *(x.site for x in reports)})
        if site is not None:
            if site not in names:
                raise ConfigError(
                    f"site {site!r} is not a site of run {run.run_id} (its sites: {', '.join(names) or 'none yet'}): "
                    "pass --site with one of them"
                )
            names = [site]
        series = site_spend_series(store)
        people, people_source = evidence.people_of_run(run_dir, run.config.get("data", {}))
        sites = []
        for name in names:
            points = series[name].points if name in series else []
            reported = {(pt.run_id, pt.round): pt.epsilon for pt in points}
            stored = store.receipts(site=name)
            who = {"identities": None, "max_images_per_person": None, **people.get(name, {}), "source": people_source}
            if name not in people and people:
                who["source"] = f"unknown: {name} is not a site of the run directory's partition"
            path = None if root is None else root / name / LEDGER_FILE
            if path is not None and path.is_file():
                dataset = next((json.loads(s.receipt).get("dataset") for s in stored if s.problem_kind is None), name)
                with PrivacyLedger(path, create=False) as book:
                    entry = run_site_from_ledger(
                        name, book, run_id=run.run_id, dataset=str(dataset), rows=rows,
                        reports={x.round: x for x in reports if x.site == name}, stored=stored, reported=reported, people=who,
                    )
            else:
                missing = [] if path is None else [f"no ledger at {path} ({how}): figures from the run store"]
                entry = run_site_from_store(
                    name, run_id=run.run_id, rows=rows, reports=store.site_reports(site=name), points=points,
                    stored=stored, reported=reported, people=who, extra_problems=missing,
                    ledger_note=how if path is None else f"not checked: no ledger at {path}",
                )
            sites.append(entry)
        run_part = _run_section(run, names)
    for entry in sites:
        finish_site(entry, run=run_part, generated_at=generated)
    figures = {s["figures_from"] == FROM_STORE for s in sites}
    report = _envelope(
        "run",
        {"run_store": str(store_file), "run_dir": None if run_dir is None else str(run_dir),
         "ledger_dir": None if root is None else str(root), "ledger": None, "receipts": None},
        "run store" if figures == {True} else "ledger" if figures == {False} else "ledger and run store",
    )
    report["generated_at"] = generated
    report.update(
        run=run_part,
        sites=sites,
        accuracy_vs_epsilon=_accuracy_vs_epsilon(rows, sites, run.run_id),
        problems=[f"{s['site']}: {p}" for s in sites for p in s["problems"]],
    )
    return report


# --- the ledger report -------------------------------------------------------------------------


def privacy_report_for_ledger(ledger_path: Path, *, site: str | None = None, receipts_path: Path | None = None) -> dict[str, Any]:
    """A site's own privacy report from its ledger file: one object per data set.

    Parameters
    ----------
    ledger_path
        The site's ledger (``ledger.sqlite``).
    site
        Only this data set (a simulated site's data set is its name); ``None``: every one.
    receipts_path
        A receipts file exported by ``fedface privacy receipts``, checked against the ledger
        under the ``receipt.pub`` beside it; ``None``: "not checked: no receipts given".

    Raises
    ------
    LedgerError
        When the file is missing or not a fedface ledger, or ``receipts_path`` is not a file.
    ConfigError
        When ``site`` is not a data set of the ledger.
    """
    path = Path(ledger_path)
    if not path.is_file():
        raise LedgerError(f"no privacy ledger at {path}: pass --ledger with a site's ledger file (ledger.sqlite)")
    generated = _now()
    with PrivacyLedger(path, create=False) as book:
        state = evidence.integrity(book)
        names = book.datasets()
        if site is not None:
            if site not in names:
                raise ConfigError(
                    f"data set {site!r} is not in privacy ledger {path} (its data sets: {', '.join(map(repr, names)) or 'none'}): "
                    "pass --site with one of them"
                )
            names = [site]
        receipts, checked = evidence.receipts_file(book, receipts_path)
        sites = [
            ledger_site(book, name, state=state, receipts=checked, count=sum(r.dataset == name for r in receipts))
            for name in names
        ]
    for entry in sites:
        finish_site(entry, run=None, generated_at=generated)
    report = _envelope(
        "ledger",
        {"run_store": None, "run_dir": None, "ledger_dir": None, "ledger": str(path),
         "receipts": None if receipts_path is None else str(receipts_path)},
        "ledger",
    )
    report["generated_at"] = generated
    report.update(
        run=None, sites=sites, accuracy_vs_epsilon=None,
        problems=[f"{s['site']}: {p}" for s in sites for p in s["problems"]],
    )
    return report


__all__ = ["LEDGERS_FILE", "LEDGER_FILE", "STORE_FILE", "privacy_report_for_ledger", "privacy_report_for_run"]
