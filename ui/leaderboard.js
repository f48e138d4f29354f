// The Leaderboard view: GET /api/arena/leaderboard as a table, a plot of each model's
// rating with its 95% interval (inline SVG) and the head-to-head win-fraction matrix.
import { getJSON } from "./api.js";
import { svgEl } from "./chart.js";
import { el } from "./dom.js";

// The plot's drawing units (the SVG scales to its box, keeping its proportions).
const PLOT = { width: 640, label: 150, right: 24, row: 28, top: 10, axis: 26 };

const fixed = (v) => (Math.round(v) || 0).toFixed(0); // never "-0"
const spread = (v) => fixed(Math.max(0, v));
const percent = (f) => `${Math.round(f * 100)}%`;

/** About five round-numbered ticks over [lo, hi]. */
export function ticks(lo, hi) {
  const raw = (hi - lo) / 5;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((m) => m >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) out.push(t);
  return out;
}

/** A cell's colour for a win fraction: red (0) through neutral (½) to blue (1). */
export function fractionColor(f) {
  const hue = f < 0.5 ? 4 : 214;
  const lightness = 96 - Math.abs(f - 0.5) * 2 * 44;
  return { background: `hsl(${hue} 70% ${lightness.toFixed(0)}%)`, dark: lightness < 66 };
}

function drawPlot(svg, rows) {
  const { width, label, right, row, top, axis } = PLOT;
  const height = top + rows.length * row + axis;
  let lo = Math.min(...rows.map((r) => Math.min(r.ci_low, r.rating)));
  let hi = Math.max(...rows.map((r) => Math.max(r.ci_high, r.rating)));
  if (hi - lo < 20) [lo, hi] = [(lo + hi) / 2 - 10, (lo + hi) / 2 + 10];
  const pad = (hi - lo) * 0.06;
  [lo, hi] = [lo - pad, hi + pad];
  const x = (v) => label + ((v - lo) / (hi - lo)) * (width - label - right);
  const bottom = top + rows.length * row;
  const grid = ticks(lo, hi).flatMap((t) => [
    svgEl("line", { class: "grid", x1: x(t), x2: x(t), y1: top - 4, y2: bottom }),
    svgEl("text", { class: "tick", x: x(t), y: bottom + 16, "text-anchor": "middle" }, fixed(t)),
  ]);
  const marks = rows.flatMap((r, i) => {
    const y = top + i * row + row / 2;
    const tip = svgEl("title", {}, `${r.model}: ${fixed(r.rating)} (95% CI ${fixed(r.ci_low)} to ${fixed(r.ci_high)})`);
    return [
      svgEl("text", { class: "name", x: label - 10, y: y + 4, "text-anchor": "end" }, r.model),
      svgEl("g", { class: "model", "data-model": r.model },
        tip,
        svgEl("line", { class: "ci", x1: x(r.ci_low), x2: x(r.ci_high), y1: y, y2: y }),
        svgEl("line", { class: "ci", x1: x(r.ci_low), x2: x(r.ci_low), y1: y - 5, y2: y + 5 }),
        svgEl("line", { class: "ci", x1: x(r.ci_high), x2: x(r.ci_high), y1: y - 5, y2: y + 5 }),
        svgEl("circle", { class: "point", cx: x(r.rating), cy: y, r: 5 })),
    ];
  });
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren(...grid, ...marks);
}

function drawMatrix(table, { models, matrix }) {
  const head = el("tr", {}, el("th", { scope: "col", class: "corner" }, "Winner ↓ / opponent →"),
    ...models.map((m) => el("th", { scope: "col" }, m)));
  const body = models.map((model, i) => el("tr", {}, el("th", { scope: "row" }, model),
    ...matrix[i].map((f, j) => {
      if (i === j) return el("td", { class: "self", "aria-label": "itself" });
      if (f == null) return el("td", { class: "none", title: `${model} never met ${models[j]}` }, "–");
      const color = fractionColor(f);
      const cell = el("td", { class: `cell${color.dark ? " dark" : ""}`, "data-fraction": f,
        title: `${model} won ${percent(f)} of its decided battles against ${models[j]}` }, percent(f));
      cell.style.background = color.background;
      return cell;
    })));
  table.replaceChildren(el("thead", {}, head), el("tbody", {}, ...body));
}

/** Wires the leaderboard section; `show()` loads it (again). */
export function createLeaderboard(root) {
  const $ = (sel) => root.querySelector(sel);
  const body = $("#lb-table tbody");
  const count = $("#lb-votes");
  const status = $("#lb-status");
  const figures = $("#lb-figures");
  let loading = 0;

  function render(data) {
    count.textContent = `${data.votes} vote${data.votes === 1 ? "" : "s"}`;
    const rows = data.rows;
    figures.hidden = rows.length === 0;
    status.textContent = rows.length ? "" : "No votes yet: vote in the Arena to rank the models.";
    if (!rows.length) {
      body.replaceChildren(el("tr", {}, el("td", { class: "empty", colspan: 7 }, "No votes yet")));
      return;
    }
    body.replaceChildren(...rows.map((r) => el("tr", { "data-model": r.model },
      el("td", { class: "num" }, String(r.rank)),
      el("th", { scope: "row" }, r.model),
      el("td", { class: "num" }, fixed(r.rating)),
      el("td", { class: "num", title: `[${fixed(r.ci_low)}, ${fixed(r.ci_high)}]` },
        `−${spread(r.rating - r.ci_low)}/+${spread(r.ci_high - r.rating)}`),
      el("td", { class: "num" }, fixed(r.elo)),
      el("td", { class: "num" }, String(r.votes)),
      el("td", { class: "num" }, percent(r.win_rate)))));
    drawPlot($("#lb-plot"), rows);
    drawMatrix($("#lb-matrix"), data.win_fractions);
  }

  async function load() {
    const mine = ++loading;
    status.textContent = "Loading…";
    try {
      const data = await getJSON("/api/arena/leaderboard");
      if (mine === loading) render(data);
    } catch (err) {
      if (mine === loading) status.textContent = `Cannot load the leaderboard: ${err.message}`;
    }
  }

  $("#lb-refresh").addEventListener("click", load);
  return { show: load };
}
