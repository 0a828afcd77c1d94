"""What the console's templates are given: the Jinja environment (autoescaped, strict), its
display filters, and the data of each chart (read by ``static/console.js`` from
``<script type="application/json">`` blocks; no inline script).

Numbers: privacy figures are shown rounded the safe way (a spend up, what remains down:
:func:`~fedface.common.privacy.accounting.format_epsilon`) with the exact float beside them in a
``data-value`` attribute; metrics with three decimals; NaN is shown as a dash and sent to the
charts as ``null``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from starlette.templating import Jinja2Templates

from fedface.common.privacy.accounting import format_epsilon
from fedface.server.queries import CHARTED_METRICS, RoundRow

TEMPLATE_DIR = Path(__file__).parent / "templates"
DASH = "\u2014"

#: Labels of the metrics the run page names (others keep their key).
METRIC_LABELS = {
    "verif_acc": "verification accuracy",
    "verif_auc": "verification AUC",
    "verif_eer": "EER",
    "tar_at_far_1e-2": "TAR @ FAR 1e-2",
    "tar_at_far_1e-3": "TAR @ FAR 1e-3",
    "expression_acc": "expression accuracy",
    "expression_macro_f1": "expression macro-F1",
}
#: Their column headers on the timeline.
SHORT_LABELS = {"verif_acc": "Accuracy", "verif_auc": "AUC", "verif_eer": "EER", "expression_acc": "Accuracy", "expression_macro_f1": "Macro-F1"}
#: Metrics shown as columns of the timeline (all of them are charted): an identity run's, and
#: an expression run's (see :func:`timeline_metrics`).
TIMELINE_METRICS = ("verif_acc", "verif_auc", "verif_eer")
EXPRESSION_TIMELINE_METRICS = ("expression_acc", "expression_macro_f1")
#: The accuracy-against-epsilon chart's metrics, by task.
ACCURACY_METRICS = ("verif_acc", "verif_auc", "expression_acc", "expression_macro_f1")


def timeline_metrics(config: Mapping[str, Any], rows: Sequence[RoundRow]) -> tuple[str, ...]:
    """The timeline's metric columns: an expression run's (its config's ``training.task``, or
    rounds that report expression metrics and no verification), else an identity run's."""
    task = (config.get("training") or {}).get("task")
    keys = {k for row in rows for k in row.metrics}
    if task == "expression" or (keys & set(EXPRESSION_TIMELINE_METRICS) and not keys & set(TIMELINE_METRICS)):
        return EXPRESSION_TIMELINE_METRICS
    return TIMELINE_METRICS


def utc(value: str | None) -> str:
    """An ISO-8601 UTC timestamp as ``2026-05-09 10:01:00 UTC`` (a dash for None)."""
    if not value:
        return DASH
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def utc_short(value: str | None) -> str:
    """An ISO-8601 UTC timestamp as ``2026-05-09 10:01:00`` (the column says UTC; a dash for None)."""
    text = utc(value)
    return text.removesuffix(" UTC")


def utc_time(value: str | None) -> str:
    """The time of day of an ISO-8601 UTC timestamp, ``10:01:00`` (a dash for None)."""
    text = utc(value)
    return text.split(" ")[1] if text.count(" ") == 2 else text


def eps_up(value: float | None) -> str:
    """A spent epsilon, rounded up (a dash for None)."""
    return DASH if value is None else format_epsilon(float(value), rounding="up")


def eps_down(value: float | None) -> str:
    """What remains of a budget, rounded down (a dash for None)."""
    return DASH if value is None else format_epsilon(float(value), rounding="down")


def metric(value: float | None, digits: int = 3) -> str:
    """A metric with ``digits`` decimals (a dash for None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:.{digits}f}"


def seconds(value: float | None) -> str:
    """A duration as ``12.3 s`` or ``4 min 05 s``."""
    if value is None:
        return DASH
    if value < 60:
        return f"{value:.1f} s"
    minutes, rest = divmod(int(round(value)), 60)
    return f"{minutes} min {rest:02d} s"


def reasons(counts: Mapping[str, int]) -> list[str]:
    """``{"budget exhausted": 2}`` as ``["budget exhausted \u00d72"]``, most frequent first."""
    return [f"{reason} \u00d7{n}" if n > 1 else reason for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def policy_items(policy: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """A site's reported policy as ``(key, text)`` pairs, in the order it was sent."""
    if not policy:
        return []
    out = []
    for key, value in policy.items():
        if isinstance(value, bool):
            text = "yes" if value else "no"
        elif value is None:
            text = DASH
        else:
            text = str(value)
        out.append((str(key), text))
    return out


def short(text: str | None, keep: int = 12) -> str:
    """A long identifier cut to its first ``keep`` characters (an ellipsis after)."""
    if not text:
        return DASH
    return text if len(text) <= keep else text[:keep] + "\u2026"


def _finite(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def metrics_chart(rows: Sequence[RoundRow], series: Mapping[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """The run page's chart: each charted metric over the run's rounds (``null`` where missing)."""
    labels = [row.round for row in rows]
    datasets = []
    for key in CHARTED_METRICS:
        if key not in series:
            continue
        by_round = dict(series[key])
        datasets.append({"key": key, "label": METRIC_LABELS.get(key, key), "data": [_finite(by_round.get(r)) for r in labels]})
    return {"kind": "metrics", "labels": [f"round {r}" for r in labels], "datasets": datasets, "y": {"min": 0, "max": 1}}


def epsilon_chart(report: Mapping[str, Any]) -> dict[str, Any]:
    """The privacy page's chart: each site's lifetime epsilon after each round it reported
    (the report's ``rounds``), and each budget as a flat line (one for the sites sharing it)."""
    order: list[tuple[str, int]] = []
    for site in report.get("sites", []):
        for r in site.get("rounds", []):
            point = (str(r["run_id"]), int(r["round"]))
            if point not in order:
                order.append(point)
    runs = list(dict.fromkeys(run for run, _ in order))
    labels = [f"round {rnd}" if len(runs) == 1 else f"{short(run, 16)} \u00b7 round {rnd}" for run, rnd in order]
    datasets = []
    budgets: dict[float, list[str]] = {}
    for site in report.get("sites", []):
        values = {(str(r["run_id"]), int(r["round"])): _finite(r.get("epsilon_lifetime")) for r in site.get("rounds", [])}
        datasets.append({"key": site["site"], "label": site["site"], "data": [values.get(p) for p in order]})
        budget = _finite((site.get("budget") or {}).get("epsilon"))
        if budget is not None:
            budgets.setdefault(budget, []).append(site["site"])
    everyone = len(budgets) == 1 and len(next(iter(budgets.values()))) == len(report.get("sites", []))
    for budget, names in sorted(budgets.items()):
        label = "budget" if everyone else f"budget of {', '.join(names)}"
        key = "budget" if everyone or len(names) > 1 else names[0]
        if order:
            datasets.append({"key": key, "label": f"{label} (ε {eps_down(budget)})", "budget": True, "data": [budget] * len(order)})
    return {"kind": "epsilon", "labels": labels, "datasets": datasets, "y": {"min": 0}}


def epsilon_caption(report: Mapping[str, Any]) -> str:
    """The line under the epsilon chart: what its solid and dashed lines are, and, where some
    or all sites have no finite budget (none set, or infinite: no limit), that they have no
    line, so a missing line is never read as a budget the chart forgot."""
    sites = report.get("sites", [])
    drawn = sum(1 for site in sites if _finite((site.get("budget") or {}).get("epsilon")) is not None)
    solid = "Solid: a site's lifetime epsilon after each round"
    if not any(site.get("rounds") for site in sites):
        return f"{solid}; no round has reported a spend yet, so nothing is drawn."
    if drawn == 0:
        return f"{solid}; no site has a finite budget, so no budget line is drawn."
    if drawn < len(sites):
        return f"{solid}; dashed: a budget ({len(sites) - drawn} of {len(sites)} sites have no finite budget, so no line)."
    return f"{solid}; dashed: its budget."


def accuracy_chart(report: Mapping[str, Any]) -> dict[str, Any]:
    """The privacy page's second chart: the server's verification accuracy and AUC (an
    expression run: expression accuracy and macro-F1) after each round against the run's
    epsilon so far (the largest of the sites'), from the report's ``accuracy_vs_epsilon``."""
    datasets = []
    for key in ACCURACY_METRICS:
        points = [
            {"x": _finite(row.get("max_epsilon_run")), "y": _finite(row.get(key)), "round": row.get("round")}
            for row in report.get("accuracy_vs_epsilon", [])
        ]
        points = [p for p in points if p["x"] is not None and p["y"] is not None]
        if points:
            datasets.append({"key": key, "label": METRIC_LABELS[key], "data": points})
    return {"kind": "scatter", "labels": [], "datasets": datasets, "x": {"title": "ε this run (largest of the sites)"},
            "y": {"min": 0, "max": 1}}


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None (JSON.parse knows no NaN)."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def templates() -> Jinja2Templates:
    """The console's templates: autoescaped, undefined names are errors, the filters above."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        utc=utc, utc_short=utc_short, utc_time=utc_time, eps_up=eps_up, eps_down=eps_down, metric=metric, seconds=seconds, reasons=reasons,
        policy_items=policy_items, short=short, json_safe=json_safe,
    )
    env.globals.update(METRIC_LABELS=METRIC_LABELS, SHORT_LABELS=SHORT_LABELS, DASH=DASH)
    return Jinja2Templates(env=env)


__all__ = [
    "ACCURACY_METRICS",
    "DASH",
    "EXPRESSION_TIMELINE_METRICS",
    "METRIC_LABELS",
    "SHORT_LABELS",
    "TEMPLATE_DIR",
    "TIMELINE_METRICS",
    "accuracy_chart",
    "eps_down",
    "eps_up",
    "epsilon_caption",
    "epsilon_chart",
    "json_safe",
    "metric",
    "metrics_chart",
    "policy_items",
    "reasons",
    "seconds",
    "short",
    "templates",
    "timeline_metrics",
    "utc",
    "utc_short",
    "utc_time",
]
