"""The privacy report in each of its formats: JSON (the report itself), Markdown, CSV and one
standalone HTML file.

JSON carries every number exactly, and is strict JSON: an infinite figure (a non-private
round's epsilon) is the string ``"inf"``, never ``Infinity``, and there is no NaN. Text rounds
the safe way: a spend (epsilon) *up*, what
remains of a budget *down* (:func:`~fedface.common.privacy.accounting.format_epsilon`), a
group-privacy delta up. CSV has one row per site and round, each figure exact with a rounded
``*_display`` column beside the spend and what remains. The HTML file stands alone: inline
CSS, charts as PNG ``data:`` URIs, no reference to anything outside it, and every string
escaped. Markdown and HTML are written from the same tables (:func:`_site_tables`) and carry
the same parts: the problems (or that there are none) and, under each statement, the lines an
officer signs and dates. Text shows a group-privacy delta at or above 1 as "no meaningful
guarantee", never as a number, every delta as ``f"{delta:g}"`` writes it, and a time to the
second in UTC (:func:`~fedface.server.reports.sections.time_text`); the JSON and the CSV's
exact columns keep the full figures and times.

The names in a report (sites, runs, reasons) come from the sites and the server's config, so
they are treated as hostile text: in Markdown every cell and heading escapes what would be
markup (HTML tags, table pipes, code spans, links); in CSV a text cell that a spreadsheet
would read as a formula (``=``, ``+``, ``-``, ``@``, a tab or a carriage return first) starts
with a single quote. The exact numeric columns of the CSV are never touched.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from fedface.common.errors import ConfigError
from fedface.server.reports.charts import accuracy_chart, data_uri, epsilon_chart
from fedface.server.reports.evidence import CONSISTENT
from fedface.server.reports.sections import (
    epsilon_text,
    format_delta,
    format_up,
    group_text,
    remaining_text,
    rounds_text,
    run_epsilon_unknown,
    threshold_text,
    time_text,
)

FORMATS = ("html", "json", "md", "csv")
CSV_FIELDS = (
    "site", "run_id", "round", "epsilon_lifetime", "epsilon_lifetime_display", "delta", "accountant",
    "budget_epsilon", "remaining", "remaining_display", "status", "recorded_at",
)
CSV_EXACT = ("round", "epsilon_lifetime", "delta", "budget_epsilon", "remaining")
"""The CSV's numeric columns (exact floats and the round number): written as numbers, never quoted."""
INFINITY = "inf"
"""How the JSON format writes an infinite figure (JSON has no infinity)."""
UNKNOWN = "unknown"
NO_PROBLEMS = "No problems: the figures agree wherever they were compared."
SIGN_LINES = ("Signed:", "Date (UTC):")
"""The lines under each statement where the officer signs and dates it (HTML and Markdown)."""

Table = tuple[str, list[str], list[list[str]]]  # title, header, rows (text cells)


def render_report(report: dict[str, Any], fmt: str) -> str:
    """The report as text in ``fmt``: ``json``, ``md``, ``csv`` or ``html``.

    Raises
    ------
    ConfigError
        On another format.
    """
    renderers: dict[str, Callable[[dict[str, Any]], str]] = {"json": _json, "md": _markdown, "csv": _csv, "html": _html}
    if fmt not in renderers:
        raise ConfigError(f"report format must be one of {', '.join(FORMATS)}, got {fmt!r}: pass --format html, json, md or csv")
    return renderers[fmt](report)


def _json(report: dict[str, Any]) -> str:
    return json.dumps(_strict(report), indent=2, sort_keys=True, allow_nan=False) + "\n"


def _strict(value: Any) -> Any:
    """``value`` with every infinite float as ``"inf"`` (``"-inf"`` below zero) and NaN as
    ``None`` (unknown), so that the JSON is strict: ``Infinity`` and ``NaN`` are not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else INFINITY if value > 0 else "-" + INFINITY
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for site in report["sites"]:
        for r in site["rounds"]:
            row = {
                "site": site["site"],
                "run_id": r["run_id"],
                "round": "" if r["round"] is None else r["round"],
                "epsilon_lifetime": _exact(r["epsilon_lifetime"]),
                "epsilon_lifetime_display": epsilon_text(r["epsilon_lifetime"]),
                "delta": _exact(site["delta"]),
                "accountant": site["accountant"]["name"] or "",
                "budget_epsilon": _exact(r["budget_epsilon"]),
                "remaining": _exact(r["remaining"]),
                "remaining_display": "" if r["remaining"] is None else remaining_text(r["remaining"]),
                "status": r["status"],
                "recorded_at": r["recorded_at"] or "",
            }
            writer.writerow({k: v if k in CSV_EXACT else _csv_text(v) for k, v in row.items()})
    return out.getvalue()


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(value: object) -> str:
    """A text cell a spreadsheet will not run: one that starts like a formula gets a leading ``'``."""
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _exact(value: float | None) -> str:
    """A float as the shortest text that reads back as the same float (empty for none)."""
    return "" if value is None else repr(float(value))


# --- the tables Markdown and HTML share --------------------------------------------------------


def _yes(value: bool | None, yes: str = "yes", no: str = "no") -> str:
    return "-" if value is None else yes if value else no


def _title(report: dict[str, Any]) -> str:
    if report["run"] is not None:
        return f"Privacy report: run {report['run']['run_id']}"
    return f"Privacy report: privacy ledger {report['source']['paths']['ledger']}"


def _about(report: dict[str, Any]) -> list[list[str]]:
    rows = [
        ["generated (UTC)", time_text(report["generated_at"])],
        ["fedface", str(report["fedface_version"])],
        ["schema", report["schema"]],
        ["figures from", report["source"]["figures"]],
    ]
    rows += [[name.replace("_", " "), value] for name, value in report["source"]["paths"].items() if value]
    run = report["run"]
    if run is not None:
        rows += [
            ["run", run["run_id"]],
            ["status", run["status"] + (f" ({run['error']})" if run["error"] else "")],
            ["started / finished (UTC)",
             f"{time_text(run['started_at'])} / {time_text(run['finished_at']) if run['finished_at'] else 'not finished'}"],
            ["rounds done / planned", f"{run['rounds_done']} / {run['rounds_planned']}"],
            ["SecAgg+", _yes(run["secagg"], "on", "off")],
            ["sites", f"{run['sites']} planned; reported here: {', '.join(run['site_names']) or 'none'}"],
            ["target epsilon per site", "not private" if run["target_epsilon"] is None else f"{run['target_epsilon']:g}"],
        ]
    return rows


def _summary(report: dict[str, Any]) -> Table:
    run = report["run"] is not None
    header = ["site", *(["epsilon this run"] if run else []), "epsilon lifetime", "delta", "accountant", "budget",
              "remaining", "receipts", "ledger", "problems"]
    rows = []
    for s in report["sites"]:
        receipts = s["receipts"]
        rows.append([
            s["site"],
            *([_run_epsilon(s["epsilon"]["run"])] if run else []),
            epsilon_text(s["epsilon"]["lifetime"]),
            format_delta(s["delta"]),
            s["accountant"]["name"] or "-",
            "none" if s["budget"]["epsilon"] is None else f"{s['budget']['epsilon']:g}",
            remaining_text(s["budget"]["remaining"]),
            _receipts_label(receipts),
            "-" if s["ledger"]["path"] is None else "ok" if s["ledger"]["integrity"] == "ok" else "INTEGRITY ERROR",
            str(len(s["problems"])),
        ])
    return "Summary (epsilon rounded up, remaining rounded down)", header, rows


def _run_epsilon(value: float | None) -> str:
    """A run epsilon for text: rounded up, or ``unknown`` (a run report always has one)."""
    return UNKNOWN if value is None else epsilon_text(value)


def _receipts_label(receipts: dict[str, Any]) -> str:
    if not receipts["checked"]:
        return "not checked"
    if receipts["verified"] is None:
        return CONSISTENT
    return "verified" if receipts["verified"] else "PROBLEMS"


def _mechanism(site: dict[str, Any], *, ledger_report: bool) -> Table:
    m, a, d = site["mechanism"], site["accountant"], site["delta_vs_1_over_n"]
    people = site["people"]

    def param(value: Any, fmt: Callable[[Any], str]) -> str:
        return "varies (see sessions)" if value is None and m["rounds"] else "-" if value is None else fmt(value)

    rows = [
        ["unit of privacy", site["unit_of_privacy"]],
        ["mechanism", m["name"]],
        ["sampling", m["sampling"]],
        ["sample rate q", param(m["sample_rate"], lambda v: format_up(v, 4))],
        ["noise multiplier sigma (at least)", param(m["noise_multiplier"], lambda v: format_up(v, 4, down=True))],
        ["clipping norm C", param(m["max_grad_norm"], lambda v: f"{v:g}")],
        ["steps a round", param(m["steps_per_round"], str)],
        ["steps in all / rounds", f"{m['steps_total']} / {m['rounds']}" + _unreported(m)],
        ["secure mode", _yes(m["secure_mode"])],
        ["images n", "-" if m["examples"] is None else str(m["examples"])],
        ["people / most images of one person", f"{_count(people['identities'])} / {_count(people['max_images_per_person'])} ({people['source']})"],
        ["accountant", f"{a['name'] or '-'} ({a['library']} {a['version']})"],
        ["delta", format_delta(site["delta"])],
        ["delta against 1/n", "-" if d["ok"] is None else
         f"delta x n = {format_up(d['delta_times_n'])}; 1/n = 1/{d['n']}: " + ("below 1/n" if d["ok"] else "NOT below 1/n")],
        *([] if ledger_report else [["epsilon this run (up)", _run_epsilon(site["epsilon"]["run"])]]),
        ["epsilon lifetime (up)", epsilon_text(site["epsilon"]["lifetime"])],
        ["budget epsilon", "none set" if site["budget"]["epsilon"] is None else f"{site['budget']['epsilon']:g}"],
        ["remaining (down)", "no budget" if site["budget"]["epsilon"] is None else remaining_text(site["budget"]["remaining"])],
        ["figures from", site["figures_from"]],
        ["ledger integrity", site["ledger"]["integrity"]],
    ]
    return "Mechanism, accounting and budget", ["", ""], rows


def _unreported(mechanism: dict[str, Any]) -> str:
    rounds = mechanism.get("rounds_unreported") or ()
    return f" (and {rounds_text(rounds)} charged, mechanism not reported)" if rounds else ""


def _count(value: int | None) -> str:
    return "unknown" if value is None else str(value)


def _rounds(site: dict[str, Any], *, ledger_report: bool) -> Table:
    run = [] if ledger_report else ["epsilon run (up)"]
    header = ["run", "round", "epsilon lifetime (up)", *run, "remaining (down)", "status", "recorded (UTC)", "from"]
    rows = [
        [r["run_id"], "-" if r["round"] is None else str(r["round"]), epsilon_text(r["epsilon_lifetime"]),
         *([] if ledger_report else [UNKNOWN if run_epsilon_unknown(site, r["round"]) else epsilon_text(r["epsilon_run"])]),
         remaining_text(r["remaining"]), r["status"],
         time_text(r["recorded_at"]), r["source"]]
        for r in site["rounds"]
    ]
    return "Rounds" if not ledger_report else "Sessions charged, every run", header, rows


def _runs(site: dict[str, Any]) -> Table:
    header = ["run", "sessions", "first charge (UTC)", "last charge (UTC)", "epsilon of the run alone (up)", "lifetime after (up)"]
    rows = [[r["run_id"], str(r["sessions"]), time_text(r["first_at"]), time_text(r["last_at"]), _run_epsilon(r["epsilon"]),
             epsilon_text(r["epsilon_lifetime_after"])] for r in site["runs"]]
    return "Every run of the data set", header, rows


def _sessions(site: dict[str, Any]) -> Table:
    header = ["run", "round", "images", "noise (at least)", "sample rate", "steps", "clip", "epsilon after (up)", "charged (UTC)"]
    rows = [[s["run_id"], "-" if s["round"] is None else str(s["round"]), _count(s["examples"]),
             format_up(s["noise_multiplier"], 4, down=True), format_up(s["sample_rate"], 4), str(s["steps"]),
             f"{s['max_grad_norm']:g}", epsilon_text(s["epsilon_after"]), time_text(s["created_at"])]
            for s in site["mechanism"]["sessions"]]
    return "Sessions", header, rows


def _group(site: dict[str, Any]) -> Table:
    g = site["group_privacy"]
    rows = [[str(e["k"]) + (" (most at this site)" if e["largest_at_site"] else ""), group_text(e, g)] for e in g["entries"]]
    if g["no_guarantee_from"] is not None:
        rows.append(["no meaningful guarantee", f"from {g['no_guarantee_from']} images on"])
    title = (
        "Group privacy: a person with k images (k eps, k e^((k-1) eps) delta; rounded up; meaningful only while the "
        f"delta is below {threshold_text(g)})"
    )
    return title, ["k images", "guarantee"], rows


def _receipts(site: dict[str, Any]) -> Table:
    r = site["receipts"]
    verified = CONSISTENT if r["checked"] and r["verified"] is None else _yes(r["verified"])
    rows = [["checked", _yes(r["checked"])], ["verified", verified], ["against", r["against"] or "-"],
            ["receipts", str(r["count"])]]
    if r["left_out"]:
        rows.append(["other sites' receipts left out", str(r["left_out"])])
    rows.append(["summary", r["summary"]])
    rows += [["problem", p] for p in r["problems"]]
    return "Receipts", ["", ""], rows


def _accuracy(report: dict[str, Any]) -> Table:
    points = report["accuracy_vs_epsilon"] or []
    # an expression run reports expression accuracy and macro-F1 instead of verification
    expression = any(p.get("expression_acc") is not None for p in points) and not any(p.get("verif_acc") is not None for p in points)
    keys, names = (("expression_acc", "expression_macro_f1"), ["expression accuracy", "macro-F1"]) if expression else (
        ("verif_acc", "verif_auc"), ["verification accuracy", "AUC"])
    header = ["round", *names, "max lifetime epsilon (up)", "max run epsilon (up)"]
    rows = [[str(p["round"]), *(_metric(p.get(k)) for k in keys), epsilon_text(p["max_epsilon_lifetime"]),
             epsilon_text(p["max_epsilon_run"])] for p in points]
    return "Accuracy against epsilon (largest over the sites)", header, rows


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _protections(report: dict[str, Any]) -> Table:
    names = {"dp_sgd": "DP-SGD at each site", "secagg": "SecAgg+", "template_encryption": "Template encryption"}
    rows = [[names.get(k, k), v["adds"], v["does_not"]] for k, v in report["protections"].items()]
    return "What each protection adds, and what it does not", ["protection", "adds", "does not"], rows


def _site_tables(site: dict[str, Any], *, ledger_report: bool) -> list[Table]:
    tables = [_mechanism(site, ledger_report=ledger_report), _rounds(site, ledger_report=ledger_report)]
    if ledger_report or len(site["runs"]) > 1:
        tables.append(_runs(site))
    if not site["mechanism"]["uniform"]:
        tables.append(_sessions(site))
    return [*tables, _group(site), _receipts(site)]


# --- Markdown ----------------------------------------------------------------------------------


_MD_ESCAPES = str.maketrans({
    "\\": "\\\\", "|": "\\|", "`": "\\`", "[": "\\[", "]": "\\]", "&": "&amp;", "<": "&lt;", ">": "&gt;",
})


def _md_cell(text: object) -> str:
    """Text from the report for a Markdown cell, heading or line: one line, and nothing in it
    read as markup (an HTML tag, a table pipe, a code span, a link or image)."""
    return " ".join(str(text).split()).translate(_MD_ESCAPES)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return ["(none)", ""]
    head = [h or " " for h in header]
    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _md_problems(problems: Sequence[str]) -> list[str]:
    return [*([f"- {_md_cell(p)}" for p in problems] or [NO_PROBLEMS]), ""]


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# {_md_cell(_title(report))}", "", *_md_table(["", ""], _about(report))]
    title, header, rows = _summary(report)
    lines += [f"## {title}", "", *_md_table(header, rows)]
    lines += ["## Problems", "", *_md_problems(report["problems"])]
    for site in report["sites"]:
        lines += [f"## Site {_md_cell(site['site'])}", "", "**Statement.** " + _md_cell(site["statement"]), ""]
        for label in SIGN_LINES:
            lines += [f"{label} {'_' * 32}", ""]
        for title, header, rows in _site_tables(site, ledger_report=report["run"] is None):
            lines += [f"### {_md_cell(title)}", "", *_md_table(header, rows)]
        lines += ["### Problems", "", *_md_problems(site["problems"])]
    if report["accuracy_vs_epsilon"] is not None:
        title, header, rows = _accuracy(report)
        lines += [f"## {title}", "", *_md_table(header, rows)]
    title, header, rows = _protections(report)
    lines += [f"## {title}", "", *_md_table(header, rows)]
    return "\n".join(lines).rstrip() + "\n"


# --- HTML --------------------------------------------------------------------------------------

_CSS = """
body{font:15px/1.45 "DejaVu Sans",Helvetica,Arial,sans-serif;color:#1d2330;margin:0;background:#f4f5f7}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 8px;border-bottom:2px solid #1f5fa8;padding-bottom:3px}
h3{font-size:15px;margin:18px 0 6px;color:#2b3a55}
table{border-collapse:collapse;margin:4px 0 12px;width:100%;font-size:13px}
th,td{border:1px solid #d5d9e0;padding:4px 7px;text-align:left;vertical-align:top}
th{background:#eef1f6}
.kv td:first-child{width:30%;color:#444;background:#fafbfc}
.statement{border:1px solid #1f5fa8;background:#f3f7fc;padding:12px 16px;margin:10px 0}
.sign{margin-top:14px;color:#444}.sign span{display:inline-block;min-width:260px;border-bottom:1px solid #888;margin-right:24px}
.bad{color:#b00020;font-weight:bold}.ok{color:#17703a}img{max-width:100%;height:auto;display:block;margin:6px 0}
.note{color:#555;font-size:13px}ul.problems li{color:#b00020}
"""


def _h(text: object) -> str:
    return html.escape(str(text), quote=True)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, kv: bool = False) -> str:
    if not rows:
        return '<p class="note">(none)</p>'
    head = "" if kv else "<thead><tr>" + "".join(f"<th>{_h(h)}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table{" class=kv" if kv else ""}>{head}<tbody>{body}</tbody></table>'


def _html_tables(tables: Sequence[Table], level: int) -> str:
    return "".join(f"<h{level}>{_h(t)}</h{level}>" + _html_table(h, r, kv=h == ["", ""]) for t, h, r in tables)


def _problems_html(problems: Sequence[str]) -> str:
    if not problems:
        return f'<p class="ok">{_h(NO_PROBLEMS)}</p>'
    return '<ul class="problems">' + "".join(f"<li>{_h(p)}</li>" for p in problems) + "</ul>"


def _html(report: dict[str, Any]) -> str:
    run = report["run"]
    parts = [
        f"<h1>{_h(_title(report))}</h1>",
        _html_table(["", ""], _about(report), kv=True),
        _html_tables([_summary(report)], 2),
        "<h2>Problems</h2>" + _problems_html(report["problems"]),
    ]
    for site in report["sites"]:
        chart = data_uri(epsilon_chart(site, run_id=None if run is None else run["run_id"]))
        parts += [
            f"<h2>Site {_h(site['site'])}</h2>",
            f'<div class="statement"><strong>Statement.</strong> {_h(site["statement"])}'
            '<div class="sign">' + "".join(f"<span>{_h(label)}</span>" for label in SIGN_LINES) + "</div></div>",
            f'<img alt="{_h(site["site"])}: epsilon over rounds against the budget" src="{chart}">',
            _html_tables(_site_tables(site, ledger_report=run is None), 3),
            "<h3>Problems</h3>" + _problems_html(site["problems"]),
        ]
    if run is not None:
        chart = data_uri(accuracy_chart(report["accuracy_vs_epsilon"], run_id=run["run_id"]))
        parts += [_html_tables([_accuracy(report)], 2), f'<img alt="accuracy against epsilon" src="{chart}">']
    parts.append(_html_tables([_protections(report)], 2))
    parts.append('<p class="note">Epsilon is rounded up, what remains of a budget down, a group-privacy delta up; '
                 "the JSON format of this report carries every figure exactly.</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_h(_title(report))}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(parts)}</main></body></html>\n"
    )


__all__ = ["CSV_EXACT", "CSV_FIELDS", "FORMATS", "INFINITY", "NO_PROBLEMS", "SIGN_LINES", "UNKNOWN", "render_report"]
