// Talking to the gateway: the API key, JSON calls, streamed chat and errors a person can read.

const KEY_STORAGE = "redserve.apiKey";

/** What a reply's end means for its reader, when it is not a plain finish. */
export const FINISH_NOTES = {
  stopped: "Stopped.",
  length: "Cut off at the max tokens limit.",
};

export class ApiError extends Error {
  /** `code` and `detail` are the gateway's own error code and message, when it sent an OpenAI error body. */
  constructor(message, status = 0, { code = "", detail = "" } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.detail = detail || message;
  }
}

export function getApiKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled (private mode, file://): no key
  }
}

export function setApiKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: nothing to remember the key in */
  }
}

function withAuth(headers = {}) {
  const key = getApiKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : headers;
}

/** What a failed request means for the person in front of the page. */
export function explain(status, message, retryAfter = null) {
  const hints = {
    401: "The gateway needs a valid API key: set it under “API key” at the top.",
    403: "The gateway refused this API key: check the one under “API key” at the top.",
    404: "This model is gone: no worker serves it any more. Pick another model.",
    429: `Too busy right now${retryAfter ? `: try again in ${retryAfter} s` : ", try again shortly"}.`,
    503: "No worker is serving this model right now. Start one, or pick another model.",
    504: "The worker stopped answering in time.",
  };
  const hint = hints[status];
  return hint ? `${hint} (${status}: ${message})` : `Error ${status}: ${message}`;
}

async function errorFrom(res) {
  let message = res.statusText || "request failed";
  let code = "";
  try {
    const { error } = await res.json();
    message = error?.message || message;
    code = error?.code || "";
  } catch {
    /* not an OpenAI-shaped body */
  }
  return new ApiError(explain(res.status, message, res.headers.get("Retry-After")), res.status, { code, detail: message });
}

async function request(path, init = {}) {
  let res;
  try {
    res = await fetch(path, { ...init, headers: withAuth(init.headers) });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError("Cannot reach the gateway: is it still running?");
  }
  if (!res.ok) throw await errorFrom(res);
  return res;
}

export async function getJSON(path, init = {}) {
  return (await request(path, init)).json();
}

export async function postJSON(path, body, init = {}) {
  const res = await request(path, {
    ...init, method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  return res.json();
}

export async function listModels() {
  return (await getJSON("/v1/models")).data;
}

/** The `data:` payloads of a server-sent event stream, one per event. */
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "" && data.length) {
          yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * Stream one chat completion; `onDelta(text)` gets every piece. Aborting `signal`
 * closes the connection, and the gateway then cancels the job on its worker.
 */
export async function streamChat(body, { signal, onDelta }) {
  const res = await request("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  let finishReason = null;
  for await (const data of sseData(res.body)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(`The reply failed: ${chunk.error.message}`);
    const choice = chunk.choices?.[0];
    if (choice?.delta?.content) onDelta(choice.delta.content);
    if (choice?.finish_reason) finishReason = choice.finish_reason;
  }
  return { finishReason };
}

/**
 * POST `body` to an endpoint that answers with a stream of JSON events (the arena's turns).
 * Refusals before the stream starts throw here; the events come from the returned iterator.
 */
export async function postEvents(path, body, { signal } = {}) {
  const res = await request(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  });
  return (async function* events() {
    for await (const data of sseData(res.body)) yield JSON.parse(data);
  })();
}
