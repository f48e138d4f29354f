// The Side by side view: one prompt streams into two models at once, then a person votes.
// A vote goes to POST /api/votes, which appends it to the Redis stream `<prefix>:votes`.
import { FINISH_NOTES, postJSON, streamChat } from "./api.js";
import { liveMarkdown, submitOnEnter } from "./dom.js";

const VERDICTS = {
  left: (l) => `${l} (left) is better`,
  right: (_l, r) => `${r} (right) is better`,
  tie: () => "a tie",
  both_bad: () => "both are bad",
};

/**
 * Wires the side-by-side section. `params` is the shared settings panel (see params.js);
 * `onFailure` runs after a failed request (the model lists may be stale).
 */
export function createCompare(root, params, onFailure = () => {}) {
  const $ = (sel) => root.querySelector(sel);
  const sides = ["left", "right"].map((name) => ({
    select: $(`#${name}-model`),
    title: $(`#${name}-title`),
    box: $(`#${name}-column`),
    out: $(`#${name}-out`),
    note: $(`#${name}-note`),
    text: "",
  }));
  const form = $("form");
  const prompt = $("textarea");
  const send = $("#compare-send");
  const stop = $("#compare-stop");
  const votes = [...root.querySelectorAll("[data-winner]")];
  const status = $("#compare-status");
  let controller = null;
  let round = null; // what the coming vote is about

  function setBusy(busy) {
    send.disabled = busy;
    stop.disabled = !busy;
    sides.forEach((s) => (s.select.disabled = busy));
  }

  function setVoting(open) {
    votes.forEach((b) => (b.disabled = !open));
  }

  async function streamSide(side, body, signal) {
    side.text = "";
    side.title.textContent = body.model;
    side.note.textContent = "";
    side.note.removeAttribute("role");
    side.box.setAttribute("aria-busy", "true");
    side.box.classList.remove("error");
    const view = liveMarkdown(side.out, side.out);
    view.flush();
    try {
      const { finishReason } = await streamChat(body, {
        signal,
        onDelta: (piece) => {
          side.text += piece;
          view.update(side.text);
        },
      });
      side.note.textContent = FINISH_NOTES[finishReason] ?? "";
    } catch (err) {
      if (err.name === "AbortError") {
        side.note.textContent = FINISH_NOTES.stopped;
      } else {
        side.box.classList.add("error");
        side.note.setAttribute("role", "alert");
        side.note.textContent = err.message;
        onFailure();
      }
    } finally {
      view.flush();
      side.box.setAttribute("aria-busy", "false");
    }
  }

  async function run(text) {
    const models = sides.map((s) => s.select.value);
    if (models.some((m) => !m)) {
      status.textContent = "Pick two models first (start workers if the lists are empty).";
      return;
    }
    const sampling = params.sampling();
    const messages = params.messages([{ role: "user", content: text }]);
    round = { prompt: text, system: params.system(), params: sampling, models };
    controller = new AbortController();
    setBusy(true);
    setVoting(false);
    status.textContent = "";
    await Promise.all(sides.map((s, i) => streamSide(s, { model: models[i], messages, ...sampling }, controller.signal)));
    controller = null;
    setBusy(false);
    setVoting(true);
    status.textContent = "Which reply is better? Vote below.";
  }

  async function vote(winner) {
    setVoting(false);
    const [left, right] = round.models;
    try {
      await postJSON("/api/votes", {
        winner, left_model: left, right_model: right, prompt: round.prompt, system: round.system,
        left_reply: sides[0].text, right_reply: sides[1].text, params: round.params,
      });
      status.textContent = `Vote recorded: ${VERDICTS[winner](left, right)}. Thank you!`;
    } catch (err) {
      status.textContent = `The vote was not recorded: ${err.message}`;
      setVoting(true);
    }
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller) return;
    run(text);
  });
  submitOnEnter(prompt, form);
  stop.addEventListener("click", () => controller?.abort());
  votes.forEach((b) => b.addEventListener("click", () => vote(b.dataset.winner)));
  setBusy(false);
  setVoting(false);
  return { selects: sides.map((s) => s.select) };
}
