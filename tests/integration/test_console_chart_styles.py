"""The console's epsilon chart tells every site apart, however many there are.

The packaged federations have 10 sites and the palette 8 colours: past the palette the colours
come round again, so each round of them takes another marker, and the legend shows markers
(budget lines show as dashed lines). The chart is drawn by the console's own ``console.js``
and the vendored Chart.js in headless Chromium, from the JSON the privacy page embeds
(:func:`fedface.server.console.views.epsilon_chart`), and read back from Chart.js.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedface.server.console.views import epsilon_chart

pytestmark = pytest.mark.integration

STATIC = Path(__file__).resolve().parents[2] / "server" / "console" / "static"
STYLES = """() => {
  const chart = window.Chart.getChart(document.querySelector("#chart-epsilon"));
  return {
    datasets: chart.data.datasets.map((d) => ({label: d.label, colour: d.borderColor, marker: d.pointStyle, dash: d.borderDash})),
    legendMarkers: chart.options.plugins.legend.labels.usePointStyle,
  };
}"""


def _report(n_sites: int, budget_of: dict[int, float | None]) -> dict[str, object]:
    sites = []
    for i in range(n_sites):
        rounds = [{"run_id": "run-a", "round": r, "epsilon_lifetime": 0.5 * r + 0.01 * i} for r in (1, 2, 3)]
        sites.append({"site": f"site-{i:03d}", "rounds": rounds, "budget": {"epsilon": budget_of.get(i, 8.0)}})
    return {"sites": sites}


def _draw(browser: object, tmp_path: Path, spec: dict[str, object]) -> dict[str, object]:
    page_file = tmp_path / "chart.html"
    page_file.write_text(
        "<!doctype html><html><body data-live=\"off\">"
        "<div style=\"width:900px;height:400px\"><canvas id=\"chart-epsilon\" data-chart=\"chart-epsilon-data\"></canvas></div>"
        f"<script type=\"application/json\" id=\"chart-epsilon-data\">{json.dumps(spec)}</script>"
        f"<script src=\"{(STATIC / 'chart.umd.min.js').as_uri()}\"></script>"
        f"<script src=\"{(STATIC / 'console.js').as_uri()}\"></script>"
        "</body></html>"
    )
    context = browser.new_context()  # type: ignore[attr-defined]
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(page_file.as_uri())
        page.wait_for_function("() => window.Chart && window.Chart.getChart(document.querySelector('#chart-epsilon'))")
        assert not errors, errors
        return page.evaluate(STYLES)  # type: ignore[no-any-return]
    finally:
        context.close()


def test_twelve_sites_get_twelve_different_colour_and_marker_pairs(browser: object, tmp_path: Path) -> None:
    drawn = _draw(browser, tmp_path, epsilon_chart(_report(12, {})))

    sites = [d for d in drawn["datasets"] if d["label"].startswith("site-")]  # type: ignore[union-attr]
    assert len(sites) == 12
    pairs = {(d["colour"], d["marker"]) for d in sites}
    assert len(pairs) == 12, f"two sites are drawn alike: {sorted(pairs)}"
    assert len({d["colour"] for d in sites}) == 8  # the whole palette is used before any marker changes
    assert drawn["legendMarkers"] is True  # the legend shows the marker, not only the colour
    budget = [d for d in drawn["datasets"] if d["label"].startswith("budget")]  # type: ignore[union-attr]
    assert len(budget) == 1 and budget[0]["marker"] == "line" and budget[0]["dash"]  # one shared budget, dashed


def test_a_site_s_own_budget_line_takes_its_site_s_colour(browser: object, tmp_path: Path) -> None:
    drawn = _draw(browser, tmp_path, epsilon_chart(_report(3, {0: 5.0, 1: None, 2: 9.0})))

    by_label = {d["label"]: d for d in drawn["datasets"]}  # type: ignore[union-attr]
    own = by_label[next(label for label in by_label if label.startswith("budget of site-000"))]
    assert own["colour"] == by_label["site-000"]["colour"] and own["marker"] == "line"
    assert not any(label.startswith("budget of site-001") for label in by_label)  # no budget set: no line
