// The AI SDK's own chat client (AbstractChat + DefaultChatTransport, or ai@7's
// WebSocketChatTransport) driven from Node against a tokenwire server, no React.
//
//   node --experimental-websocket uichat.mjs <ai6|ai7> <scenario> '<json args>'
//
// Prints one JSON line: what the chat ended with (messages, status, error) and every HTTP
// exchange the transport made, with each SSE data payload as sent (tests/test_ui_message_stream.py
// asserts on it). Every chunk is also checked here against the SDK's own uiMessageChunkSchema
// and against the fields the schema declares for its type (the schema is loose; a strict
// client, such as ai@5.0, throws on a field it does not know).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

const [sdkName, scenario, rawArgs] = process.argv.slice(2);
const args = JSON.parse(rawArgs ?? "{}");
const sdk = await import(sdkName);
const { AbstractChat, DefaultChatTransport } = sdk;

// -- what the SDK's schema declares, per chunk type ----------------------------------------

function declaredFields(name) {
  const require = createRequire(import.meta.url);
  const pkg = dirname(require.resolve(`${name}/package.json`));
  const manifest = JSON.parse(readFileSync(join(pkg, "package.json"), "utf8"));
  const entry = manifest.exports["."].import ?? manifest.exports["."].default;
  const source = readFileSync(join(pkg, typeof entry === "string" ? entry : entry.default), "utf8");
  const start = source.search(/uiMessageChunkSchema = /);
  const end = source.indexOf("function isDataUIMessageChunk", start);
  const block = source.slice(start, end);
  const fields = {};
  for (const object of block.split(/(?:strictObject|looseObject)\(\{/).slice(1)) {
    const literal = object.match(/type: z\S*\.literal\("([^"]+)"\)/);
    const type = literal ? literal[1] : object.includes('startsWith("data-")') ? "data-*" : null;
    if (type === null) continue;
    const keys = [...object.matchAll(/^\s*(\w+):/gm)].map((m) => m[1]);
    fields[type] = new Set([...(fields[type] ?? []), ...keys]);
  }
  return fields;
}

const FIELDS = declaredFields(sdkName);
let schema = sdk.uiMessageChunkSchema;
if (typeof schema === "function") schema = schema();

async function conformance(payloads) {
  const problems = [];
  for (const data of payloads) {
    if (data === "[DONE]") continue;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      problems.push(`not JSON: ${data}`);
      continue;
    }
    // ai@5.0 does not export its (strict) schema: there the declared fields below and the
    // client's own parsing (a full chat) are the check.
    const result = schema ? await schema.validate(chunk) : { success: true };
    if (!result.success) problems.push(`schema rejects ${data}: ${result.error}`);
    const known = FIELDS[chunk.type?.startsWith("data-") ? "data-*" : chunk.type];
    if (known === undefined) {
      problems.push(`unknown chunk type in ${data}`);
      continue;
    }
    for (const key of Object.keys(chunk)) {
      if (!known.has(key)) problems.push(`field ${key} not declared for ${chunk.type}: ${data}`);
    }
  }
  return problems;
}

// -- a fetch that records what went over the wire ------------------------------------------

const exchanges = [];
// Counts text-delta chunks a response body delivered, for "cut after N deltas".
let deltasSeen = 0;
const deltaWaiters = [];

function onDelta() {
  deltasSeen += 1;
  for (const waiter of [...deltaWaiters]) {
    if (deltasSeen >= waiter.count) {
      deltaWaiters.splice(deltaWaiters.indexOf(waiter), 1);
      waiter.resolve();
    }
  }
}

function deltas(count) {
  return new Promise((resolve) => {
    if (deltasSeen >= count) resolve();
    else deltaWaiters.push({ count, resolve });
  });
}

function sseRecorder(exchange) {
  let buffer = "";
  const decoder = new TextDecoder();
  let current = { id: null, data: [] };
  const flushLine = (line) => {
    if (line === "") {
      if (current.data.length) {
        const data = current.data.join("\n");
        exchange.events.push({ id: current.id, data });
        if (data.startsWith('{"type":"text-delta"')) onDelta();
      }
      current = { id: null, data: [] };
    } else if (line.startsWith("data:")) {
      current.data.push(line.slice(5).replace(/^ /, ""));
    } else if (line.startsWith("id:")) {
      current.id = line.slice(3).trim();
    }
  };
  return new TransformStream({
    transform(chunk, controller) {
      buffer += decoder.decode(chunk, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) !== -1) {
        flushLine(buffer.slice(0, newline).replace(/\r$/, ""));
        buffer = buffer.slice(newline + 1);
      }
      controller.enqueue(chunk);
    },
  });
}

// Every request gets its own AbortController so a scenario can cut a response mid-answer
// the way a page reload does (the SDK sees a dropped connection, the server a disconnect).
const cutters = [];

async function recordingFetch(url, init = {}) {
  const exchange = {
    method: init.method ?? "GET",
    url: String(url),
    body: init.body ?? null,
    status: null,
    headers: {},
    events: [],
    text: null,
  };
  exchanges.push(exchange);
  const controller = new AbortController();
  init.signal?.addEventListener("abort", () => controller.abort(init.signal.reason), { once: true });
  cutters.push(controller);
  const response = await fetch(url, { ...init, signal: controller.signal });
  exchange.status = response.status;
  exchange.headers = Object.fromEntries(response.headers.entries());
  if (!response.body || !(response.headers.get("content-type") ?? "").includes("event-stream")) {
    const text = await response.text();
    exchange.text = text;
    return new Response(response.status === 204 ? null : text, {
      status: response.status,
      headers: response.headers,
    });
  }
  return new Response(response.body.pipeThrough(sseRecorder(exchange)), {
    status: response.status,
    headers: response.headers,
  });
}

// ai@7's WebSocket transport: record each frame's chunk the same way; a cut closes sockets.
const sockets = [];

class RecordingWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    this.exchange = { method: "WEBSOCKET", url: String(url), status: 101, headers: {}, events: [] };
    exchanges.push(this.exchange);
    sockets.push(this);
  }
  set onmessage(handler) {
    super.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      this.exchange.events.push({ id: frame.sequence ?? null, frame });
      if (frame.type === "chunk") {
        const data = JSON.stringify(frame.chunk);
        this.exchange.events.at(-1).data = data;
        if (frame.chunk.type === "text-delta") onDelta();
      }
      handler(event);
    };
  }
  send(data) {
    this.exchange.events.push({ id: null, sent: JSON.parse(data) });
    super.send(data);
  }
}

function cutAll() {
  for (const controller of cutters.splice(0)) controller.abort();
  for (const socket of sockets.splice(0)) socket.close();
}

// -- a chat without React: AbstractChat over a plain state object --------------------------

class State {
  constructor(messages = []) {
    this.messages = messages;
    this.status = "ready";
    this.error = undefined;
  }
  pushMessage = (message) => {
    this.messages = this.messages.concat(message);
  };
  popMessage = () => {
    this.messages = this.messages.slice(0, -1);
  };
  replaceMessage = (index, message) => {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
  };
  snapshot = (value) => structuredClone(value);
}

class Chat extends AbstractChat {
  constructor({ messages, ...init }) {
    super({ ...init, state: new State(messages) });
  }
}

function transport(api, body, websocket) {
  if (websocket) {
    return new sdk.WebSocketChatTransport({ url: websocket, body, webSocket: RecordingWebSocket });
  }
  return new DefaultChatTransport({ api, body, fetch: recordingFetch });
}

function newChat(id, { api = args.api, websocket = args.websocket, messages = [] } = {}) {
  const errors = [];
  const finishes = [];
  const chat = new Chat({
    id,
    messages,
    transport: transport(api, args.body ?? {}, websocket),
    onError: (error) => errors.push(String(error?.message ?? error)),
    onFinish: ({ isAbort, isDisconnect, isError, finishReason }) =>
      finishes.push({ isAbort, isDisconnect, isError, finishReason: finishReason ?? null }),
  });
  chat.errors = errors;
  chat.finishes = finishes;
  return chat;
}

function summary(chat) {
  return {
    status: chat.status,
    error: chat.error ? String(chat.error.message ?? chat.error) : null,
    errors: chat.errors,
    finishes: chat.finishes,
    messages: structuredClone(chat.messages),
  };
}

function textOf(chat) {
  const last = chat.messages.at(-1);
  if (!last || last.role !== "assistant") return "";
  return last.parts
    .filter((part) => part.type === "text")
    .map((part) => part.text)
    .join("");
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function stopOnServer(api, id, body) {
  if (args.websocket) return null; // the transport's abort frame is the Stop
  const response = await fetch(`${api}/${encodeURIComponent(id)}/stop`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body ?? {}),
  });
  return { status: response.status, body: await response.json().catch(() => null) };
}

// Send a message, cut the connection after `cutAfter` deltas (a reload), then a new Chat
// with the same id and what the page had persisted resumes it.
async function sendAndReload(chatId) {
  const first = newChat(chatId);
  const sending = first.sendMessage({ text: args.text });
  await deltas(args.cutAfter ?? 3);
  cutAll();
  await sending;
  const atCut = structuredClone(first.messages);
  const textAtCut = textOf(first);
  const second = newChat(chatId, {
    api: args.resumeApi ?? args.api,
    websocket: args.resumeWebsocket ?? args.websocket,
    messages: atCut,
  });
  return { first, second, textAtCut };
}

// -- scenarios -----------------------------------------------------------------------------

const scenarios = {
  // One message, the whole answer.
  async full() {
    const chat = newChat(args.id);
    await chat.sendMessage({ text: args.text });
    if (args.second) await chat.sendMessage({ text: args.second });
    return { chat: summary(chat), text: textOf(chat) };
  },

  // A reload mid-answer: the new Chat resumes the same answer from its start.
  async reload() {
    const { first, second, textAtCut } = await sendAndReload(args.id);
    await second.resumeStream();
    return { first: summary(first), textAtCut, chat: summary(second), text: textOf(second) };
  },

  // Reload, resume, then Stop: the server stop call and chat.stop() together.
  async stopAfterResume() {
    const { second, textAtCut } = await sendAndReload(args.id);
    const before = deltasSeen;
    const resuming = second.resumeStream();
    await deltas(before + (args.stopAfter ?? 3));
    const lastMessageId = second.messages.at(-1)?.id ?? null;
    const [stop] = await Promise.all([
      stopOnServer(args.api, args.id, { messageId: lastMessageId }),
      second.stop(),
    ]);
    await resuming;
    const textAtStop = textOf(second);
    await sleep(args.settleMs ?? 600);
    const textLater = textOf(second);
    const after = await fetch(`${args.api}/${encodeURIComponent(args.id)}/stream`);
    return {
      stop,
      textAtCut,
      textAtStop,
      textLater,
      lastMessageId,
      afterStatus: after.status,
      afterBody: await after.text(),
      chat: summary(second),
    };
  },

  // A stop naming an earlier answer while a newer one streams: the newer one goes on.
  async staleStop() {
    const chat = newChat(args.id);
    await chat.sendMessage({ text: args.text });
    const staleId = chat.messages.at(-1).id;
    const before = deltasSeen;
    const sending = chat.sendMessage({ text: args.second });
    await deltas(before + 2);
    const stale = await stopOnServer(args.api, args.id, { messageId: staleId });
    await sending;
    return { staleId, stale, chat: summary(chat), text: textOf(chat) };
  },

  // Chunks rendered elsewhere (args.payloads), only checked against this SDK's schema.
  async validate() {
    exchanges.push({ events: args.payloads.map((data) => ({ id: null, data })) });
    return {};
  },

  // GET /api/chat/{id}/stream for a chat with nothing running: 204, the chat stays ready.
  async resumeNothing() {
    const chat = newChat(args.id);
    await chat.resumeStream();
    return { chat: summary(chat) };
  },
};

let result;
try {
  result = await scenarios[scenario]();
} catch (error) {
  result = { thrown: String(error?.stack ?? error) };
}
const payloads = exchanges.flatMap((exchange) =>
  exchange.events.filter((event) => event.data !== undefined).map((event) => event.data),
);
result.exchanges = exchanges;
result.conformance = await conformance(payloads);
result.chunks = payloads.length;
result.sdk = sdkName;
process.stdout.write(`${JSON.stringify(result)}\n`);
process.exit(0);
