"""The privacy report's charts, as PNG bytes for a standalone HTML file (``data:`` URIs).

Drawn with matplotlib's object API on its Agg canvas (no pyplot, no global figure state, no
display): one chart per site of its epsilon over rounds against its budget line, and one of a
run's accuracy against the largest epsilon over its sites. Every chart names its axes and has
a legend; a site without a budget says so in the legend, and a chart with nothing to plot says
that instead of drawing empty axes. An infinite epsilon (a non-private round) cannot be drawn:
the legend counts what was left out, and a chart with nothing finite says so.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fedface.server.reports.sections import format_delta, plural

_SIZE = (9.6, 3.6)  # inches, at 100 dpi: 960 x 360 pixels
_DPI = 100
_LIFETIME, _RUN, _BUDGET = "#1f5fa8", "#e08a00", "#c0392b"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=_DPI, metadata={"Software": None})
    return out.getvalue()


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _nothing(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def epsilon_chart(site: dict[str, Any], *, run_id: str | None) -> bytes:
    """PNG of :func:`epsilon_figure`."""
    return _png(epsilon_figure(site, run_id=run_id))


def epsilon_figure(site: dict[str, Any], *, run_id: str | None) -> Figure:
    """A site's epsilon over the rounds it reported, against its budget (dashed).

    In a run report (``run_id`` given) the x axis is the run's round and a second line is the
    run's own epsilon; in a ledger report it is every session in charge order, runs marked.
    """
    fig, ax = _figure()
    spent = [r for r in site["rounds"] if r["epsilon_lifetime"] is not None]
    rounds = [r for r in spent if math.isfinite(r["epsilon_lifetime"])]
    infinite = len(spent) - len(rounds)
    budget = site["budget"]["epsilon"]
    if not rounds:
        what = "epsilon is infinite (not private): nothing to draw" if infinite else "no privacy spend reported"
        _nothing(ax, f"{site['site']}: {what}")
        return fig
    if run_id is not None:
        xs = [r["round"] for r in rounds]
        ax.set_xlabel(f"round of run {run_id}")
    else:
        xs = list(range(1, len(rounds) + 1))
        ax.set_xlabel("session, in charge order (every run)")
        starts = [x for x, prev, cur in zip(xs[1:], rounds, rounds[1:], strict=False) if cur["run_id"] != prev["run_id"]]
        for x in starts:
            ax.axvline(x - 0.5, color="#999999", linestyle=":", linewidth=1)
        if starts:
            ax.plot([], [], color="#999999", linestyle=":", label="a new run starts")
    ax.plot(xs, [r["epsilon_lifetime"] for r in rounds], color=_LIFETIME, marker="o", linewidth=2, zorder=3,
            label="lifetime epsilon (every session of the data set)")
    runs = [
        (x, r["epsilon_run"]) for x, r in zip(xs, rounds, strict=True)
        if r["epsilon_run"] is not None and math.isfinite(r["epsilon_run"])
    ]
    if run_id is not None and runs:
        # dashed, open squares, drawn on top: still seen where it equals the lifetime (a data set's first run)
        ax.plot([x for x, _ in runs], [e for _, e in runs], color=_RUN, marker="s", markersize=9, markerfacecolor="none",
                markeredgewidth=1.5, linestyle=(0, (5, 3)), linewidth=1.5, zorder=4, label="this run's epsilon")
    top = max(r["epsilon_lifetime"] for r in rounds)
    if budget is not None and math.isfinite(budget):
        ax.axhline(budget, color=_BUDGET, linestyle="--", linewidth=1.5, label=f"budget epsilon {budget:g}")
        top = max(top, budget)
    else:
        ax.add_line(Line2D([], [], linestyle="none", label="no budget set" if budget is None else "budget epsilon inf (no limit)"))
    if infinite:
        ax.add_line(Line2D([], [], linestyle="none", label=f"{plural(infinite, 'infinite epsilon')} (not private): not drawn"))
    ax.set_ylim(0, top * 1.12 if top > 0 else 1)
    ax.set_xticks(xs if len(xs) <= 20 else xs[:: max(1, len(xs) // 10)])
    ax.set_ylabel(f"epsilon at delta {format_delta(site['delta'])}")
    ax.set_title(f"{site['site']}: privacy spend", loc="left", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def accuracy_chart(points: Sequence[dict[str, Any]], *, run_id: str) -> bytes:
    """PNG of :func:`accuracy_figure`."""
    return _png(accuracy_figure(points, run_id=run_id))


#: The accuracy chart's series: (key, label, colour, marker), an identity run's then an expression run's.
_ACCURACY_SERIES = (
    ("verif_acc", "verification accuracy", _LIFETIME, "o"),
    ("verif_auc", "verification AUC", _RUN, "s"),
    ("expression_acc", "expression accuracy", _LIFETIME, "o"),
    ("expression_macro_f1", "expression macro-F1", _RUN, "s"),
)


def accuracy_figure(points: Sequence[dict[str, Any]], *, run_id: str) -> Figure:
    """A run's verification accuracy and AUC (an expression run's accuracy and macro-F1)
    against the largest epsilon over its sites, by round."""
    fig, ax = _figure()
    series = [s for s in _ACCURACY_SERIES if any(p.get(s[0]) is not None for p in points)]
    rows = [
        p for p in points
        if p["max_epsilon_run"] is not None and math.isfinite(p["max_epsilon_run"])
        and any(p.get(key) is not None for key, *_ in series)
    ]
    if not rows:
        _nothing(ax, f"run {run_id}: no round with both a privacy spend and accuracy")
        return fig
    xs = [p["max_epsilon_run"] for p in rows]
    for key, label, colour, marker in series:
        pairs = [(x, p[key]) for x, p in zip(xs, rows, strict=True) if p.get(key) is not None]
        if pairs:
            ax.plot([x for x, _ in pairs], [y for _, y in pairs], color=colour, marker=marker, linewidth=1.5, label=label)
    for x, p in zip(xs, rows, strict=True):
        y = next(p[key] for key, *_ in series if p.get(key) is not None)
        ax.annotate(f"r{p['round']}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7, color="#444444")
    ax.set_xlabel("this run's epsilon after the round (largest over the sites)")
    ax.set_ylabel("held-out expression recognition" if series[0][0].startswith("expression") else "held-out verification")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(0, max(xs) * 1.1 if max(xs) > 0 else 1)
    ax.set_title(f"run {run_id}: accuracy against epsilon", loc="left", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


__all__ = ["accuracy_chart", "accuracy_figure", "data_uri", "epsilon_chart", "epsilon_figure"]
