/* fedface console: live updates and charts. No inline script anywhere (CSP script-src 'self').
 *
 * Live updates: one EventSource on /events (server-sent events from the run store's
 * append-only rows). It starts after the cursor the page was rendered at (body[data-cursor]),
 * so nothing recorded between the page's render and the connection is missed; when the
 * browser reconnects it sends the last event id it saw (Last-Event-ID) and the server goes
 * on from there. Each event fires "fedface:update" on <body>; every live fragment
 * (hx-trigger="fedface:update from:body") then re-fetches itself with htmx and is swapped in.
 *
 * Charts: each <canvas data-chart="ID"> is drawn with Chart.js from the JSON in
 * <script type="application/json" id="ID">, on load and after each swap.
 */
(function () {
  "use strict";

  var KINDS = ["event", "round", "action", "receipt"];
  var PALETTE = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626"];
  // past PALETTE.length series the colours come round again, so each round of them gets its own
  // marker (the legend shows markers): 8 x 6 = 48 series tell apart before any pair repeats
  var MARKERS = ["circle", "rect", "triangle", "rectRot", "crossRot", "star"];
  var RETRY_MS = 5000;
  var source = null;
  var lastId = null;

  function setStatus(state, text) {
    var el = document.getElementById("live-status");
    if (!el) return;
    el.className = "live-status live-" + state;
    el.textContent = text;
  }

  // a series' colour and marker, by its key's place among the chart's keys (a site's budget line
  // shares its site's key, so it takes that site's colour)
  function styleFor(key, keys) {
    var i = Math.max(0, keys.indexOf(key));
    return { colour: PALETTE[i % PALETTE.length], marker: MARKERS[Math.floor(i / PALETTE.length) % MARKERS.length] };
  }

  function chartConfig(spec) {
    var keys = [];
    spec.datasets.forEach(function (d) {
      if (keys.indexOf(d.key) < 0) keys.push(d.key);
    });
    var scatter = spec.kind === "scatter";
    var datasets = spec.datasets.map(function (d) {
      var style = styleFor(d.key, keys);
      var colour = d.key === "budget" ? "#6b7280" : style.colour;
      return {
        label: d.label,
        data: d.data,
        borderColor: colour,
        backgroundColor: colour,
        pointStyle: d.budget ? "line" : style.marker,
        borderWidth: d.budget ? 1.5 : 2,
        borderDash: d.budget ? [6, 4] : [],
        pointRadius: d.budget ? 0 : scatter ? 4 : 3,
        pointHoverRadius: d.budget ? 0 : 6,
        showLine: true,
        spanGaps: true,
        tension: 0,
        fill: false
      };
    });
    var tick = { color: "#4b5563" };
    var y = { beginAtZero: true, grid: { color: "#e5e7eb" }, ticks: tick };
    if (spec.y && spec.y.max !== undefined) y.suggestedMax = spec.y.max;
    var x = scatter
      ? { type: "linear", beginAtZero: false, grid: { color: "#f3f4f6" }, ticks: tick,
          title: { display: !!(spec.x && spec.x.title), text: spec.x ? spec.x.title : "", color: "#4b5563" } }
      : { grid: { display: false }, ticks: tick };
    var tooltip = { enabled: true };
    if (scatter) {
      tooltip.callbacks = {
        label: function (ctx) {
          var p = ctx.raw;
          return ctx.dataset.label + ": " + p.y.toFixed(3) + " at ε " + p.x.toFixed(3) + (p.round ? " (round " + p.round + ")" : "");
        }
      };
    }
    return {
      type: scatter ? "scatter" : "line",
      data: { labels: spec.labels, datasets: datasets },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        interaction: scatter ? { mode: "nearest", intersect: true } : { mode: "index", intersect: false },
        plugins: {
          legend: { position: "bottom", labels: { color: "#1f2937", boxWidth: 14, boxHeight: 8, usePointStyle: true } },
          tooltip: tooltip
        },
        scales: { x: x, y: y }
      }
    };
  }

  // draws every chart canvas that has none yet (a swapped-in fragment brings new canvases)
  function renderCharts() {
    if (!window.Chart) return;
    document.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      var data = document.getElementById(canvas.getAttribute("data-chart"));
      if (!data || window.Chart.getChart(canvas)) return;
      try {
        new window.Chart(canvas, chartConfig(JSON.parse(data.textContent)));
      } catch (err) {
        console.warn("fedface console: chart " + canvas.id + " not drawn: " + err);
      }
    });
  }

  function destroyCharts(root) {
    if (!window.Chart || !root || !root.querySelectorAll) return;
    root.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      var chart = window.Chart.getChart(canvas);
      if (chart) chart.destroy();
    });
  }

  // <details> keep their open state across a swap of their fragment
  var openDetails = {};

  function rememberDetails(root) {
    openDetails = {};
    root.querySelectorAll("details[id]").forEach(function (d) {
      openDetails[d.id] = d.open;
    });
  }

  function restoreDetails() {
    document.querySelectorAll("details[id]").forEach(function (d) {
      if (Object.prototype.hasOwnProperty.call(openDetails, d.id)) d.open = openDetails[d.id];
    });
  }

  function connect() {
    if (!window.EventSource || document.body.getAttribute("data-live") !== "on") return;
    var after = lastId || document.body.getAttribute("data-cursor") || "";
    source = new EventSource("/events" + (after ? "?after=" + encodeURIComponent(after) : ""));
    setStatus("connecting", "connecting");
    source.onopen = function () {
      setStatus("on", "live");
    };
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) {
        // refused (e.g. the session expired): try again later, from the last event seen
        setStatus("off", "offline");
        source = null;
        window.setTimeout(connect, RETRY_MS);
      } else {
        setStatus("connecting", "reconnecting");
      }
    };
    KINDS.forEach(function (kind) {
      source.addEventListener(kind, function (event) {
        if (event.lastEventId) lastId = event.lastEventId;
        var detail = {};
        try {
          detail = JSON.parse(event.data);
        } catch (err) {
          detail = { kind: kind };
        }
        if (window.htmx) window.htmx.trigger(document.body, "fedface:update", detail);
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    renderCharts();
    var picker = document.getElementById("run-select");
    if (picker && picker.form) {
      picker.addEventListener("change", function () {
        picker.form.submit();
      });
    }
    document.body.addEventListener("htmx:beforeSwap", function (event) {
      var target = event.detail.target;
      if (target) {
        rememberDetails(target);
        destroyCharts(target);
      }
    });
    document.body.addEventListener("htmx:afterSwap", function () {
      restoreDetails();
      renderCharts();
    });
    window.addEventListener("pagehide", function () {
      if (source) source.close();
    });
    connect();
  });
})();
