// A minimal chat page over the gateway's own OpenAI API: streamed replies, Stop cancels
// the request (the gateway then cancels the job on its worker).
const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;

async function loadModels() {
  const res = await fetch("/v1/models");
  const { data } = await res.json();
  $("model").replaceChildren(...data.map((m) => new Option(`${m.id} (${m.workers} worker${m.workers === 1 ? "" : "s"})`, m.id)));
  if (!data.length) $("status").textContent = "No live model: start a worker.";
}

function bubble(role, text = "") {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let reply = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: $("model").value, messages: history, stream: true }),
      signal: controller.signal,
    });
    if (!res.ok) throw new Error((await res.json()).error?.message || res.statusText);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      const lines = buf.split("\n");
      buf = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const obj = JSON.parse(line.slice(6));
        if (obj.error) throw new Error(obj.error.message);
        reply += obj.choices?.[0]?.delta?.content || "";
        out.textContent = reply;
      }
    }
    history.push({ role: "assistant", content: reply });
  } catch (err) {
    if (err.name === "AbortError") {
      out.textContent = reply + " [stopped]";
      if (reply) history.push({ role: "assistant", content: reply });
    } else {
      out.classList.add("error");
      out.textContent = `Error: ${err.message}`;
      history.pop();
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller?.abort());
$("clear").addEventListener("click", () => { history.length = 0; $("log").replaceChildren(); });
loadModels().catch((e) => { $("status").textContent = `Cannot list models: ${e.message}`; });
