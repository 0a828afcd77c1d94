"""The parts of a site's privacy report that are pure functions of its figures.

:mod:`fedface.server.reports.privacy` gathers a site's sessions, spend, budget and evidence
from a ledger or a run store; this module turns them into the report's sections: the
mechanism, the accountant, delta against 1/n, group privacy, the budget, what SecAgg+ and
template encryption add, and the paragraph an officer signs. Numbers stay exact floats here;
text rounds a spend *up* and what remains *down*
(:func:`~fedface.common.privacy.accounting.format_epsilon`), and a group-privacy delta up
(:func:`format_up`); a group delta at or above 1 is shown as :data:`NO_GUARANTEE`, never as a
number. Text shows a time to the second in UTC (:func:`time_text`) and counts in words with
their plural (:func:`plural`).
"""

from __future__ import annotations

import datetime as dt
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
MEANINGFUL_DELTA_UNKNOWN_N = 1e-3
"""The group delta below which a guarantee counts as meaningful when the site's number of
images n is unknown (with n known: 1/n, the standard delta is held to)."""
NO_GUARANTEE = "\u2265 1 (no meaningful guarantee)"
"""How text shows a group-privacy delta at or above 1 (or too large for a float): a probability
bound of 1 or more says nothing, so no number is printed."""

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
    smaller), or *down* with ``down`` (a noise multiplier: it must never look larger), written
    as ``f"{x:g}"`` writes it (``1e-05``, ``0.0594``, ``3.89e+09``), as every delta of a report is."""
    if value is None:
        return "-"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    if value == 0:
        return "0"
    # the shortest decimal that reads back as this float, then `digits` significant digits; `:g`
    # (6 significant digits) writes that decimal back exactly, since digits <= 6
    rounded = Context(prec=digits, rounding=ROUND_FLOOR if down else ROUND_CEILING).plus(Decimal(repr(float(value))))
    return f"{float(rounded):g}"


def format_delta(value: float | None) -> str:
    """A delta as given (the shortest text that reads back as the same float)."""
    if value is None:
        return "-"
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def time_text(value: str | None) -> str:
    """An ISO-8601 time for text that says "UTC" beside it: to the second, in UTC, without the
    offset (``2026-05-09 10:01:00``); ``-`` for none. The JSON keeps the full ISO time. A time
    without an offset is the store's, which writes UTC; one that does not parse is shown as given."""
    if not value:
        return "-"
    try:
        at = dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return str(value)
    if at.tzinfo is not None:
        at = at.astimezone(dt.timezone.utc)
    return at.strftime("%Y-%m-%d %H:%M:%S")


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 round``, ``3 rounds`` (``many``: the plural when it is not ``word + "s"``)."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def rounds_text(rounds: Sequence[int]) -> str:
    """``round 2`` or ``rounds 2, 3`` (empty for none)."""
    if not rounds:
        return ""
    return ("round " if len(rounds) == 1 else "rounds ") + ", ".join(map(str, rounds))


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


def _group_delta(k: int, epsilon: float, delta: float) -> float | None:
    """k e^((k-1) epsilon) delta for a finite ``epsilon``; ``None`` when it overflows a float (far above 1)."""
    try:
        value = k * math.exp((k - 1) * epsilon) * delta
    except OverflowError:
        return None
    return None if math.isinf(value) else value


def _meaningful(delta_k: float | None, threshold: float) -> bool:
    return delta_k is not None and delta_k < threshold


def _no_guarantee_from(epsilon: float, delta: float, threshold: float) -> int | None:
    """The smallest k whose group delta is not below ``threshold`` (``None``: none, as with delta 0).

    The bound grows with k (epsilon >= 0), and k * delta >= threshold once k >= threshold /
    delta, so a binary search over 1 .. ceil(threshold / delta) finds it exactly."""
    if delta <= 0:
        return None
    low, high = 1, max(1, math.ceil(threshold / delta))
    if _meaningful(_group_delta(high, epsilon, delta), threshold):
        high += 1  # float noise at the very top: k * delta just below the threshold
    while low < high:
        mid = (low + high) // 2
        if _meaningful(_group_delta(mid, epsilon, delta), threshold):
            low = mid + 1
        else:
            high = mid
    return low


def group_privacy(epsilon: float | None, delta: float | None, largest: int | None, n: int | None = None) -> dict[str, Any]:
    """The group-privacy bound for k images of one person: (k eps, k e^((k-1) eps) delta).

    ``k`` runs over :data:`GROUP_SIZES` and ``largest`` (the most images one person has at the
    site, if known). ``delta`` of an entry is the bound as computed, ``null`` when it overflows a
    float (it is then far above 1). ``meaningful`` is true only while the group delta is below
    ``meaningful_threshold``: 1/n, the standard the report holds the site's own delta to
    (:func:`delta_vs_n`; n the site's images), or :data:`MEANINGFUL_DELTA_UNKNOWN_N` when n is
    unknown (``meaningful_threshold_basis`` says which). ``no_guarantee_from`` is the smallest k
    with no meaningful guarantee (every larger k has none either; ``null`` when the bound is
    unknown). An infinite epsilon (a non-private round) guarantees nothing for any k: epsilon is
    infinite and delta 1 (never NaN, which (k - 1) * inf would give for k = 1).
    """
    threshold = 1.0 / n if n else MEANINGFUL_DELTA_UNKNOWN_N
    basis = f"1/n, n = {n} images" if n else f"{MEANINGFUL_DELTA_UNKNOWN_N:g}: the number of images n is unknown"
    sizes = sorted({*GROUP_SIZES, *([largest] if largest else [])})
    entries = []
    first: int | None = None
    for k in sizes:
        if epsilon is not None and math.isinf(epsilon):
            entries.append({"k": k, "epsilon": math.inf, "delta": 1.0, "meaningful": False, "largest_at_site": k == largest})
            first = 1
            continue
        if epsilon is None or delta is None:
            entries.append({"k": k, "epsilon": None, "delta": None, "meaningful": None, "largest_at_site": k == largest})
            continue
        delta_k = _group_delta(k, epsilon, delta)
        entries.append({
            "k": k, "epsilon": k * epsilon, "delta": delta_k, "meaningful": _meaningful(delta_k, threshold),
            "largest_at_site": k == largest,
        })
    if first is None and epsilon is not None and delta is not None:
        first = _no_guarantee_from(epsilon, delta, threshold)
    return {
        "epsilon": epsilon,
        "delta": delta,
        "max_images_per_person": largest,
        "bound": "k images of one person: epsilon_k = k * epsilon, delta_k = k * exp((k - 1) * epsilon) * delta",
        "images": n or None,
        "meaningful_threshold": threshold,
        "meaningful_threshold_basis": basis,
        "no_guarantee_from": first,
        "entries": entries,
    }


def group_delta_text(value: float | None) -> str:
    """A group-privacy delta for text: rounded up, or :data:`NO_GUARANTEE` at or above 1 (``None``: it overflowed)."""
    return NO_GUARANTEE if value is None or value >= 1.0 else format_up(value)


def threshold_text(group: dict[str, Any]) -> str:
    """The group delta a meaningful guarantee must stay below, for text: ``1/n = 1/40`` (exact) or ``0.001 (n unknown)``."""
    n = group["images"]
    return f"1/n = 1/{n}" if n else f"{group['meaningful_threshold']:g} (the number of images n is unknown)"


def group_text(entry: dict[str, Any], group: dict[str, Any] | None = None) -> str:
    """One group-privacy entry for text: epsilon and delta rounded up, or that there is no
    meaningful guarantee (with ``group``, the threshold its delta is not below)."""
    if entry["epsilon"] is None:
        return "unknown"
    shown = f"epsilon {epsilon_text(entry['epsilon'])}, delta {group_delta_text(entry['delta'])}"
    if entry["meaningful"] or entry["delta"] is None or entry["delta"] >= 1.0:
        return shown  # a delta at or above 1 already says there is no guarantee
    return shown + ": no meaningful guarantee" + ("" if group is None else f" (delta not below {threshold_text(group)})")


def group_sentence(group: dict[str, Any]) -> str:
    """What the group bound means for a person, for the statement: from which k on there is no
    meaningful guarantee, and what the most images one person has at the site get."""
    entries = {e["k"]: e for e in group["entries"]}
    start = f"The unit of privacy is {UNIT_OF_PRIVACY}, not one person"
    first, largest = group["no_guarantee_from"], group["max_images_per_person"]
    if entries[1]["epsilon"] is None:
        return f"{start}: what it means for a person with several images is unknown, as the spend or its delta is."
    below = f"the group delta is not below {threshold_text(group)}"
    if first is None:
        text = f"{start}: a person with 2 images gets {group_text(entries[2])}"
    elif first == 1:
        why = "epsilon is infinite" if math.isinf(group["epsilon"]) else below
        return f"{start}, and even for one image there is no meaningful guarantee ({why})."
    elif first == 2:
        two = entries[2]
        text = (f"{start}: for a person with 2 or more images there is no meaningful guarantee ({below}; with 2 images: "
                f"epsilon {epsilon_text(two['epsilon'])}, delta {group_delta_text(two['delta'])})")
    else:
        text = (f"{start}: a person with 2 images gets {group_text(entries[2])}; from {first} images on, there is no "
                f"meaningful guarantee ({below})")
    if largest is None:
        return text + "; how many images one person has at this site is not known."
    if first is not None and largest >= first:
        return text + f"; the most one person has here is {largest} images: no meaningful guarantee for them."
    if largest <= 2:
        return text + f"; {plural(largest, 'image')} is the most one person has here."
    return text + f"; one with {largest} images, the most one person has here, gets {group_text(entries[largest])}."


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
    missing = mech.get("rounds_unreported") or ()
    unreported = rounds_text(missing)
    if mech["rounds"]:
        if mech["uniform"]:
            params = (
                f"sample rate {format_up(mech['sample_rate'], 4)}, noise multiplier at least "
                f"{format_up(mech['noise_multiplier'], 4, down=True)}, per-image clipping norm {mech['max_grad_norm']:g}, "
                f"{plural(mech['steps_per_round'], 'step')} a round"
            )
        else:
            params = "parameters that varied between sessions, listed per session"
        steps = plural(mech["steps_total"], "step")
        if unreported:
            parts.append(
                f"It trained with DP-SGD, the Poisson-sampled Gaussian mechanism ({params}): {steps} in "
                f"the {plural(mech['rounds'], 'round')}{where} whose mechanism it reported; it was also charged for "
                f"{unreported}, whose mechanism it did not report."
            )
        else:
            parts.append(
                f"It trained with DP-SGD, the Poisson-sampled Gaussian mechanism ({params}): {steps} in "
                f"{plural(mech['rounds'], 'round')}{where}."
            )
    elif unreported:
        parts.append(
            f"It was charged for {unreported}{where}, but did not report the mechanism of "
            + ("it." if len(missing) == 1 else "any of them.")
        )
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
                f"charged to its data set ({plural(eps['sessions'], 'session')} in {plural(eps['runs'], 'run')}), its "
                f"privacy loss is at most "
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
        parts.append(group_sentence(site["group_privacy"]))
        if site["delta_vs_1_over_n"]["ok"] is False:
            parts.append(f"Delta is not below 1/n = 1/{site['delta_vs_1_over_n']['n']}: the guarantee is weak.")
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
        f"{plural(len(problems), 'problem')} {'was' if len(problems) == 1 else 'were'} found; see the list in this report."
        if problems
        else f"The figures of {compared} agree wherever they were compared."
    )
    sessions = mech["sessions"]
    if sessions:
        parts.append(f"Sessions from {time_text(sessions[0]['created_at'])} to {time_text(sessions[-1]['created_at'])} UTC.")
    parts.append(f"Figures from {site['figures_from']}; report generated {time_text(generated_at)} UTC.")
    return " ".join(parts)


__all__ = [
    "GROUP_SIZES",
    "MEANINGFUL_DELTA_UNKNOWN_N",
    "MECHANISM_NAME",
    "NO_GUARANTEE",
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
    "group_delta_text",
    "group_privacy",
    "group_sentence",
    "group_text",
    "mechanism_section",
    "plural",
    "remaining_text",
    "rounds_text",
    "run_epsilon_unknown",
    "statement",
    "threshold_text",
    "time_text",
]
