// Small DOM helpers shared by the views.
import { renderMarkdown } from "./markdown.js";

/** `el("button", { class: "x", type: "button" }, "text", child)`: attributes, then children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value == null) continue;
    if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children);
  return node;
}

function nearBottom(scroller) {
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 48;
}

/**
 * A node that shows streaming Markdown: `update(text)` repaints at most once a frame
 * (re-rendering the whole reply keeps half-typed constructs right), `flush()` paints now.
 * The scroller follows the text only if the reader was already at the bottom.
 */
export function liveMarkdown(node, scroller = null) {
  let text = "";
  let frame = 0;
  const paint = () => {
    frame = 0;
    const follow = scroller && nearBottom(scroller);
    node.innerHTML = renderMarkdown(text);
    if (follow) scroller.scrollTop = scroller.scrollHeight;
  };
  return {
    update(next) {
      text = next;
      if (!frame) frame = requestAnimationFrame(paint);
    },
    flush() {
      if (frame) cancelAnimationFrame(frame);
      paint();
    },
  };
}

/** Enter submits `form` from `textarea`; Shift+Enter (or an IME composition) keeps typing. */
export function submitOnEnter(textarea, form) {
  textarea.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
}
