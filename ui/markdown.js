// A small, safe Markdown renderer for model replies. Safety comes first: the whole
// text is HTML-escaped before any rule runs, so the only tags in the output are the
// ones made here, and links keep only http(s), mailto, relative and #anchor targets.
// Covered: fenced code blocks (also unclosed, while a reply streams), inline code,
// headings, lists (nested by indentation), block quotes, rules, bold, italic,
// strikethrough, links and bare URLs, paragraphs with line breaks kept.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^ {0,3}&gt;\s?(.*)$/;
const SAFE_URL = /^(https?:\/\/|mailto:|\/(?!\/)|#|\.{1,2}\/)/i;
// Placeholders for finished inline HTML (code, links): NUL never survives the input.
const HOLD = /\u0000(\d+)\u0000/g;

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

/** Markdown source -> HTML string that is safe to assign to innerHTML. */
export function renderMarkdown(source) {
  const clean = String(source ?? "").replace(/\u0000/g, "").replace(/\r\n?/g, "\n");
  return blocks(escapeHtml(clean).split("\n"));
}

function blocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
    } else if (FENCE.test(line)) {
      i = codeBlock(lines, i, out);
    } else if (HEADING.test(line)) {
      const [, marks, text] = line.match(HEADING);
      out.push(`<h${marks.length}>${inline(text)}</h${marks.length}>`);
      i += 1;
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i += 1;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i += 1) quoted.push(lines[i].match(QUOTE)[1]);
      out.push(`<blockquote>${blocks(quoted)}</blockquote>`);
    } else if (ITEM.test(line)) {
      const [html, next] = list(lines, i);
      out.push(html);
      i = next;
    } else {
      i = paragraph(lines, i, out);
    }
  }
  return out.join("\n");
}

function codeBlock(lines, start, out) {
  const [, fence, lang] = lines[start].match(FENCE);
  const body = [];
  let i = start + 1;
  for (; i < lines.length && !lines[i].trim().startsWith(fence); i += 1) body.push(lines[i]);
  const cls = lang ? ` class="language-${lang}"` : "";
  out.push(`<pre><code${cls}>${body.join("\n")}</code></pre>`);
  return i + 1; // past the closing fence (or the end, while the reply is still streaming)
}

function startsBlock(line) {
  const item = line.match(ITEM);
  // Like CommonMark, only a bullet or an ordered list starting at 1 interrupts a paragraph.
  const listStart = item && (!/\d/.test(item[2]) || parseInt(item[2], 10) === 1);
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || listStart;
}

function paragraph(lines, start, out) {
  const text = [lines[start].trim()];
  let i = start + 1;
  for (; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i += 1) text.push(lines[i].trim());
  out.push(`<p>${text.map(inline).join("<br>")}</p>`);
  return i;
}

/** One list (and the lists nested in it, by deeper indentation); returns [html, next line]. */
function list(lines, start) {
  const [, indent, marker] = lines[start].match(ITEM);
  const ordered = /\d/.test(marker);
  const items = [];
  let i = start;
  while (i < lines.length) {
    const m = lines[i].match(ITEM);
    if (m && m[1].length === indent.length && /\d/.test(m[2]) === ordered) {
      items.push({ text: [m[3]], children: [] });
      i += 1;
    } else if (m && m[1].length > indent.length) {
      const [html, next] = list(lines, i);
      items[items.length - 1].children.push(html);
      i = next;
    } else if (!m && /^\s+\S/.test(lines[i])) {
      items[items.length - 1].text.push(lines[i].trim()); // a wrapped item continues
      i += 1;
    } else if (!lines[i].trim() && continuesList(lines, i, indent.length)) {
      i += 1;
    } else {
      break;
    }
  }
  const tag = ordered ? "ol" : "ul";
  const first = ordered ? parseInt(marker, 10) : 1;
  const startAttr = first !== 1 ? ` start="${first}"` : "";
  const lis = items.map((it) => `<li>${it.text.map(inline).join("<br>")}${it.children.join("")}</li>`);
  return [`<${tag}${startAttr}>${lis.join("")}</${tag}>`, i];
}

function continuesList(lines, blank, indent) {
  let j = blank;
  while (j < lines.length && !lines[j].trim()) j += 1;
  const m = j < lines.length && lines[j].match(ITEM);
  return Boolean(m) && m[1].length >= indent;
}

/** Inline rules on one escaped line: code and links are set aside first so no rule reaches inside. */
function inline(text) {
  const held = [];
  const hold = (html) => `\u0000${held.push(html) - 1}\u0000`;
  let s = text.replace(/(`+)(?!`)(.+?)(?<!`)\1(?!`)/g, (_, _ticks, code) => hold(`<code>${code}</code>`));
  s = s.replace(/\[([^\]\n]+)\]\(\s*([^\s)]+)\s*\)/g, (all, label, url) =>
    SAFE_URL.test(url) ? hold(anchor(url, emphasis(label))) : all);
  s = s.replace(/(^|[\s(])(https?:\/\/[^\s<\u0000]+[^\s<\u0000.,:;!?)\]'])/g, (_, lead, url) =>
    lead + hold(anchor(url, url)));
  const restore = (html) => html.replace(HOLD, (_, n) => restore(held[Number(n)]));
  return restore(emphasis(s));
}

function emphasis(s) {
  return s
    .replace(/(\*\*|__)(?=\S)(.+?)(?<=\S)\1/g, "<strong>$2</strong>")
    .replace(/(^|[^\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])(.+?)(?<=[^\s_])_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)(.+?)(?<=\S)~~/g, "<del>$1</del>");
}

function anchor(url, label) {
  return `<a href="${url}" target="_blank" rel="noopener noreferrer">${label}</a>`;
}
