// The tokenwire chat page: conversations, the composer, and one streaming answer at a time.
//
// Model output is untrusted: it only ever reaches the page through markdown.js (DOM nodes
// built from an allow-list) or as text (textContent). Nothing here uses innerHTML.

import { StreamingMarkdown, renderMarkdown } from "./markdown.js";
import { StreamError, StreamRun, apiHeaders, setApiKey } from "./stream.js";

const STORE_KEY = "tokenwire.conversations.v1";
const SETTINGS_KEY = "tokenwire.settings.v1";

const $ = (id) => document.getElementById(id);
const ui = {
  app: document.querySelector(".app"),
  sidebar: $("sidebar"),
  toggleSidebar: $("toggle-sidebar"),
  conversations: $("conversations"),
  newChat: $("new-chat"),
  model: $("model"),
  toggleSettings: $("toggle-settings"),
  settings: $("settings"),
  system: $("system"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  apiKey: $("api-key"),
  status: $("status"),
  messages: $("messages"),
  empty: $("empty"),
  composer: $("composer"),
  input: $("message"),
  send: $("send"),
  stop: $("stop"),
  regenerate: $("regenerate"),
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ---------------------------------------------------------------------------------------
// Storage

function readJSON(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw ? JSON.parse(raw) : fallback;
  } catch {
    return fallback;
  }
}

function writeJSON(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    setStatus("Could not save the conversation (browser storage is full or disabled).");
  }
}

const state = {
  conversations: readJSON(STORE_KEY, []),
  settings: {
    model: "default",
    system: "",
    temperature: "",
    maxTokens: "",
    apiKey: "",
    ...readJSON(SETTINGS_KEY, {}),
  },
  currentId: null,
  active: null, // the answer being streamed: {conversation, message, view, run}
};

let saveTimer = 0;
function save({ soon = false } = {}) {
  // While streaming, content and lastSeq change together in one event handler, so any
  // snapshot is consistent; write at most once a second to spare the main thread.
  if (soon) {
    if (!saveTimer) saveTimer = setTimeout(() => save(), 1000);
    return;
  }
  clearTimeout(saveTimer);
  saveTimer = 0;
  writeJSON(STORE_KEY, state.conversations);
}

function saveSettings() {
  writeJSON(SETTINGS_KEY, state.settings);
}

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
}

function current() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

// ---------------------------------------------------------------------------------------
// Status line and busy state

let statusTimer = 0;
function setStatus(text, { sticky = false, kind = "" } = {}) {
  clearTimeout(statusTimer);
  ui.status.textContent = text;
  ui.status.dataset.kind = kind;
  if (text && !sticky) statusTimer = setTimeout(() => setStatus(""), 4000);
}

function setBusy(busy) {
  ui.app.dataset.busy = busy ? "true" : "false";
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.stop.disabled = false;
  ui.newChat.disabled = busy;
  for (const button of ui.conversations.querySelectorAll("button")) button.disabled = busy;
  updateRegenerate();
}

function updateRegenerate() {
  const conv = current();
  const last = conv?.messages[conv.messages.length - 1];
  ui.regenerate.hidden = !!state.active || !last;
}

// ---------------------------------------------------------------------------------------
// Rendering messages

function fmt(n, digits = 0) {
  return Number(n).toLocaleString(undefined, {
    maximumFractionDigits: digits,
    minimumFractionDigits: digits,
  });
}

function metaText(message, live) {
  const m = message.meta || {};
  const parts = [];
  const usage = m.usage;
  if (usage?.ttft_ms != null) parts.push(`TTFT ${fmt(usage.ttft_ms)} ms`);
  else if (live?.ttft != null) parts.push(`TTFT ${fmt(live.ttft)} ms`);
  if (usage?.tokens_per_second != null) parts.push(`${fmt(usage.tokens_per_second, 1)} tok/s`);
  else if (live?.rate != null) parts.push(`${fmt(live.rate, 1)} tok/s`);
  if (usage?.completion_tokens != null) parts.push(`${fmt(usage.completion_tokens)} tokens`);
  if (m.model && m.model !== "default") parts.push(m.model);
  const finish = {
    length: "stopped at the token limit",
    stop: "",
    tool_calls: "tool calls",
    content_filter: "content filter",
  };
  if (message.state === "done" && finish[m.finish]) parts.push(finish[m.finish]);
  if (message.state === "stopped") {
    parts.push(m.reason === "stop" || !m.reason ? "Stopped" : `Cancelled (${m.reason})`);
  }
  if (message.state === "interrupted") parts.push("Interrupted: the stream is gone");
  return parts.join(" · ");
}

class MessageView {
  constructor(message) {
    this.message = message;
    this.root = el("article", `msg ${message.role}`);
    this.root.dataset.role = message.role;
    this.root.setAttribute("aria-label", message.role === "user" ? "You" : "Assistant");
    this.roleLabel = el("div", "msg-role", message.role === "user" ? "You" : "Assistant");
    this.progress = el("div", "msg-progress");
    this.tools = el("div", "msg-tools");
    this.body = el("div", message.role === "user" ? "msg-body plain" : "msg-body md");
    this.json = el("section", "msg-json");
    this.json.hidden = true;
    this.error = el("div", "msg-error");
    this.error.setAttribute("role", "alert");
    this.error.hidden = true;
    // A guard on the streamed text stopped the answer (guard.triggered): say which one.
    this.guard = el("div", "msg-guard");
    this.guard.setAttribute("role", "status");
    this.guard.hidden = true;
    this.meta = el("div", "msg-meta");
    this.root.append(
      this.roleLabel,
      this.progress,
      this.body,
      this.tools,
      this.json,
      this.guard,
      this.error,
      this.meta,
    );
    this.toolViews = [];
    this.md = null;
    this.live = {};
    if (message.role === "user") {
      this.body.textContent = message.content;
    } else if (message.state === "streaming") {
      this.md = new StreamingMarkdown(this.body, { onRender: () => keepPinned() });
      this.md.append(message.content);
    } else {
      this.body.append(renderMarkdown(message.content));
    }
    for (const tool of message.meta?.tools || []) if (tool) this.renderTool(tool);
    if (message.meta?.json) this.renderJson();
    this.renderState();
  }

  renderState() {
    const m = this.message;
    this.root.dataset.state = m.state || "done";
    if (m.streamId) this.root.dataset.streamId = m.streamId;
    this.root.setAttribute("aria-busy", m.state === "streaming" ? "true" : "false");
    this.meta.textContent = m.role === "assistant" ? metaText(m, this.live) : "";
    const guard = m.meta?.guard;
    this.guard.hidden = !guard;
    if (guard) {
      this.guard.dataset.guard = guard.guard;
      const what = guard.match ? ` at “${guard.match}”` : "";
      this.guard.textContent = `Stopped by the guard “${guard.guard}”${what}.`;
    }
    const err = m.meta?.error;
    this.error.hidden = !err;
    if (err) this.error.textContent = `Error: ${err.message || err.type || "unknown error"}`;
  }

  setProgress(text) {
    this.progress.textContent = text;
    this.progress.hidden = !text;
  }

  renderTool(tool) {
    let view = this.toolViews[tool.index];
    if (!view) {
      const details = el("details", "tool");
      details.open = true;
      const summary = el("summary");
      const name = el("span", "tool-name", tool.name);
      const status = el("span", "tool-status");
      summary.append("Tool call ", name, " ", status);
      const args = el("pre", "tool-args");
      const text = document.createTextNode("");
      args.append(text);
      details.append(summary, args);
      this.tools.append(details);
      view = { details, status, args, text, shown: 0 };
      this.toolViews[tool.index] = view;
    }
    view.details.dataset.done = tool.done ? "true" : "false";
    view.status.textContent = tool.done ? "complete" : "streaming arguments…";
    if (tool.output != null) {
      // A tool the server ran (tool.result): its output under the arguments.
      view.status.textContent = tool.error ? "failed on the server" : "ran on the server";
      view.details.dataset.error = tool.error ? "true" : "false";
      if (!view.output) {
        view.output = el("pre", "tool-output");
        view.details.append(view.output);
      }
      view.output.textContent = tool.output;
    }
    if (tool.done) {
      let pretty = tool.arguments;
      try {
        pretty = JSON.stringify(JSON.parse(tool.arguments), null, 2);
      } catch {
        // keep the raw text
      }
      view.text.data = pretty;
    } else if (tool.arguments.length > view.shown) {
      // Append only the new characters: proportional to the delta.
      view.text.appendData(tool.arguments.slice(view.shown));
    }
    view.shown = tool.arguments.length;
  }

  renderJson() {
    const data = this.message.meta.json;
    if (!this.jsonPre) {
      const head = el("div", "json-head");
      this.jsonTitle = el("span", "json-title", "Structured output");
      this.jsonStatus = el("span", "json-status");
      head.append(this.jsonTitle, " ", this.jsonStatus);
      this.jsonPre = el("pre", "json-value");
      this.json.append(head, this.jsonPre);
      this.json.hidden = false;
    }
    const streaming = this.message.state === "streaming";
    this.json.dataset.partial = streaming ? "true" : "false";
    this.jsonStatus.textContent = streaming
      ? `partial${data.path ? ` · at ${data.path}` : ""}`
      : "complete";
    this.jsonPre.textContent = JSON.stringify(data.value, null, 2);
  }
}

const views = new Map(); // message object -> MessageView

function renderConversation() {
  const conv = current();
  ui.messages.replaceChildren();
  views.clear();
  const messages = conv?.messages || [];
  ui.empty.hidden = messages.length > 0;
  for (const message of messages) {
    const view = new MessageView(message);
    views.set(message, view);
    ui.messages.append(view.root);
  }
  if (state.active && state.active.conversation === conv) {
    state.active.view = views.get(state.active.message);
  }
  ui.messages.scrollTop = ui.messages.scrollHeight;
  renderConversationList();
  updateRegenerate();
}

function renderConversationList() {
  const items = state.conversations.map((conv) => {
    const li = el("li");
    const open = el("button", "conv", conv.title || "New chat");
    open.type = "button";
    open.title = conv.title || "New chat";
    if (conv.id === state.currentId) open.setAttribute("aria-current", "page");
    open.addEventListener("click", () => {
      selectConversation(conv.id);
      closeSidebar();
    });
    const del = el("button", "conv-delete", "×");
    del.type = "button";
    del.setAttribute("aria-label", `Delete conversation: ${conv.title || "New chat"}`);
    del.addEventListener("click", () => deleteConversation(conv.id));
    open.disabled = del.disabled = !!state.active;
    li.append(open, del);
    return li;
  });
  ui.conversations.replaceChildren(...items);
}

let pinned = true;
function keepPinned() {
  if (pinned) ui.messages.scrollTop = ui.messages.scrollHeight;
}
ui.messages.addEventListener("scroll", () => {
  const gap = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight;
  pinned = gap < 40;
});

// ---------------------------------------------------------------------------------------
// Conversations

function newConversation() {
  const conv = { id: newId(), title: "", created: Date.now(), messages: [] };
  state.conversations.unshift(conv);
  state.currentId = conv.id;
  return conv;
}

function selectConversation(id) {
  if (state.active) return;
  state.currentId = id;
  renderConversation();
  ui.input.focus();
}

function deleteConversation(id) {
  if (state.active) return;
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = state.conversations[0]?.id ?? null;
  save();
  renderConversation();
}

function startNewChat() {
  if (state.active) return;
  const conv = current();
  if (!conv || conv.messages.length) newConversation();
  renderConversation();
  ui.input.value = "";
  autosize();
  ui.input.focus();
}

// ---------------------------------------------------------------------------------------
// Streaming an answer

function requestBody(conv) {
  const messages = [];
  const system = state.settings.system.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of conv.messages) {
    if (m.role === "assistant" && (m.state === "streaming" || !m.content)) continue;
    messages.push({ role: m.role, content: m.content });
  }
  const body = { model: state.settings.model || "default", messages, stream: true };
  const temperature = parseFloat(state.settings.temperature);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt(state.settings.maxTokens, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

function appendMessage(conv, message) {
  conv.messages.push(message);
  if (conv.id === state.currentId) {
    ui.empty.hidden = true;
    const view = new MessageView(message);
    views.set(message, view);
    ui.messages.append(view.root);
    pinned = true;
    keepPinned();
    return view;
  }
  return null;
}

/** Streams the answer to `conv` (its last message is the user's) into a new message. */
function answer(conv) {
  const message = {
    role: "assistant",
    content: "",
    state: "streaming",
    streamId: null,
    lastSeq: -1,
    meta: { tools: [] },
  };
  const view = appendMessage(conv, message);
  const run = new StreamRun({ body: requestBody(conv) });
  follow(conv, message, view, run);
}

/** Resumes an answer that was streaming when the page was closed or reloaded. */
function resume(conv, message) {
  const view = views.get(message) || null;
  const run = new StreamRun({ streamId: message.streamId, after: message.lastSeq });
  follow(conv, message, view, run);
}

function follow(conv, message, view, run) {
  const active = { conversation: conv, message, view, run, started: performance.now() };
  state.active = active;
  setBusy(true);
  let deltas = 0;
  let firstText = null;
  let jsonFrame = 0;
  const v = () => active.view;
  run.onStreamId = (id) => {
    message.streamId = id;
    v()?.renderState();
    save();
  };
  run.onState = (s) => {
    const reconnecting = s === "reconnecting";
    v()?.root.classList.toggle("reconnecting", reconnecting);
    if (reconnecting) {
      v()?.root.setAttribute("data-connection", "reconnecting");
      setStatus("Connection lost. Reconnecting…", { sticky: true, kind: "reconnecting" });
    } else if (s === "streaming") {
      v()?.root.setAttribute("data-connection", "streaming");
      if (ui.status.dataset.kind === "reconnecting") setStatus("Reconnected.", { kind: "ok" });
    }
  };
  run.onEvent = (ev) => {
    message.lastSeq = ev.seq;
    const meta = message.meta;
    const view = v();
    switch (ev.type) {
      case "stream.started":
        meta.model = ev.model;
        break;
      case "progress": {
        const labels = { queued: "Queued", prefill: "Reading the prompt", tool: "Running a tool" };
        let text = ev.message || labels[ev.stage] || ev.stage;
        if (ev.position != null) text += ` (position ${ev.position})`;
        if (ev.fraction != null) text += ` ${Math.round(ev.fraction * 100)}%`;
        view?.setProgress(`${text}…`);
        break;
      }
      case "text.delta":
        deltas++;
        if (firstText === null) {
          firstText = performance.now();
          if (view) view.live.ttft = firstText - active.started;
          view?.setProgress("");
        }
        message.content += ev.text;
        view?.md?.append(ev.text);
        if (view && deltas > 1) {
          view.live.rate = (deltas - 1) / ((performance.now() - firstText) / 1000);
        }
        if (view && deltas % 8 === 1) view.renderState();
        break;
      case "tool_call.started":
        meta.tools[ev.index] = {
          index: ev.index,
          id: ev.id,
          name: ev.name,
          arguments: "",
          done: false,
        };
        view?.setProgress("");
        view?.renderTool(meta.tools[ev.index]);
        break;
      case "tool_call.delta": {
        const tool = meta.tools[ev.index];
        if (tool) {
          tool.arguments += ev.arguments_delta;
          view?.renderTool(tool);
        }
        break;
      }
      case "tool_call.completed":
        meta.tools[ev.index] = {
          index: ev.index,
          id: ev.id,
          name: ev.name,
          arguments: ev.arguments,
          done: true,
        };
        view?.renderTool(meta.tools[ev.index]);
        break;
      case "tool.result": {
        const index = meta.tools.length;
        meta.tools[index] = {
          index,
          id: ev.id,
          name: ev.name,
          arguments: ev.arguments,
          done: true,
          output: ev.output,
          error: ev.error,
        };
        view?.setProgress("");
        view?.renderTool(meta.tools[index]);
        break;
      }
      case "json.partial":
        meta.json = { value: ev.value, path: ev.path };
        view?.setProgress("");
        if (view && !jsonFrame) {
          jsonFrame = requestAnimationFrame(() => {
            jsonFrame = 0;
            active.view?.renderJson();
          });
        }
        break;
      case "guard.triggered":
        meta.guard = { guard: ev.guard, match: ev.match, position: ev.position };
        view?.setProgress("");
        view?.renderState();
        break;
      case "usage":
        meta.usage = {
          prompt_tokens: ev.prompt_tokens,
          completion_tokens: ev.completion_tokens,
          ttft_ms: ev.ttft_ms,
          tokens_per_second: ev.tokens_per_second,
        };
        break;
      case "stream.completed":
        message.state = "done";
        meta.finish = ev.finish_reason;
        break;
      case "stream.cancelled":
        message.state = "stopped";
        meta.reason = ev.reason;
        break;
      case "stream.failed":
        message.state = "failed";
        meta.error = ev.error || { message: "the stream failed" };
        break;
      default:
        break;
    }
    if (view) view.root.dataset.lastSeq = String(ev.seq);
    save({ soon: true });
  };
  run
    .run()
    .catch((err) => {
      const e = err instanceof StreamError ? err : new StreamError(String(err?.message || err));
      if (message.state === "streaming") {
        message.state = message.streamId && e.status === 404 ? "interrupted" : "failed";
        message.meta.error = { message: e.message, type: e.type };
        if (message.state === "interrupted") message.meta.error = null;
      }
    })
    .finally(() => {
      if (message.state === "streaming") message.state = "failed";
      const view = active.view;
      if (view) {
        view.md?.finish();
        if (message.meta.json) view.renderJson();
        view.setProgress("");
        view.root.classList.remove("reconnecting");
        view.root.removeAttribute("data-connection");
        view.renderState();
      }
      state.active = null;
      setBusy(false);
      save();
      if (ui.status.dataset.kind === "reconnecting") setStatus("");
      const done = { done: "Answer complete.", stopped: "Stopped.", failed: "The answer failed." };
      if (done[message.state]) setStatus(done[message.state]);
      renderConversationList();
    });
}

async function stop() {
  const active = state.active;
  if (!active) return;
  ui.stop.disabled = true;
  setStatus("Stopping…", { sticky: true, kind: "stopping" });
  // Without a stream id yet, the run cancels as soon as the server names the stream.
  await active.run.stop();
  // The stream ends with stream.cancelled from the server; if it never comes, give up reading.
  setTimeout(() => {
    if (state.active === active) {
      active.message.state = "stopped";
      active.run.detach();
    }
  }, 10000);
}

function send() {
  const text = ui.input.value;
  if (!text.trim()) return;
  if (state.active) {
    setStatus("An answer is still streaming: press Stop first.");
    return;
  }
  const conv = current() || newConversation();
  if (!conv.title) conv.title = text.trim().replace(/\s+/g, " ").slice(0, 60);
  appendMessage(conv, { role: "user", content: text });
  ui.input.value = "";
  autosize();
  renderConversationList();
  answer(conv);
  save();
}

function regenerate() {
  const conv = current();
  if (!conv || state.active) return;
  while (conv.messages.length && conv.messages[conv.messages.length - 1].role === "assistant") {
    conv.messages.pop();
  }
  if (!conv.messages.length) return;
  renderConversation();
  answer(conv);
  save();
}

// ---------------------------------------------------------------------------------------
// Controls

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
}

function closeSidebar() {
  ui.app.dataset.sidebar = "closed";
  ui.toggleSidebar.setAttribute("aria-expanded", "false");
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.input.addEventListener("input", autosize);
ui.stop.addEventListener("click", stop);
ui.regenerate.addEventListener("click", regenerate);
ui.newChat.addEventListener("click", () => {
  startNewChat();
  closeSidebar();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    if (state.active) stop();
    else if (ui.app.dataset.sidebar === "open") {
      closeSidebar();
      ui.toggleSidebar.focus();
    }
  }
});
ui.toggleSidebar.addEventListener("click", () => {
  const open = ui.app.dataset.sidebar !== "open";
  ui.app.dataset.sidebar = open ? "open" : "closed";
  ui.toggleSidebar.setAttribute("aria-expanded", String(open));
  if (open) ui.newChat.focus();
});
ui.app.addEventListener("click", (event) => {
  // The drawer's backdrop is the app's own ::after: a click on it targets the app itself.
  if (event.target === ui.app && ui.app.dataset.sidebar === "open") closeSidebar();
});
ui.toggleSettings.addEventListener("click", () => {
  const open = ui.settings.hidden;
  ui.settings.hidden = !open;
  ui.toggleSettings.setAttribute("aria-expanded", String(open));
  if (open) ui.system.focus();
});
for (const [input, key] of [
  [ui.system, "system"],
  [ui.temperature, "temperature"],
  [ui.maxTokens, "maxTokens"],
  [ui.apiKey, "apiKey"],
]) {
  input.value = state.settings[key] ?? "";
  input.addEventListener("input", () => {
    state.settings[key] = input.value;
    saveSettings();
  });
}
// A server started with --api-keys needs one: kept in this browser's storage only.
setApiKey(state.settings.apiKey);
ui.apiKey.addEventListener("change", () => {
  setApiKey(ui.apiKey.value);
  loadModels();
});
ui.model.addEventListener("change", () => {
  state.settings.model = ui.model.value;
  saveSettings();
});

// Leaving mid-answer: save the latest content and seq, so the next load resumes from there.
window.addEventListener("pagehide", () => save());

// Copy buttons of code blocks (delegated: blocks are re-rendered while streaming).
ui.messages.addEventListener("click", async (event) => {
  const button = event.target.closest("button.copy");
  if (!button) return;
  const code = button.closest(".codeblock")?.querySelector("code")?.textContent ?? "";
  let ok = false;
  try {
    await navigator.clipboard.writeText(code);
    ok = true;
  } catch {
    ok = false;
  }
  button.textContent = ok ? "Copied" : "Copy failed";
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
});

async function loadModels() {
  const wanted = new URLSearchParams(location.search).get("model");
  let names = ["default"];
  try {
    const response = await fetch("/v1/models", { headers: apiHeaders(), cache: "no-store" });
    if (response.status === 401) {
      setStatus("This server needs an API key: enter it under Settings.", { sticky: true });
    } else {
      const body = await response.json();
      names = body.data.map((m) => m.id);
      setStatus("");
    }
  } catch {
    setStatus("Could not load the model list.");
  }
  if (wanted && !names.includes(wanted)) names.push(wanted);
  const selected = wanted || (names.includes(state.settings.model) ? state.settings.model : null);
  ui.model.replaceChildren(
    ...names.map((name) => {
      const option = el("option", "", name);
      option.value = name;
      return option;
    }),
  );
  ui.model.value = selected || names[0];
  state.settings.model = ui.model.value;
  if (wanted) saveSettings();
  ui.model.dataset.ready = "true";
}

// ---------------------------------------------------------------------------------------
// Start

function init() {
  closeSidebar();
  state.currentId = state.conversations[0]?.id ?? null;
  renderConversation();
  setBusy(false);
  loadModels();
  // An answer that was streaming when the page went away: pick it up where it was.
  const conv = current();
  const last = conv?.messages[conv.messages.length - 1];
  if (last?.role === "assistant" && last.state === "streaming" && last.streamId) {
    resume(conv, last);
  } else if (last?.state === "streaming") {
    last.state = "failed";
    last.meta = { ...last.meta, error: { message: "The page closed before the answer began." } };
    renderConversation();
  }
  ui.input.focus();
  document.documentElement.dataset.ready = "true";
}

init();
