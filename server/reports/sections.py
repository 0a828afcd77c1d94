"""The parts of a site's privacy report that are pure functions of its figures.

:mod:`fedface.server.reports.privacy` gathers a site's sessions, spend, budget and evidence
from a ledger or a run store; this module turns them into the report's sections: the
mechanism, the accountant, delta against 1/n, group privacy, the budget, what SecAgg+ and
template encryption add, and the paragraph an officer signs. Numbers stay exact floats here;
text rounds a spend *up* and what remains *down*
(:func:`~fedface.common.privacy.accounting.format_epsilon`), and a group-privacy delta up
(:func:`format_up`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from collections.abc import Sequence
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal
from typing import Any

from fedface.common.privacy.accounting import compute_epsilon, format_epsilon

SCHEMA = "fedface.privacy-report/1"
"""The report's ``schema`` value; a change of the JSON's shape that breaks a reader bumps it."""
UNIT_OF_PRIVACY = "one face image"
MECHANISM_NAME = "Poisson-sampled Gaussian (DP-SGD)"
GROUP_SIZES = (1, 2, 5, 10)
"""Numbers of images of one person the group-privacy table always shows (and the largest at the site, if known)."""

PROTECTIONS: dict[str, dict[str, str]] = {
    "dp_sgd": {
        "adds": (
            "Each site trains with DP-SGD: every image's gradient is clipped to the clipping norm and Gaussian noise is "
            "added before anything leaves the site. Every model state the site produces, hence every update it sends and "
            "the final model, is (epsilon, delta)-differentially private for one face image added or removed."
        ),
        "does_not": (
            "It protects one image, not one person: a person with several images gets only the group-privacy bound. "
            "It does not cover the number of images, the identities' count, metrics and metadata, non-private runs, "
            "pre-training data, hyperparameter tuning, side channels or a dishonest site operator."
        ),
    },
    "secagg": {
        "adds": (
            "With SecAgg+ the server sees only the masked sum of at least min-peers sites' DP-noised updates, never one "
            "site's update on its own (unless it colludes with enough of that site's SecAgg+ neighbours)."
        ),
        "does_not": (
            "It does not bound what the sum or the final model reveals about an image: that bound is DP's, the epsilon "
            "in this report. It does not protect against a server that fakes or colludes with other sites (Sybil "
            "nodes), and the figures each reply carries in the clear (images count, DP parameters, spend, receipt) are "
            "outside it."
        ),
    },
    "template_encryption": {
        "adds": (
            "Enrolled face templates (docs/templates.md) leave a site only CKKS-encrypted and signed, are stored and "
            "searched encrypted, and a search tells the asking site only the decision (who matched, or match / no "
            "match), never a score."
        ),
        "does_not": (
            "It does not protect the training data or the model: the encoder that makes templates is as private as "
            "this report says, no more. The server and the key holder together can decrypt every template; the key "
            "holder learns which slots matched; a site holding the encoder can explore with faces of its own."
        ),
    },
}


def accountant_section(name: str | None) -> dict[str, Any]:
    """``{name, library, version}`` of the accountant that composed the spend (Opacus' version installed here)."""
    try:
        version = importlib.metadata.version("opacus")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"name": name, "library": "opacus", "version": version}


def format_up(value: float | None, digits: int = 3, *, down: bool = False) -> str:
    """``value`` with ``digits`` significant digits, rounded *up* (a delta: it must never look
    smaller), or *down* with ``down`` (a noise multiplier: it must never look larger)."""
    if value is None:
        return "-"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    if value == 0:
        return "0"
    # the shortest decimal that reads back as this float, then `digits` significant digits
    rounded = Context(prec=digits, rounding=ROUND_FLOOR if down else ROUND_CEILING).plus(Decimal(repr(float(value))))
    return f"{rounded:.{digits - 1}e}" if not 1e-3 <= abs(value) < 1e4 else f"{rounded.normalize():f}"


def format_delta(value: float | None) -> str:
    """A delta as given (the shortest text that reads back as the same float)."""
    if value is None:
        return "-"
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def run_epsilon_unknown(site: dict[str, Any], round_: int | None) -> bool:
    """Whether a run report's run epsilon after ``round_`` is unknown: the round is at or after
    one the site was charged for without reporting its mechanism (``rounds_unreported``)."""
    unreported = site["mechanism"].get("rounds_unreported") or ()
    return bool(unreported) and round_ is not None and round_ >= min(unreported)


def epsilon_text(value: float | None) -> str:
    """A spend for text: rounded up; ``-`` when unknown."""
    return "-" if value is None else format_epsilon(value, rounding="up")


def remaining_text(value: float | None) -> str:
    """What remains of a budget for text: rounded down; ``-`` without a budget."""
    return "-" if value is None else format_epsilon(value, rounding="down")


def compose(sessions: Sequence[dict[str, Any]], *, delta: float | None, accountant: str | None) -> float:
    """Epsilon of ``sessions`` (report session dicts) composed at ``delta`` with ``accountant`` (0.0 for none).

    Raises
    ------
    ValueError
        When the accountant cannot compute it (PRV at extreme parameters).
    """
    history = tuple((float(s["noise_multiplier"]), float(s["sample_rate"]), int(s["steps"])) for s in sessions)
    if not history:
        return 0.0
    if delta is None or accountant is None:
        raise ValueError("no delta or accountant to compose at")
    return _composed(history, float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _composed(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """compute_epsilon, remembered: a pure function of its arguments, and an accountant call takes
    a tenth of a second (the sites of a simulation share their histories; the console asks again)."""
    return compute_epsilon(history, delta=delta, accountant=accountant)  # type: ignore[arg-type]


def mechanism_section(
    sessions: Sequence[dict[str, Any]], *, sampling: str = "poisson", unreported: Sequence[int] = ()
) -> dict[str, Any]:
    """The DP-SGD mechanism of ``sessions`` (each a report session dict, in charge order).

    A parameter that is the same in every session is given as a number; one that varies is
    ``null`` and ``uniform`` is false: each session's own is in ``sessions``. ``examples`` is
    the largest n of the sessions (the one that makes delta against 1/n hardest to meet).
    ``rounds_unreported`` lists the rounds charged whose mechanism is not known (a site that
    reported a spend but no mechanism): ``rounds`` and ``steps_total`` count the others only.
    """

    def same(key: str) -> Any:
        values = {s[key] for s in sessions}
        return values.pop() if len(values) == 1 else None

    keys = ("sample_rate", "noise_multiplier", "max_grad_norm", "steps")
    uniform = all(len({s[k] for s in sessions}) <= 1 for k in keys)
    secure = {s.get("secure_mode") for s in sessions} - {None}
    return {
        "name": MECHANISM_NAME,
        "sampling": sampling,
        "secure_mode": secure.pop() if len(secure) == 1 else None,
        "sample_rate": same("sample_rate"),
        "noise_multiplier": same("noise_multiplier"),
        "max_grad_norm": same("max_grad_norm"),
        "steps_per_round": same("steps"),
        "steps_total": sum(int(s["steps"]) for s in sessions),
        "rounds": len(sessions),
        "examples": max((int(s["examples"]) for s in sessions if s["examples"] is not None), default=None),
        "uniform": uniform,
        "rounds_unreported": sorted(unreported),
        "sessions": [dict(s) for s in sessions],
    }


def delta_vs_n(delta: float | None, n: int | None) -> dict[str, Any]:
    """Delta against 1/n: publishing one random image outright is (0, 1/n)-DP, so delta must be well below it."""
    if delta is None or not n:
        return {"n": n, "one_over_n": None, "delta_times_n": None, "ok": None}
    return {"n": n, "one_over_n": 1.0 / n, "delta_times_n": delta * n, "ok": delta < 1.0 / n}


def group_privacy(epsilon: float | None, delta: float | None, largest: int | None) -> dict[str, Any]:
    """The group-privacy bound for k images of one person: (k eps, k e^((k-1) eps) delta).

    ``k`` runs over :data:`GROUP_SIZES` and ``largest`` (the most images one person has at the
    site, if known). ``delta`` of an entry is ``null`` when it overflows a float (it is then far
    above 1); ``meaningful`` is false when the delta term reaches 1: no guarantee at all. An
    infinite epsilon (a non-private round) guarantees nothing for any k: epsilon is infinite and
    delta 1 (never NaN, which (k - 1) * inf would give for k = 1).
    """
    sizes = sorted({*GROUP_SIZES, *([largest] if largest else [])})
    entries = []
    for k in sizes:
        if epsilon is not None and math.isinf(epsilon):
            entries.append({"k": k, "epsilon": math.inf, "delta": 1.0, "meaningful": False, "largest_at_site": k == largest})
            continue
        if epsilon is None or delta is None:
            entries.append({"k": k, "epsilon": None, "delta": None, "meaningful": None, "largest_at_site": k == largest})
            continue
        eps_k = k * epsilon
        log_delta = math.log(k) + (k - 1) * epsilon + math.log(delta) if delta > 0 else -math.inf
        try:
            delta_k: float | None = k * math.exp((k - 1) * epsilon) * delta
        except OverflowError:
            delta_k = None
        if delta_k is not None and math.isinf(delta_k):
            delta_k = None
        entries.append(
            {"k": k, "epsilon": eps_k, "delta": delta_k, "meaningful": log_delta < 0.0, "largest_at_site": k == largest}
        )
    return {
        "epsilon": epsilon,
        "delta": delta,
        "max_images_per_person": largest,
        "bound": "k images of one person: epsilon_k = k * epsilon, delta_k = k * exp((k - 1) * epsilon) * delta",
        "entries": entries,
    }


def group_text(entry: dict[str, Any]) -> str:
    """One group-privacy entry for text: epsilon and delta rounded up, or that there is no guarantee."""
    if entry["epsilon"] is None:
        return "unknown"
    if not entry["meaningful"]:
        shown = "above 1" if entry["delta"] is None else format_up(entry["delta"])
        return f"epsilon {epsilon_text(entry['epsilon'])}, delta {shown}: no meaningful guarantee"
    return f"epsilon {epsilon_text(entry['epsilon'])}, delta {format_up(entry['delta'])}"


def budget_section(epsilon: float | None, delta: float | None, lifetime: float | None) -> dict[str, Any]:
    """``{epsilon, delta, remaining}``: remaining is the budget minus the lifetime spend, floored
    at 0; an infinite spend leaves nothing of any budget (never inf - inf, which is NaN)."""
    if epsilon is None or lifetime is None:
        remaining = None
    else:
        remaining = 0.0 if math.isinf(lifetime) else max(0.0, epsilon - lifetime)
    return {"epsilon": epsilon, "delta": delta, "remaining": remaining}


def statement(site: dict[str, Any], *, run: dict[str, Any] | None, generated_at: str) -> str:
    """The plain-language paragraph an officer can sign for one site (figures rounded the safe way)."""
    name = site["site"]
    mech = site["mechanism"]
    eps = site["epsilon"]
    delta = site["delta"]
    acct = site["accountant"]
    people = site["people"]
    parts: list[str] = []
    n = mech["examples"]
    who = f"{n} face images" if n else "an unknown number of face images"
    if people.get("identities"):
        who += f" of {people['identities']} people"
    parts.append(f"Site {name} trained on {who}, which never left the site.")
    where = f" of run {run['run_id']}" if run is not None else ""
    unreported = ", ".join(map(str, mech.get("rounds_unreported") or ()))
    if mech["rounds"]:
        if mech["uniform"]:
            params = (
                f"sample rate {format_up(mech['sample_rate'], 4)}, noise multiplier at least "
                f"{format_up(mech['noise_multiplier'], 4, down=True)}, per-image clipping norm {mech['max_grad_norm']:g}, "
                f"{mech['steps_per_round']} steps a round"
            )
        else:
            params = "parameters that varied between sessions, listed per session"
        if unreported:
            parts.append(
                f"It trained with DP-SGD, the Poisson-sampled Gaussian mechanism ({params}): {mech['steps_total']} steps in "
                f"the {mech['rounds']} round(s){where} whose mechanism it reported; it was also charged for round(s) "
                f"{unreported}, whose mechanism it did not report."
            )
        else:
            parts.append(
                f"It trained with DP-SGD, the Poisson-sampled Gaussian mechanism ({params}): {mech['steps_total']} steps in "
                f"{mech['rounds']} rounds{where}."
            )
    elif unreported:
        parts.append(f"It was charged for round(s) {unreported}{where}, but did not report the mechanism of any of them.")
    else:
        parts.append("No private training session of it is recorded here.")
    if eps["lifetime"] is None:
        parts.append("No privacy spend of this site is known: it reported none and no ledger was read.")
    else:
        alone = ""
        if run is not None:
            alone = (
                "; what this run alone spent is unknown (see the problems)" if eps["run"] is None
                else f"; this run alone spent at most epsilon {epsilon_text(eps['run'])}"
            )
        if eps["sessions"] is not None:
            parts.append(
                f"Composed by the {acct['name']} accountant of {acct['library']} {acct['version']} over every session "
                f"charged to its data set ({eps['sessions']} sessions in {eps['runs']} runs), its privacy loss is at most "
                f"epsilon {epsilon_text(eps['lifetime'])} at delta {format_delta(delta)}{alone}."
            )
        else:
            parts.append(
                f"As the site reported it from its own ledger ({acct['name']} accountant, every session charged to its "
                f"data set), its privacy loss is at most epsilon {epsilon_text(eps['lifetime'])} at delta "
                f"{format_delta(delta)}{alone}"
                + ("" if eps["run"] is None else
                   f" (composed here by {acct['library']} {acct['version']} from the mechanism it reported)")
                + "."
            )
        budget = site["budget"]
        if budget["epsilon"] is None:
            parts.append("No privacy budget is set for this data set, so nothing limits further spending.")
        else:
            parts.append(
                f"Its budget is epsilon {budget['epsilon']:g}; at least {remaining_text(budget['remaining'])} remains."
            )
        parts.append(
            f"This means: for any one face image, adding it to or removing it from the site's data changes the "
            f"probability of any outcome of the training (every update sent and the final model) by at most a factor "
            f"of e^{epsilon_text(eps['lifetime'])}, except with probability {format_delta(delta)}."
        )
        entries = site["group_privacy"]["entries"]
        two = next(e for e in entries if e["k"] == 2)
        line = f"The unit of privacy is {UNIT_OF_PRIVACY}, not one person: a person with 2 images gets {group_text(two)}"
        largest = next((e for e in entries if e["largest_at_site"]), None)
        if largest is not None and largest["k"] != 2:
            line += f", and one with {largest['k']} images (the most one person has here) {group_text(largest)}"
        parts.append(line + ".")
        if site["delta_vs_1_over_n"]["ok"] is False:
            parts.append(f"Delta is not below 1/n ({format_up(site['delta_vs_1_over_n']['one_over_n'])}): the guarantee is weak.")
    parts.append(f"Receipts: {site['receipts']['summary']}.")
    integrity = site["ledger"]["integrity"]
    if site["ledger"]["path"] is not None:
        parts.append("The ledger passes its integrity check." if integrity == "ok" else f"Ledger integrity: {integrity}")
    problems = site["problems"]
    if run is None:
        compared = "the ledger and its receipts" if site["receipts"]["checked"] else "the ledger's sessions and its spend"
    elif site["ledger"]["path"] is not None:
        compared = "the ledger, the run store and the receipts"
    else:
        compared = "the run store and the receipts"
    parts.append(
        f"{len(problems)} problem(s) were found; see the list in this report."
        if problems
        else f"The figures of {compared} agree wherever they were compared."
    )
    sessions = mech["sessions"]
    if sessions:
        parts.append(f"Sessions from {sessions[0]['created_at']} to {sessions[-1]['created_at']} UTC.")
    parts.append(f"Figures from {site['figures_from']}; report generated {generated_at} UTC.")
    return " ".join(parts)


__all__ = [
    "GROUP_SIZES",
    "MECHANISM_NAME",
    "PROTECTIONS",
    "SCHEMA",
    "UNIT_OF_PRIVACY",
    "accountant_section",
    "budget_section",
    "compose",
    "delta_vs_n",
    "epsilon_text",
    "format_delta",
    "format_up",
    "group_privacy",
    "group_text",
    "mechanism_section",
    "remaining_text",
    "run_epsilon_unknown",
    "statement",
]
