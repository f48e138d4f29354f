// The generation settings panel shared by Chat and Side by side: system prompt and sampling.

const NUMBERS = [
  ["temperature", parseFloat],
  ["top_p", parseFloat],
  ["max_tokens", (v) => parseInt(v, 10)],
];

/** Reads the panel's inputs (ids `system`, `temperature`, `top_p`, `max_tokens`) when asked. */
export function createParams(root) {
  const input = (name) => root.querySelector(`#${name}`);
  return {
    /** Sampling fields for the request body; an empty input means the engine's default. */
    sampling() {
      const out = {};
      for (const [name, parse] of NUMBERS) {
        const raw = input(name).value.trim();
        if (raw !== "" && !Number.isNaN(parse(raw))) out[name] = parse(raw);
      }
      return out;
    },
    system() {
      return input("system").value.trim();
    },
    /** The messages a request sends: the system prompt (if any) first. */
    messages(turns) {
      const system = this.system();
      return system ? [{ role: "system", content: system }, ...turns] : turns;
    },
  };
}
