// The model pickers: filled from /v1/models, and honest when a chosen model has gone.
import { listModels } from "./api.js";

function label(model) {
  return `${model.id} (${model.workers} worker${model.workers === 1 ? "" : "s"})`;
}

/**
 * Refill every select with the live models, keeping each one's choice. A chosen model
 * that has no live worker stays listed as gone, so sending shows why it fails
 * instead of silently switching to another model. `fallbacks[i]` is the index of the
 * model a still empty select `i` starts on (two pickers start on two models).
 */
export async function refreshModelSelects(selects, fallbacks = []) {
  const models = await listModels();
  selects.forEach((select, i) => {
    const chosen = select.value;
    const options = models.map((m) => new Option(label(m), m.id));
    if (chosen && !models.some((m) => m.id === chosen)) options.unshift(new Option(`${chosen} (gone)`, chosen));
    const same = options.length === select.options.length &&
      options.every((o, j) => o.value === select.options[j].value && o.text === select.options[j].text);
    if (same) return; // leave an open dropdown alone
    select.replaceChildren(...options);
    if (chosen) select.value = chosen;
    else if (models.length) select.value = models[Math.min(fallbacks[i] ?? 0, models.length - 1)].id;
  });
  return models;
}
