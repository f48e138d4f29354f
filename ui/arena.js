// The Arena view: anonymous battles. Two models the gateway draws answer side by side
// as "Model A" and "Model B"; a vote reveals their names. The browser cannot learn them
// sooner: no battle answer, stream event or error names a model until the vote is stored
// (see gateway/arena/routes.py), and this view never asks for the model list.
import { FINISH_NOTES, postEvents, postJSON } from "./api.js";
import { el, liveMarkdown, submitOnEnter } from "./dom.js";

const SIDES = ["a", "b"];
const LABEL = { a: "Model A", b: "Model B" };
const VERDICTS = {
  a: (m) => `${m.a} (Model A) is better`,
  b: (m) => `${m.b} (Model B) is better`,
  tie: () => "a tie",
  both_bad: () => "both are bad",
};
// Refusals that mean the battle cannot go on: only a new one can.
const OVER = new Set(["battle_voted", "battle_ended", "battle_not_found"]);

/** Wires the arena section. `params` is the shared settings panel: a battle uses its sampling fields. */
export function createArena(root, params) {
  const $ = (sel) => root.querySelector(sel);
  const panes = Object.fromEntries(SIDES.map((side) => {
    const box = $(`#arena-${side}`);
    return [side, { box, log: box.querySelector(".arena-log"), name: box.querySelector(".model-name") }];
  }));
  const form = $("form");
  const prompt = $("textarea");
  const status = $("#arena-status");
  const buttons = { send: $("#arena-send"), regenerate: $("#arena-regenerate"), fresh: $("#arena-new") };
  const votes = [...root.querySelectorAll("[data-winner]")];
  // state: idle (no battle yet) | open | voted | ended; `turns` counts completed turns.
  let battle = { id: null, state: "idle", turns: 0 };
  let busy = false;

  function sync() {
    const playable = battle.state === "idle" || battle.state === "open";
    buttons.send.disabled = busy || !playable;
    prompt.disabled = !playable;
    buttons.regenerate.disabled = busy || battle.state !== "open" || battle.turns === 0;
    buttons.fresh.disabled = busy;
    votes.forEach((b) => (b.disabled = busy || battle.state !== "open" || battle.turns === 0));
  }

  function say(text, alert = false) {
    status.textContent = text;
    status.classList.toggle("alert", alert);
  }

  function bubble(side, role, text = "") {
    const body = el("div", { class: "body" });
    const node = el("article", { class: `bubble ${role}`, "aria-label": role === "user" ? "You" : LABEL[side] },
      el("div", { class: "who" }, role === "user" ? "You" : LABEL[side]), body);
    if (role === "user") body.textContent = text;
    panes[side].log.append(node);
    panes[side].log.scrollTop = panes[side].log.scrollHeight;
    return { node, body };
  }

  /** A reply bubble on each side, ready to stream into. */
  function startReplies() {
    return Object.fromEntries(SIDES.map((side) => {
      const { node, body } = bubble(side, "assistant");
      node.setAttribute("aria-busy", "true");
      return [side, { node, body, text: "", view: liveMarkdown(body, panes[side].log), finish: null, done: false }];
    }));
  }

  function endReply(reply, note, error = false) {
    reply.view.flush();
    reply.done = true;
    reply.node.setAttribute("aria-busy", "false");
    reply.node.classList.toggle("error", error);
    if (note) reply.node.append(el("p", { class: "note", role: error ? "alert" : null }, note));
  }

  /** Read one turn's events into `replies`; the battle's state after it. */
  async function stream(events, replies) {
    let outcome = null;
    try {
      outcome = await read(events, replies);
    } catch {
      outcome = null; // the connection broke mid-stream
    }
    for (const reply of Object.values(replies)) {
      if (!reply.done) endReply(reply, "The reply was cut off.", true);
    }
    return outcome ?? { state: "ended", error: "the connection to the gateway broke" };
  }

  async function read(events, replies) {
    let outcome = null;
    for await (const ev of events) {
      const reply = replies[ev.side];
      if (ev.state) {
        outcome = ev;
      } else if (!reply) {
        continue;
      } else if (ev.reset) { // that side's worker restarted the reply from scratch
        reply.text = "";
        reply.view.update("");
      } else if (ev.text) {
        reply.text += ev.text;
        reply.view.update(reply.text);
      } else if (ev.finish_reason) {
        reply.finish = ev.finish_reason;
      } else if (ev.end) {
        if (ev.error) endReply(reply, `This reply failed: ${ev.error.message}`, true);
        else endReply(reply, FINISH_NOTES[reply.finish]);
      }
    }
    return outcome;
  }

  /** Start a stream of both sides' replies; `before`/`undo` shape the panes around a refused request. */
  async function play(path, body, { before, undo }) {
    busy = true;
    sync();
    say("Both models are answering…");
    const placed = before();
    try {
      if (!battle.id) {
        const created = await postJSON("/api/arena/battles", {});
        battle = { id: created.id, state: created.state, turns: 0 };
      }
      const events = await postEvents(path(battle.id), { ...body, ...params.sampling() });
      const replies = placed.replies ?? placed.make();
      const outcome = await stream(events, replies);
      battle.state = outcome.state;
      if (outcome.state === "open") {
        battle.turns += 1;
        say("Which reply is better? Vote below, or keep chatting.");
      } else {
        say(`The battle ended without a vote: ${outcome.error ?? "a reply failed"}. Start a new battle.`, true);
      }
    } catch (err) {
      undo(placed);
      refused(err);
    } finally {
      busy = false;
      sync();
    }
  }

  function refused(err) {
    if (err.code === "arena_unavailable") {
      say(`${err.detail} Start workers for two different models, then try again.`, true);
    } else if (err.code === "content_filter") {
      say(`Not sent: moderation flagged this message (${err.detail}). This battle no longer counts on the leaderboard.`, true);
    } else if (OVER.has(err.code)) {
      battle.state = "ended";
      say(`${err.detail} Start a new battle.`, true);
    } else {
      say(err.message, true);
    }
  }

  function send(text) {
    return play((id) => `/api/arena/battles/${id}/turns`, { content: text }, {
      before: () => ({ users: SIDES.map((side) => bubble(side, "user", text)), replies: startReplies() }),
      undo: (placed) => {
        placed.users.forEach((u) => u.node.remove());
        Object.values(placed.replies).forEach((r) => r.node.remove());
        if (!prompt.value) prompt.value = text;
      },
    });
  }

  function regenerate() {
    // The last replies stay until the new ones start: a refused request leaves them as they were.
    const last = SIDES.map((side) => panes[side].log.lastElementChild);
    return play((id) => `/api/arena/battles/${id}/regenerate`, {}, {
      before: () => {
        last.forEach((node) => node?.classList.add("stale"));
        return {
          make: () => {
            last.forEach((node) => node?.classList.contains("assistant") && node.remove());
            return startReplies();
          },
        };
      },
      undo: () => last.forEach((node) => node?.classList.remove("stale")),
    });
  }

  async function vote(winner) {
    busy = true;
    sync();
    try {
      const { models } = await postJSON(`/api/arena/battles/${battle.id}/vote`, { winner });
      battle.state = "voted";
      for (const side of SIDES) {
        panes[side].name.textContent = models[side];
        panes[side].box.classList.toggle("winner", winner === side);
      }
      votes.forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.winner === winner)));
      say(`Vote recorded: ${VERDICTS[winner](models)}. Thank you! Start a new battle to vote again.`);
    } catch (err) {
      refused(err);
    } finally {
      busy = false;
      sync();
      if (battle.state !== "open") buttons.fresh.focus();
    }
  }

  function reset() {
    battle = { id: null, state: "idle", turns: 0 };
    for (const side of SIDES) {
      panes[side].log.replaceChildren();
      panes[side].name.textContent = "";
      panes[side].box.classList.remove("winner");
    }
    votes.forEach((b) => b.removeAttribute("aria-pressed"));
    say("");
    sync();
    prompt.focus();
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = prompt.value.trim();
    if (!text || busy || buttons.send.disabled) return;
    prompt.value = "";
    send(text);
  });
  submitOnEnter(prompt, form);
  buttons.regenerate.addEventListener("click", regenerate);
  buttons.fresh.addEventListener("click", reset);
  votes.forEach((b) => b.addEventListener("click", () => vote(b.dataset.winner)));
  sync();
  return {};
}
