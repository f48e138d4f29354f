// A tiny time-series chart in inline SVG: no library, one line (with a faint area) per series.

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 300;
const HEIGHT = 80;

/** An SVG element: `svgEl("line", { x1: 0 }, ...children)` (children: nodes or text). */
export function svgEl(tag, attrs = {}, ...children) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  node.append(...children);
  return node;
}

/** The smallest 1, 2 or 5 times a power of ten that is at least `value` (at least 1). */
export function niceMax(value) {
  const v = Math.max(1, value);
  const power = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map((m) => m * power).find((m) => m >= v);
}

/** Consecutive runs of points no more than `gap` seconds apart: a pause in polling breaks the line. */
function segments(points, gap) {
  const runs = [];
  for (const p of points) {
    const run = runs[runs.length - 1];
    if (run && p.t - run[run.length - 1].t <= gap) run.push(p);
    else runs.push([p]);
  }
  return runs;
}

/**
 * Draw `points` ([{t, v}], t in epoch seconds) of the `span` seconds up to `now` into `svg`.
 * Returns the top of the scale, for a label outside the (freely stretched) drawing.
 */
export function drawChart(svg, points, { now, span = 300, gap = 6 }) {
  const top = niceMax(Math.max(0, ...points.map((p) => p.v)));
  const x = (t) => (((t - (now - span)) / span) * WIDTH).toFixed(1);
  const y = (v) => (HEIGHT - (v / top) * (HEIGHT - 2) - 1).toFixed(1);
  svg.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const grid = [0.25, 0.5, 0.75].map((f) =>
    svgEl("line", { class: "grid", x1: 0, x2: WIDTH, y1: HEIGHT * f, y2: HEIGHT * f, "vector-effect": "non-scaling-stroke" }));
  const shapes = segments(points, gap).flatMap((run) => {
    const line = run.map((p) => `${x(p.t)},${y(p.v)}`).join(" ");
    const area = `${x(run[0].t)},${HEIGHT} ${line} ${x(run[run.length - 1].t)},${HEIGHT}`;
    return [
      svgEl("polygon", { class: "area", points: area }),
      svgEl("polyline", { class: "line", points: line, "vector-effect": "non-scaling-stroke" }),
    ];
  });
  svg.replaceChildren(...grid, ...shapes);
  return top;
}
