// The Chat view: multi-turn conversation with one model, streamed and rendered as Markdown.
// Stop aborts the fetch; the gateway notices the disconnect and cancels the job on its worker.
// Under each reply, 👍 👎 🚩 send feedback (POST /api/feedback) with the conversation it answers.
import { FINISH_NOTES, postJSON, streamChat } from "./api.js";
import { el, liveMarkdown, submitOnEnter } from "./dom.js";

const FEEDBACK = [
  { rating: "up", icon: "👍", label: "Upvote" },
  { rating: "down", icon: "👎", label: "Downvote" },
  { rating: "flag", icon: "🚩", label: "Flag" },
];
const OPPOSITE = { up: "down", down: "up" };

/**
 * Buttons that judge one reply: `sent` is what the reply answered ({ model, messages }).
 * A judgement is sent once; up and down exclude each other, a flag goes with either.
 */
function feedbackBar(sent, reply) {
  const note = el("span", { class: "fb-note", role: "alert" });
  const buttons = {};
  async function judge(rating) {
    const button = buttons[rating];
    button.disabled = true;
    note.textContent = "";
    try {
      await postJSON("/api/feedback", { model: sent.model, rating, messages: sent.messages, reply });
      button.setAttribute("aria-pressed", "true");
      button.classList.add("done");
      if (OPPOSITE[rating]) buttons[OPPOSITE[rating]].disabled = true;
    } catch (err) {
      button.disabled = false;
      note.textContent = `Feedback not sent: ${err.message}`;
    }
  }
  for (const { rating, icon, label } of FEEDBACK) {
    buttons[rating] = el("button", { type: "button", class: "fb", "aria-label": label, title: label, "aria-pressed": "false",
      "data-rating": rating }, icon);
    buttons[rating].addEventListener("click", () => judge(rating));
  }
  return el("div", { class: "feedback", role: "group", "aria-label": "Feedback on this reply" }, ...Object.values(buttons), note);
}

/**
 * Wires the chat section. `params` is the shared settings panel (see params.js);
 * `onFailure` runs after a failed request (the model lists may be stale).
 */
export function createChat(root, params, onFailure = () => {}) {
  const $ = (sel) => root.querySelector(sel);
  const log = $(".log");
  const form = $("form");
  const prompt = $("textarea");
  const model = $("#chat-model");
  const buttons = { send: $("#chat-send"), stop: $("#chat-stop"), regenerate: $("#chat-regenerate"), clear: $("#chat-clear") };
  // Each turn: { role, content, node, status } with status streaming | done | stopped | error.
  const turns = [];
  let controller = null;

  function sync() {
    const busy = controller !== null;
    buttons.send.disabled = busy;
    buttons.stop.disabled = !busy;
    buttons.regenerate.disabled = busy || !turns.some((t) => t.role === "user");
    buttons.clear.disabled = busy || turns.length === 0;
  }

  /** The history a request sends: failed and empty replies are left out. */
  function history() {
    return turns
      .filter((t) => t.role === "user" || (t.content && t.status !== "error"))
      .map((t) => ({ role: t.role, content: t.content }));
  }

  function addTurn(role, content, who) {
    const body = el("div", { class: "body" });
    const node = el("article", { class: `msg ${role}`, "aria-label": who }, el("div", { class: "who" }, who), body);
    const turn = { role, content, node, body, status: "done" };
    if (role === "user") body.textContent = content;
    turns.push(turn);
    log.append(node);
    log.scrollTop = log.scrollHeight;
    return turn;
  }

  function finish(turn, status, note) {
    turn.status = status;
    turn.node.setAttribute("aria-busy", "false");
    turn.node.classList.toggle("error", status === "error");
    if (note) turn.node.append(el("p", { class: "note", role: status === "error" ? "alert" : null }, note));
  }

  async function reply() {
    const name = model.value;
    if (!name) {
      finish(addTurn("assistant", "", "redserve"), "error", "No model to talk to: start a worker, then pick it.");
      return;
    }
    const messages = params.messages(history());
    const turn = addTurn("assistant", "", name);
    turn.status = "streaming";
    turn.node.setAttribute("aria-busy", "true");
    const view = liveMarkdown(turn.body, log);
    controller = new AbortController();
    sync();
    try {
      const { finishReason } = await streamChat(
        { model: name, messages, ...params.sampling() },
        {
          signal: controller.signal,
          onDelta: (piece) => {
            turn.content += piece;
            view.update(turn.content);
          },
        },
      );
      finish(turn, "done", FINISH_NOTES[finishReason]);
    } catch (err) {
      const stopped = err.name === "AbortError";
      finish(turn, stopped ? "stopped" : "error", stopped ? FINISH_NOTES.stopped : err.message);
      if (!stopped) onFailure();
    } finally {
      view.flush();
      if (turn.content && turn.status !== "error") turn.node.append(feedbackBar({ model: name, messages }, turn.content));
      controller = null;
      sync();
      prompt.focus();
    }
  }

  function send(text) {
    addTurn("user", text, "You");
    return reply();
  }

  function regenerate() {
    while (turns.length && turns[turns.length - 1].role === "assistant") turns.pop().node.remove();
    if (turns.length) reply();
  }

  function clear() {
    turns.splice(0).forEach((t) => t.node.remove());
    sync();
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller) return;
    prompt.value = "";
    send(text);
  });
  submitOnEnter(prompt, form);
  buttons.stop.addEventListener("click", () => controller?.abort());
  buttons.regenerate.addEventListener("click", regenerate);
  buttons.clear.addEventListener("click", clear);
  sync();
  return { selects: [model] };
}
