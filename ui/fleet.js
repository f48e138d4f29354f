// The Fleet view: the live workers from GET /api/fleet, polled while the view is open,
// and charts of the fleet's total queue length and tokens/s over the last minutes.
//
// Tokens/s is computed here, not by the (stateless) gateway: a worker writes its
// `tokens_out` counter and `last_heartbeat` (ms) together at each heartbeat, so the
// rate is the change in tokens_out divided by the change in last_heartbeat between
// two polls that saw different heartbeats. It is exact whatever the poll interval,
// and shows "–" until a worker's second heartbeat has been seen.
import { getJSON } from "./api.js";
import { drawChart } from "./chart.js";
import { el } from "./dom.js";

const POLL_MS = 1500;
// The charts show the time since the first poll, from one minute up to five.
const MIN_SPAN_S = 60;
const MAX_SPAN_S = 300;

function formatRate(rate) {
  if (rate == null) return "–";
  return rate >= 100 ? rate.toFixed(0) : rate.toFixed(1);
}

/** Wires the fleet section; `show()` starts polling and `hide()` stops it. */
export function createFleet(root) {
  const $ = (sel) => root.querySelector(sel);
  const body = $("tbody");
  const updated = $("#fleet-updated");
  const status = $("#fleet-status");
  const charts = [
    { key: "queue", svg: $("#chart-queue"), top: $("#chart-queue-top"), now: $("#chart-queue-now") },
    { key: "tps", svg: $("#chart-tps"), top: $("#chart-tps-top"), now: $("#chart-tps-now") },
  ];
  const labels = [...root.querySelectorAll("thead th")].map((th) => th.textContent); // for narrow cards
  const seen = new Map(); // worker id -> { tokens, beat, rate }
  const samples = []; // { t, queue, tps }
  let epoch = 0; // bumps on every show/hide, so a stale poll never reschedules itself
  let timer = 0;

  function rateOf(w) {
    const prev = seen.get(w.id);
    let rate = prev?.rate ?? null;
    if (prev && w.last_heartbeat > prev.beat) {
      const tokens = w.tokens_out - prev.tokens;
      rate = tokens >= 0 ? tokens / (w.last_heartbeat - prev.beat) : null; // < 0: the worker restarted
    }
    if (!prev || w.last_heartbeat > prev.beat) seen.set(w.id, { tokens: w.tokens_out, beat: w.last_heartbeat, rate });
    return rate;
  }

  function row(w, now) {
    const cells = [
      w.models.join(", "),
      w.engine,
      el("span", { class: `badge ${w.status}` }, w.status),
      `${w.queue} / ${w.max_concurrency}`,
      formatRate(w.rate),
      String(w.jobs_done),
      `${Math.max(0, now - w.last_heartbeat).toFixed(1)} s ago`,
    ].map((content, i) => el("td", { "data-label": labels[i + 1], class: i >= 3 ? "num" : null }, content));
    return el("tr", { "data-worker-id": w.id }, el("th", { scope: "row" }, w.id), ...cells);
  }

  function renderTable(workers, now) {
    if (!workers.length) {
      const empty = el("td", { colspan: 8, class: "empty" }, "No live worker. Start one: redserve worker --engine echo --model echo");
      body.replaceChildren(el("tr", {}, empty));
      return;
    }
    body.replaceChildren(...workers.map((w) => row(w, now)));
  }

  function renderCharts(now) {
    const span = Math.min(MAX_SPAN_S, Math.max(MIN_SPAN_S, now - samples[0].t));
    const since = `${Math.round(span / 60)} min ago`;
    root.querySelectorAll(".since").forEach((node) => (node.textContent = since));
    for (const chart of charts) {
      const points = samples.map((s) => ({ t: s.t, v: s[chart.key] }));
      chart.top.textContent = `max ${drawChart(chart.svg, points, { now, span })}`;
      const current = points.length ? points[points.length - 1].v : 0;
      chart.now.textContent = chart.key === "tps" ? formatRate(current) : String(current);
    }
  }

  function render({ now, workers }) {
    const live = new Set(workers.map((w) => w.id));
    for (const id of seen.keys()) if (!live.has(id)) seen.delete(id);
    for (const w of workers) w.rate = rateOf(w);
    samples.push({
      t: now,
      queue: workers.reduce((n, w) => n + w.queue, 0),
      tps: workers.reduce((n, w) => n + (w.rate ?? 0), 0),
    });
    while (samples[0].t < now - MAX_SPAN_S) samples.shift();
    renderTable(workers, now);
    renderCharts(now);
    updated.textContent = `updated ${new Date(now * 1000).toLocaleTimeString()}`;
  }

  async function poll(mine) {
    try {
      const fleet = await getJSON("/api/fleet");
      if (mine !== epoch) return;
      render(fleet);
      status.textContent = "";
    } catch (err) {
      if (mine === epoch) status.textContent = `Cannot read the fleet: ${err.message}`;
    } finally {
      if (mine === epoch) timer = setTimeout(() => poll(mine), POLL_MS);
    }
  }

  return {
    show() {
      clearTimeout(timer);
      epoch += 1;
      poll(epoch);
    },
    hide() {
      clearTimeout(timer);
      epoch += 1;
    },
  };
}
