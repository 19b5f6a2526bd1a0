// Incremental, allow-list markdown renderer for untrusted model output.
//
// Safety: model text never reaches innerHTML or any HTML parser. Every node is made with
// createElement from a fixed list of tags, text goes in with textContent / text nodes, and
// the only attributes set are class, start, href (http, https, mailto only, after URL
// parsing), title, rel, target and aria-label. Raw HTML in the text renders as literal text.
//
// Streaming: the text is cut into top-level blocks on complete lines (a block ends at a blank
// line, a closing code fence, a heading or rule line, or where another block starts). A
// settled block is rendered once and never touched again; only the open last block is
// rendered again as text arrives, and it is patched in place (DOM morph), not replaced, so
// nothing flickers and a copy button keeps working mid-stream. An open code fence is the one
// block that can grow long, so it renders line by line: finished lines are highlighted once.
// The work per update is proportional to the new text plus the open block.
//
// While a block is open, unfinished syntax is shown as it will end: an unterminated fence is
// a code block, `**bold te` is bold, a lone trailing `*` or backtick is held back, and
// `[text](http://partial` is link text without a link yet. The full render of a text and
// its streamed render, in any chunking, end as the same DOM.

import { highlightLine, languageLabel } from "./syntax.js";

const FENCE_OPEN = /^( {0,3})(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+|$)(.*?)(?:[ \t]+#+[ \t]*)?$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const LIST_ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])([ \t]+|$)/;
const QUOTE = /^ {0,3}>/;
const TABLE_DELIM = /^ {0,3}\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const BLANK = /^[ \t]*$/;
// A last line that is only the start of a list marker or rule ("-", "*", "12", "--"): held
// back mid-stream, so a bullet does not flash before "**Bold**" or "---" takes shape.
const HELD_TAIL = /^ {0,3}([-*+_]{1,2}|\d{1,9}[.)]?)$/;

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function expandTabs(line) {
  if (!line.includes("\t")) return line;
  let out = "";
  for (const ch of line) {
    if (ch === "\t") out += " ".repeat(4 - (out.length % 4));
    else out += ch;
  }
  return out;
}

function leadingSpaces(line) {
  const m = /^ */.exec(line);
  return m[0].length;
}

/** Returns a safe absolute URL string, or null for anything that is not http(s)/mailto. */
export function safeUrl(raw) {
  if (typeof raw !== "string") return null;
  const trimmed = raw.trim();
  if (!trimmed) return null;
  let url;
  try {
    // No base: relative URLs are rejected too; the WHATWG parser also strips the tabs and
    // newlines that "java\tscript:" tricks rely on before we look at the scheme.
    url = new URL(trimmed);
  } catch {
    return null;
  }
  return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
}

// ---------------------------------------------------------------------------------------
// Block splitting (top level and, recursively, inside list items and quotes)

function fenceInfo(line) {
  const m = FENCE_OPEN.exec(line);
  if (!m) return null;
  return { indent: m[1].length, char: m[2][0], len: m[2].length, lang: m[3] };
}

function closesFence(line, fence) {
  const t = line.replace(/^ {0,3}/, "");
  const m = /^(`{3,}|~{3,})[ \t]*$/.exec(t);
  return !!m && m[1][0] === fence.char && m[1].length >= fence.len;
}

function startsBlock(line) {
  return (
    fenceInfo(line) !== null ||
    HEADING.test(line) ||
    RULE.test(line) ||
    LIST_ITEM.test(line) ||
    QUOTE.test(line)
  );
}

/**
 * Cuts lines into blocks. Feed complete lines one at a time; it reports settled blocks as
 * [startLine, endLine) ranges. The open block is [openStart, lineCount).
 */
class BlockSplitter {
  constructor() {
    this.kind = null; // null | para | list | quote | fence
    this.fence = null;
    this.blankSeen = false;
    this.openStart = 0;
    this.count = 0;
  }

  /** Feeds one complete line; returns the list of newly settled [start, end) ranges. */
  push(rawLine) {
    const line = expandTabs(rawLine);
    const index = this.count++;
    const settled = [];
    const settleBefore = () => {
      if (this.kind !== null) settled.push([this.openStart, index]);
      this.kind = null;
      this.openStart = index;
    };
    if (this.kind === "fence") {
      if (closesFence(line, this.fence)) {
        settled.push([this.openStart, index + 1]);
        this.kind = null;
        this.openStart = index + 1;
      }
      return settled;
    }
    if (BLANK.test(line)) {
      if (this.kind === "list") {
        this.blankSeen = true;
      } else {
        settleBefore();
        this.openStart = index + 1; // blank lines belong to no block
      }
      return settled;
    }
    if (this.kind === "list") {
      const continues = leadingSpaces(line) >= 2 || (LIST_ITEM.test(line) && !RULE.test(line));
      const interrupts = !continues && startsBlock(line);
      if (continues || (!this.blankSeen && !interrupts)) {
        this.blankSeen = false;
        return settled;
      }
      settleBefore();
    } else if (this.kind === "para" || this.kind === "quote") {
      if (!startsBlock(line) || (this.kind === "quote" && QUOTE.test(line))) return settled;
      settleBefore();
    } else {
      this.openStart = index;
    }
    // A new block starts at this line.
    this.blankSeen = false;
    const fence = fenceInfo(line);
    if (fence) {
      this.kind = "fence";
      this.fence = fence;
    } else if (HEADING.test(line) || RULE.test(line)) {
      settled.push([index, index + 1]);
      this.kind = null;
      this.openStart = index + 1;
    } else if (LIST_ITEM.test(line)) {
      this.kind = "list";
    } else if (QUOTE.test(line)) {
      this.kind = "quote";
    } else {
      this.kind = "para";
    }
    return settled;
  }
}

/** Splits a whole text into block ranges (used for nested content and the final render). */
function splitBlocks(lines) {
  const splitter = new BlockSplitter();
  const blocks = [];
  for (const line of lines) blocks.push(...splitter.push(line));
  if (splitter.kind !== null && splitter.openStart < lines.length) {
    blocks.push([splitter.openStart, lines.length]);
  }
  return blocks;
}

// ---------------------------------------------------------------------------------------
// Block rendering

/** Renders markdown source (a sequence of blocks) into an array of nodes. */
function renderBlocks(text, open) {
  const lines = text.split("\n");
  const blocks = splitBlocks(lines);
  const nodes = [];
  blocks.forEach(([start, end], i) => {
    const isOpen = open && i === blocks.length - 1 && end === lines.length;
    nodes.push(...renderBlock(lines.slice(start, end), isOpen));
  });
  return nodes;
}

function renderBlock(lines, open) {
  const first = expandTabs(lines[0]);
  const fence = fenceInfo(first);
  if (fence) return [renderFence(lines, fence, open)];
  const heading = HEADING.exec(first);
  if (heading && lines.length === 1) {
    const h = el(`h${heading[1].length}`);
    h.append(...parseInline(heading[2], open));
    return [h];
  }
  if (RULE.test(first) && lines.length === 1) return [el("hr")];
  if (LIST_ITEM.test(first)) return renderList(lines, open);
  if (QUOTE.test(first)) {
    const quote = el("blockquote");
    const inner = lines.map((l) => expandTabs(l).replace(/^ {0,3}> ?/, "")).join("\n");
    quote.append(...renderBlocks(inner, open));
    return [quote];
  }
  return renderParagraph(lines, open);
}

function codeLines(lines, fence) {
  // Strip the fence's own indentation from the content, as CommonMark does.
  return lines.map((l) => {
    const line = expandTabs(l);
    const strip = Math.min(fence.indent, leadingSpaces(line));
    return line.slice(strip);
  });
}

function isClosingFencePrefix(line, fence) {
  const m = /^ {0,3}(`+|~+)[ \t]*$/.exec(expandTabs(line));
  return !!m && m[1][0] === fence.char;
}

function renderFence(lines, fence, open) {
  let body = lines.slice(1);
  if (body.length && closesFence(expandTabs(body[body.length - 1]), fence)) {
    body = body.slice(0, -1);
  }
  if (open && body.length && isClosingFencePrefix(body[body.length - 1], fence)) {
    body = body.slice(0, -1); // the closing fence being typed
  }
  const view = new CodeBlockView(fence.lang);
  const content = codeLines(body, fence);
  // A settled fence always ended with its closing line; an open one may end mid-line.
  for (const line of content) view.pushLine(line);
  view.finish();
  if (open) view.root.classList.add("open");
  return view.root;
}

/** A code block that grows line by line; finished lines are highlighted once. */
class CodeBlockView {
  constructor(lang) {
    this.lang = lang || "";
    this.state = null;
    this.lines = 0;
    this.root = el("div", "codeblock");
    const head = el("div", "codeblock-head");
    const label = el("span", "codeblock-lang");
    label.textContent = languageLabel(this.lang);
    const copy = el("button", "copy");
    copy.type = "button";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy code");
    head.append(label, copy);
    const pre = el("pre");
    this.code = el("code");
    if (this.lang) this.code.className = `language-${this.lang.replace(/[^\w+-]/g, "")}`;
    pre.append(this.code);
    this.root.append(head, pre);
    this.partial = null;
  }

  pushLine(line) {
    if (this.partial) {
      this.partial.remove();
      this.partial = null;
    }
    const { nodes, state } = highlightLine(line, this.lang, this.state);
    this.state = state;
    if (this.lines > 0) this.code.append("\n");
    this.code.append(...nodes);
    this.lines++;
  }

  /** Shows the unfinished last line (replaced on the next call). */
  setPartial(text) {
    if (this.partial) this.partial.remove();
    this.partial = null;
    if (!text) return;
    const span = el("span", "partial-line");
    if (this.lines > 0) span.append("\n");
    span.append(...highlightLine(text, this.lang, this.state).nodes);
    this.code.append(span);
    this.partial = span;
  }

  finish() {}
}

function splitRow(line) {
  let t = line.trim();
  if (t.startsWith("|")) t = t.slice(1);
  if (t.endsWith("|") && !t.endsWith("\\|")) t = t.slice(0, -1);
  const cells = [];
  let cur = "";
  let inCode = false;
  for (let i = 0; i < t.length; i++) {
    const c = t[i];
    if (c === "\\" && t[i + 1] === "|") {
      cur += "|";
      i++;
    } else if (c === "`") {
      inCode = !inCode;
      cur += c;
    } else if (c === "|" && !inCode) {
      cells.push(cur.trim());
      cur = "";
    } else {
      cur += c;
    }
  }
  cells.push(cur.trim());
  return cells;
}

function renderTable(header, align, rows, open) {
  const wrap = el("div", "table-wrap");
  const table = el("table");
  const thead = el("thead");
  const htr = el("tr");
  header.forEach((cell, i) => {
    const th = el("th", align[i] ? `align-${align[i]}` : "");
    th.append(...parseInline(cell, false));
    htr.append(th);
  });
  thead.append(htr);
  table.append(thead);
  if (rows.length) {
    const tbody = el("tbody");
    rows.forEach((row, r) => {
      const tr = el("tr");
      for (let i = 0; i < header.length; i++) {
        const td = el("td", align[i] ? `align-${align[i]}` : "");
        const last = open && r === rows.length - 1 && i === row.length - 1;
        td.append(...parseInline(row[i] ?? "", last));
        tr.append(td);
      }
      tbody.append(tr);
    });
    table.append(tbody);
  }
  wrap.append(table);
  return wrap;
}

function renderParagraph(lines, open) {
  // A GFM table: a header row followed by a delimiter row; rows run while they hold a pipe.
  const nodes = [];
  let textLines = [];
  const flush = (isOpen) => {
    if (!textLines.length) return;
    const p = el("p");
    p.append(...parseInline(textLines.join("\n"), isOpen));
    nodes.push(p);
    textLines = [];
  };
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const next = lines[i + 1];
    const isLast = i === lines.length - 1;
    const headerCells = line.includes("|") ? splitRow(line) : null;
    const delimiterOk =
      next !== undefined &&
      TABLE_DELIM.test(next) &&
      next.includes("-") &&
      splitRow(next).length === headerCells?.length;
    // Mid-stream, a lone header row or a half-written delimiter row is already a table.
    const pendingTable =
      open &&
      headerCells &&
      line.trim().startsWith("|") &&
      headerCells.length > 1 &&
      (isLast || (i === lines.length - 2 && /^[\s|:-]*$/.test(next)));
    if (headerCells && (delimiterOk || pendingTable)) {
      flush(false);
      const align = delimiterOk
        ? splitRow(next).map((c) => {
            const left = c.startsWith(":");
            const right = c.endsWith(":");
            return left && right ? "center" : right ? "right" : left ? "left" : "";
          })
        : [];
      const rows = [];
      let j = delimiterOk ? i + 2 : lines.length;
      while (j < lines.length && lines[j].includes("|")) {
        rows.push(splitRow(lines[j]));
        j++;
      }
      nodes.push(renderTable(headerCells, align, rows, open && j === lines.length));
      i = j;
      continue;
    }
    textLines.push(line);
    i++;
  }
  flush(open);
  return nodes;
}

function renderList(lines, open) {
  const lists = [];
  let current = null; // {ordered, start, items: [{lines}], loose}
  let item = null;
  let blankPending = false;
  for (const raw of lines) {
    const line = expandTabs(raw);
    const m = LIST_ITEM.exec(line);
    if (BLANK.test(line)) {
      if (item) item.lines.push("");
      blankPending = true;
      continue;
    }
    if (m && !RULE.test(line) && (!item || leadingSpaces(line) < item.contentIndent)) {
      const ordered = /\d/.test(m[2]);
      const marker = m[2];
      const spacing = m[3].length;
      const contentIndent =
        m[1].length + marker.length + (spacing === 0 || spacing > 4 ? 1 : spacing);
      if (!current || current.ordered !== ordered) {
        current = {
          ordered,
          start: ordered ? parseInt(marker, 10) : 1,
          items: [],
          loose: false,
        };
        lists.push(current);
      } else if (blankPending) {
        current.loose = true;
      }
      item = { lines: [line.slice(Math.min(line.length, contentIndent))], contentIndent };
      current.items.push(item);
      blankPending = false;
      continue;
    }
    if (!item) continue;
    const strip = Math.min(leadingSpaces(line), item.contentIndent);
    if (blankPending && strip >= item.contentIndent) current.loose = true;
    item.lines.push(line.slice(strip));
    blankPending = false;
  }
  return lists.map((list, li) => {
    const node = el(list.ordered ? "ol" : "ul");
    if (list.ordered && list.start !== 1) node.setAttribute("start", String(list.start));
    list.items.forEach((it, ii) => {
      while (it.lines.length > 1 && it.lines[it.lines.length - 1] === "") it.lines.pop();
      const isOpen = open && li === lists.length - 1 && ii === list.items.length - 1;
      const liNode = el("li");
      const children = renderBlocks(it.lines.join("\n"), isOpen);
      for (const child of children) {
        // Tight lists show their paragraphs inline, as CommonMark does.
        if (!list.loose && child.nodeName === "P") liNode.append(...child.childNodes);
        else liNode.append(child);
      }
      node.append(liNode);
    });
    return node;
  });
}

// ---------------------------------------------------------------------------------------
// Inline rendering

const PUNCT = /[!-/:-@[-`{-~]/;

function isSpace(ch) {
  return ch === undefined || /\s/.test(ch);
}

function isWordChar(ch) {
  return ch !== undefined && /[\p{L}\p{N}]/u.test(ch);
}

function runLength(src, i, ch) {
  let j = i;
  while (src[j] === ch) j++;
  return j - i;
}

/** Index of the closing backtick run of exactly `len`, or -1. */
function findCodeClose(src, from, len) {
  let i = from;
  while (i < src.length) {
    if (src[i] === "`") {
      const n = runLength(src, i, "`");
      if (n === len) return i;
      i += n;
    } else {
      i++;
    }
  }
  return -1;
}

/** Finds the closer of an emphasis run `ch` x `k` opened before `from`. */
function findEmphasisClose(src, from, ch, k) {
  let i = from;
  while (i < src.length) {
    const c = src[i];
    if (c === "\\") {
      i += 2;
      continue;
    }
    if (c === "`") {
      const n = runLength(src, i, "`");
      const close = findCodeClose(src, i + n, n);
      i = close < 0 ? i + n : close + n;
      continue;
    }
    if (c === ch) {
      const n = runLength(src, i, ch);
      const before = src[i - 1];
      const after = src[i + n];
      const closeable =
        !isSpace(before) && i > from && (ch !== "_" || !isWordChar(after));
      const fits = n === k || (n === 3 && k < 3) || (k === 3 && n > 3);
      if (closeable && fits) return { at: i + n - k, end: i + n };
      i += n;
      continue;
    }
    i++;
  }
  return null;
}

/** Parses a link `[text](url "title")` starting at `i` (the `[`). */
function parseLink(src, i) {
  let depth = 0;
  let j = i;
  for (; j < src.length; j++) {
    const c = src[j];
    if (c === "\\") {
      j++;
      continue;
    }
    if (c === "`") {
      const n = runLength(src, j, "`");
      const close = findCodeClose(src, j + n, n);
      if (close >= 0) j = close + n - 1;
      continue;
    }
    if (c === "[") depth++;
    else if (c === "]") {
      depth--;
      if (depth === 0) break;
    }
  }
  if (j >= src.length) return { incomplete: "text", textEnd: src.length };
  const text = src.slice(i + 1, j);
  if (src[j + 1] !== "(") return null;
  let k = j + 2;
  let parens = 0;
  let url = "";
  while (k < src.length && /\s/.test(src[k])) k++;
  if (src[k] === "<") {
    const close = src.indexOf(">", k);
    if (close < 0) return { incomplete: "url", text };
    url = src.slice(k + 1, close);
    k = close + 1;
  } else {
    const startUrl = k;
    while (k < src.length) {
      const c = src[k];
      if (c === "\\") {
        k += 2;
        continue;
      }
      if (/\s/.test(c)) break;
      if (c === "(") parens++;
      if (c === ")") {
        if (parens === 0) break;
        parens--;
      }
      k++;
    }
    url = src.slice(startUrl, k);
  }
  while (k < src.length && /\s/.test(src[k])) k++;
  let title = "";
  if (src[k] === '"' || src[k] === "'") {
    const q = src[k];
    const close = src.indexOf(q, k + 1);
    if (close < 0) return { incomplete: "url", text };
    title = src.slice(k + 1, close);
    k = close + 1;
    while (k < src.length && /\s/.test(src[k])) k++;
  }
  if (k >= src.length) return { incomplete: "url", text };
  if (src[k] !== ")") return null;
  return { text, url, title, end: k + 1 };
}

function makeLink(href, title, children) {
  const url = safeUrl(href);
  if (!url) {
    // Unsafe or relative target: keep the words, drop the link.
    const span = el("span", "link-blocked");
    span.append(...children);
    return span;
  }
  const a = el("a");
  a.setAttribute("href", url);
  a.setAttribute("rel", "noopener noreferrer nofollow");
  a.setAttribute("target", "_blank");
  if (title) a.setAttribute("title", title);
  a.append(...children);
  return a;
}

const AUTOLINK = /^<((?:https?|mailto):[^\s<>]+)>/i;
const BARE_URL = /^https?:\/\/[^\s<>]+/i;

function trimUrl(url) {
  // GFM autolink literal: trailing punctuation is not part of the URL; nor is an unbalanced ")".
  let u = url.replace(/[?!.,:*_~'"]+$/, "");
  while (u.endsWith(")") && (u.match(/\(/g) || []).length < (u.match(/\)/g) || []).length) {
    u = u.slice(0, -1);
  }
  return u;
}

/**
 * Inline markdown to nodes. `open`: this text is the streaming tail, so unclosed emphasis
 * and code run to the end, and a trailing marker that may start one is held back.
 */
export function parseInline(src, open = false, inLink = false) {
  const out = [];
  let buf = "";
  const flush = () => {
    if (buf) out.push(document.createTextNode(buf));
    buf = "";
  };
  let i = 0;
  while (i < src.length) {
    const c = src[i];
    if (c === "\\") {
      const next = src[i + 1];
      if (next === "\n") {
        flush();
        out.push(el("br"));
        i += 2;
        continue;
      }
      if (next !== undefined && PUNCT.test(next)) {
        buf += next;
        i += 2;
        continue;
      }
      if (next === undefined && open) {
        i++;
        continue;
      }
      buf += c;
      i++;
      continue;
    }
    if (c === "\n") {
      // Two trailing spaces make a hard break; otherwise a soft break (a space on screen).
      if (buf.endsWith("  ")) {
        buf = buf.replace(/ +$/, "");
        flush();
        out.push(el("br"));
      } else {
        buf = buf.replace(/ +$/, "");
        buf += "\n";
      }
      i++;
      continue;
    }
    if (c === "`") {
      const n = runLength(src, i, "`");
      const close = findCodeClose(src, i + n, n);
      if (close >= 0 || (open && i + n < src.length)) {
        const end = close >= 0 ? close : src.length;
        let code = src.slice(i + n, end).replace(/\n/g, " ");
        if (/^ .*[^ ].* $/.test(code)) code = code.slice(1, -1);
        flush();
        const node = el("code");
        node.textContent = code;
        out.push(node);
        i = close >= 0 ? close + n : src.length;
        continue;
      }
      if (open && i + n === src.length) {
        i += n; // maybe the start of a code span: hold it back
        continue;
      }
      buf += "`".repeat(n);
      i += n;
      continue;
    }
    if (c === "[" || (c === "!" && src[i + 1] === "[")) {
      const image = c === "!";
      const start = image ? i + 1 : i;
      const link = parseLink(src, start);
      if (link && !link.incomplete) {
        flush();
        const children = parseInline(link.text, false, true);
        if (image) {
          // Images are never loaded (tracking pixels, CSP); show the alt text as a link.
          const label = el("span", "image-label");
          label.textContent = link.text ? `image: ${link.text}` : "image";
          out.push(makeLink(link.url, link.title, [label]));
        } else {
          out.push(makeLink(link.url, link.title, children));
        }
        i = link.end;
        continue;
      }
      if (link && link.incomplete === "url" && open) {
        // `[text](http://exa` mid-stream: show the text as a link-to-be, hide the URL.
        flush();
        const pending = el("span", "link-pending");
        pending.append(...parseInline(link.text, false, true));
        out.push(pending);
        i = src.length;
        continue;
      }
      buf += c;
      i++;
      continue;
    }
    if (c === "<") {
      const m = inLink ? null : AUTOLINK.exec(src.slice(i, i + 2048));
      if (m) {
        flush();
        out.push(makeLink(m[1], "", [document.createTextNode(m[1])]));
        i += m[0].length;
        continue;
      }
      buf += c;
      i++;
      continue;
    }
    if ((c === "h" || c === "H") && !inLink && !isWordChar(src[i - 1])) {
      const m = BARE_URL.exec(src.slice(i, i + 2048));
      if (m) {
        const url = trimUrl(m[0]);
        flush();
        out.push(makeLink(url, "", [document.createTextNode(url)]));
        i += url.length;
        continue;
      }
    }
    if (c === "*" || c === "_" || c === "~") {
      const n = runLength(src, i, c);
      const after = src[i + n];
      const before = src[i - 1];
      const canOpen =
        !isSpace(after) && (c !== "_" || !isWordChar(before)) && (c !== "~" || n === 2);
      if (canOpen) {
        const tries = c === "~" ? [2] : n >= 3 ? [3, 2, 1] : n === 2 ? [2, 1] : [1];
        let done = false;
        for (const k of tries) {
          const close = findEmphasisClose(src, i + n, c, k);
          if (!close) continue;
          // The opener's extra markers (e.g. `***` opening `**`) stay inside as text.
          const innerStart = i + k;
          const inner = src.slice(innerStart, close.at);
          flush();
          out.push(wrapEmphasis(c, k, parseInline(inner, false, inLink)));
          i = close.end;
          done = true;
          break;
        }
        if (done) continue;
        if (open && !isWordChar(before)) {
          // Unclosed in the streaming tail: it will close; show it styled already.
          flush();
          const k = c === "~" ? 2 : Math.min(n, 3);
          out.push(wrapEmphasis(c, k, parseInline(src.slice(i + k), true, inLink)));
          i = src.length;
          continue;
        }
      } else if (open && i + n === src.length && (c !== "~" || n <= 2)) {
        i += n; // a trailing marker may open emphasis: hold it back
        continue;
      }
      buf += c.repeat(n);
      i += n;
      continue;
    }
    buf += c;
    i++;
  }
  flush();
  return out;
}

function wrapEmphasis(ch, k, children) {
  if (ch === "~") {
    const del = el("del");
    del.append(...children);
    return del;
  }
  if (k === 3) {
    const em = el("em");
    const strong = el("strong");
    strong.append(...children);
    em.append(strong);
    return em;
  }
  const node = el(k === 2 ? "strong" : "em");
  node.append(...children);
  return node;
}

// ---------------------------------------------------------------------------------------
// Public API

/** The whole text, rendered as if the stream had ended. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  fragment.append(...renderBlocks(text.replace(/\r\n?/g, "\n"), false));
  return fragment;
}

/** Makes `target`'s children from `start` on look like `nodes`, keeping equal nodes. */
export function morphChildren(target, start, nodes) {
  for (let i = 0; i < nodes.length; i++) {
    const want = nodes[i];
    const have = target.childNodes[start + i];
    if (!have) {
      target.append(want);
    } else if (!morphNode(have, want)) {
      target.replaceChild(want, have);
    }
  }
  while (target.childNodes.length > start + nodes.length) target.lastChild.remove();
}

function morphNode(have, want) {
  if (have.nodeType !== want.nodeType) return false;
  if (have.nodeType === Node.TEXT_NODE) {
    if (have.data !== want.data) have.data = want.data;
    return true;
  }
  if (have.nodeName !== want.nodeName) return false;
  for (const attr of [...have.attributes]) {
    if (!want.hasAttribute(attr.name)) have.removeAttribute(attr.name);
  }
  for (const attr of [...want.attributes]) {
    if (have.getAttribute(attr.name) !== attr.value) have.setAttribute(attr.name, attr.value);
  }
  morphChildren(have, 0, [...want.childNodes]);
  return true;
}

/**
 * Renders a growing text into `container`. `append(text)` is cheap; the DOM is updated at
 * most once per animation frame. `finish()` renders the final state synchronously.
 */
export class StreamingMarkdown {
  constructor(container, { onRender } = {}) {
    this.container = container;
    this.onRender = onRender;
    this.text = "";
    this.lines = []; // complete lines of the open block
    this.splitter = new BlockSplitter();
    this.settledLines = 0; // lines rendered into settled blocks
    this.settledNodes = 0; // container children that are settled
    this.lineStart = 0; // offset in text where the incomplete last line starts
    this.allLines = [];
    this.code = null; // {view, fromLine, pushed} while the open block is a top-level fence
    this.scheduled = 0;
    this.finished = false;
    this.renders = 0;
    // Characters (re-)rendered so far: stays proportional to the text, never quadratic.
    this.work = 0;
    this.lastWasCR = false;
  }

  append(text) {
    if (!text) return;
    // Normalize line ends per chunk (a "\r\n" may be split across two chunks).
    if (this.lastWasCR && text[0] === "\n") text = text.slice(1);
    this.lastWasCR = text.endsWith("\r");
    this.text += text.replace(/\r\n?/g, "\n");
    if (!this.scheduled) {
      const run = () => {
        if (!this.scheduled) return;
        this.scheduled = 0;
        this.flush(true);
      };
      // rAF paces updates to the screen; the timer keeps hidden tabs progressing.
      this.scheduled = requestAnimationFrame(run);
      setTimeout(run, 100);
    }
  }

  finish() {
    this.scheduled = 0;
    this.finished = true;
    this.flush(false);
  }

  /** Consumes new complete lines, settles finished blocks, re-renders the open one. */
  flush(open) {
    this.renders++;
    const text = this.text;
    let nl;
    while ((nl = text.indexOf("\n", this.lineStart)) >= 0) {
      const line = text.slice(this.lineStart, nl);
      this.allLines.push(line);
      this.lineStart = nl + 1;
      for (const [start, end] of this.splitter.push(line)) this.settle(start, end);
    }
    const fullTail = text.slice(this.lineStart);
    const tail = open && HELD_TAIL.test(fullTail) ? "" : fullTail;
    const openStart = Math.max(this.splitter.openStart, this.settledLines);
    const openLines = this.allLines.slice(openStart);
    if (!open) {
      // End of stream: everything left is one last block, rendered as settled.
      const lines = tail ? [...openLines, tail] : openLines;
      const nodes = lines.some((l) => !BLANK.test(l)) ? renderBlocks(lines.join("\n"), false) : [];
      this.code = null;
      morphChildren(this.container, this.settledNodes, nodes);
      this.onRender?.();
      return;
    }
    if (this.splitter.kind === "fence" && openLines.length) {
      this.renderOpenFence(openStart, openLines, tail);
    } else {
      this.code = null;
      const lines = tail ? [...openLines, tail] : openLines;
      const source = lines.join("\n");
      this.work += source.length;
      const nodes = BLANK.test(source) ? [] : renderBlocks(source, true);
      morphChildren(this.container, this.settledNodes, nodes);
    }
    this.onRender?.();
  }

  renderOpenFence(openStart, openLines, tail) {
    if (!this.code || this.code.fromLine !== openStart) {
      const fence = fenceInfo(expandTabs(openLines[0]));
      const view = new CodeBlockView(fence.lang);
      view.root.classList.add("open");
      morphChildren(this.container, this.settledNodes, [view.root]);
      this.code = { view, fence, fromLine: openStart, pushed: 1 };
    }
    const { view, fence } = this.code;
    const fresh = openLines.slice(this.code.pushed);
    for (const line of codeLines(fresh, fence)) {
      this.work += line.length + 1;
      view.pushLine(line);
    }
    this.code.pushed = openLines.length;
    const partial = tail && !isClosingFencePrefix(tail, fence) ? tail : "";
    view.setPartial(partial ? codeLines([partial], fence)[0] : "");
  }

  settle(start, end) {
    const lines = this.allLines.slice(start, end);
    for (const line of lines) this.work += line.length + 1;
    const nodes = renderBlocks(lines.join("\n"), false);
    // The open block's nodes sit after the settled ones; the settled block replaces them.
    const live = [...this.container.childNodes].slice(this.settledNodes);
    const reuse = this.code && this.code.fromLine === start ? this.code.view.root : null;
    for (const node of live) node.remove();
    if (reuse && nodes.length === 1) {
      // The fence that was streaming line by line is already right: keep its element.
      reuse.classList.remove("open");
      morphChildren(reuse, 0, [...nodes[0].childNodes]);
      this.container.append(reuse);
    } else {
      this.container.append(...nodes);
    }
    this.code = null;
    this.settledNodes += reuse && nodes.length === 1 ? 1 : nodes.length;
    this.settledLines = end;
  }
}
