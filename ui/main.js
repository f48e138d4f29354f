// The page: views switched by the URL hash (#chat, #compare, #arena, #leaderboard, #fleet), the API key,
// the model lists.
import { getApiKey, setApiKey } from "./api.js";
import { createArena } from "./arena.js";
import { createChat } from "./chat.js";
import { createCompare } from "./compare.js";
import { createFleet } from "./fleet.js";
import { createLeaderboard } from "./leaderboard.js";
import { refreshModelSelects } from "./models.js";
import { createParams } from "./params.js";

const $ = (id) => document.getElementById(id);

function setupApiKey(onChange) {
  const form = $("key-form");
  const input = $("api-key");
  const state = $("key-state");
  const show = () => {
    state.textContent = getApiKey() ? "set" : "none";
  };
  input.value = getApiKey();
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey(input.value.trim());
    show();
    form.closest("details").open = false;
    onChange();
  });
  $("key-forget").addEventListener("click", () => {
    input.value = "";
    setApiKey("");
    show();
    onChange();
  });
  show();
}

function main() {
  const params = createParams($("settings"));
  const status = $("status");
  const chat = createChat($("view-chat"), params, refreshModels);
  const compare = createCompare($("view-compare"), params, refreshModels);
  const arena = createArena($("view-arena"), params);
  const leaderboard = createLeaderboard($("view-leaderboard"));
  const fleet = createFleet($("view-fleet"));
  const views = { chat: {}, compare: {}, arena, leaderboard, fleet };
  // Views that pick models by name. The arena must not list them: its models stay anonymous until the vote.
  const picking = new Set(["chat", "compare"]);
  let current = null;

  function refreshModels() {
    return refreshModelSelects([...chat.selects, ...compare.selects], [0, 0, 1])
      .then((models) => {
        status.textContent = models.length ? "" : "No live model: start a worker (redserve worker --engine echo --model echo).";
      })
      .catch((err) => {
        status.textContent = `Cannot list the models: ${err.message}`;
      });
  }

  const route = () => {
    const asked = location.hash.slice(1);
    const name = Object.hasOwn(views, asked) ? asked : "chat";
    if (name === current) return;
    views[current]?.hide?.();
    current = name;
    for (const view of Object.keys(views)) $(`view-${view}`).hidden = view !== name;
    for (const link of document.querySelectorAll("nav a")) {
      if (link.hash === `#${name}`) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    $("settings").hidden = name === "fleet" || name === "leaderboard";
    views[name].show?.();
    if (picking.has(name)) refreshModels();
  };

  for (const select of [...chat.selects, ...compare.selects]) select.addEventListener("focus", refreshModels);
  setupApiKey(() => {
    if (picking.has(current)) refreshModels();
    else if (current === "leaderboard") leaderboard.show();
  });
  $("params-panel").open = window.matchMedia("(min-width: 60rem)").matches;
  window.addEventListener("hashchange", route);
  route();
}

main();
