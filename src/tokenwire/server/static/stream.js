// tokenwire's native event stream over fetch(): POST /v1/streams, resume after a drop.
//
// EventSource cannot POST, so the page reads the SSE body itself. A stream is a numbered log
// (every event has a seq); when the connection breaks before the terminal event, the run
// reconnects with GET /v1/streams/{id}?after=<last seq> and carries on from the next event,
// so nothing is lost or shown twice. Stop is POST /v1/streams/{id}/cancel: the server stops
// decoding and the stream ends with stream.cancelled, read like any other event.

const TERMINAL = new Set(["stream.completed", "stream.cancelled", "stream.failed"]);

/** Parses an SSE byte stream into {event, id, data} messages (WHATWG EventSource rules). */
export async function* readSSE(body, onBytes) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let data = [];
  let event = "";
  let id = null;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      onBytes?.();
      buf += value;
      for (;;) {
        const m = /\r\n|\r|\n/.exec(buf);
        // A lone "\r" at the end may be half of "\r\n": wait for the next chunk.
        if (!m || (m[0] === "\r" && m.index === buf.length - 1)) break;
        const line = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        if (line === "") {
          if (data.length) yield { event: event || "message", id, data: data.join("\n") };
          data = [];
          event = "";
          continue;
        }
        if (line[0] === ":") continue; // comment: heartbeat
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value[0] === " ") value = value.slice(1);
        if (field === "data") data.push(value);
        else if (field === "event") event = value;
        else if (field === "id" && !value.includes("\0")) id = value;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** The API key sent with every request (empty: the server runs without keys). */
let apiKey = "";

export function setApiKey(key) {
  apiKey = (key || "").trim();
}

/** Headers for an API request: the caller's plus the key, when one is set. */
export function apiHeaders(headers = {}) {
  return apiKey ? { ...headers, authorization: `Bearer ${apiKey}` } : headers;
}

export class StreamError extends Error {
  constructor(message, { status = 0, type = "error", resumable = false } = {}) {
    super(message);
    this.status = status;
    this.type = type;
    this.resumable = resumable;
  }
}

async function errorFrom(response) {
  let message = `HTTP ${response.status}`;
  let type = "error";
  try {
    const body = await response.json();
    const err = body.error || body;
    if (err.message) message = err.message;
    if (err.type) type = err.type;
  } catch {
    // not JSON: keep the status line
  }
  return new StreamError(message, { status: response.status, type });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * One answer being streamed. Callbacks:
 *   onEvent(event)     every native event, in seq order, each exactly once
 *   onState(state)     "connecting" | "streaming" | "reconnecting" | "ended"
 *   onStreamId(id)     once the server named the stream
 */
export class StreamRun {
  constructor({ body = null, streamId = null, after = -1, onEvent, onState, onStreamId }) {
    this.body = body;
    this.id = streamId;
    this.lastSeq = after;
    this.onEvent = onEvent;
    this.onState = onState || (() => {});
    this.onStreamId = onStreamId || (() => {});
    this.ended = false;
    this.stopRequested = false;
    this.connection = null; // AbortController of the current connection
    this.stallMs = 45000; // server heartbeats are 15 s by default
    this.maxReconnectMs = 120000;
  }

  /** Runs to the terminal event. Rejects with StreamError when the request is refused. */
  async run() {
    this.onState("connecting");
    if (this.id === null) {
      const response = await this.connect("/v1/streams", {
        method: "POST",
        headers: { "content-type": "application/json", accept: "text/event-stream" },
        body: JSON.stringify(this.body),
      });
      if (!response.ok) throw await errorFrom(response);
      this.id = response.headers.get("x-stream-id");
      this.onStreamId(this.id);
      if (this.stopRequested) this.sendCancel(); // Stop pressed before the id was known
      await this.consume(response);
    }
    let downSince = null;
    let delay = 250;
    while (!this.ended) {
      // The connection broke before the terminal event: resume after the last seq seen.
      downSince ??= Date.now();
      this.onState("reconnecting");
      if (Date.now() - downSince > this.maxReconnectMs) {
        throw new StreamError("Lost the connection to the server.", { type: "network" });
      }
      let response;
      try {
        response = await this.connect(
          `/v1/streams/${encodeURIComponent(this.id)}?after=${this.lastSeq}`,
          { headers: { accept: "text/event-stream" } },
        );
      } catch {
        await sleep(delay);
        delay = Math.min(delay * 2, 4000);
        continue;
      }
      if (!response.ok) {
        if (response.status >= 500 || response.status === 429) {
          await sleep(delay);
          delay = Math.min(delay * 2, 4000);
          continue;
        }
        throw await errorFrom(response); // 404: expired or unknown; no point retrying
      }
      if (this.stopRequested) this.sendCancel(); // Stop pressed while we were offline
      const before = this.lastSeq;
      await this.consume(response);
      if (this.lastSeq > before) {
        downSince = null;
        delay = 250;
      }
    }
    this.onState("ended");
  }

  /** fetch() with an AbortController per connection; network errors propagate. */
  async connect(url, init) {
    this.connection = new AbortController();
    return fetch(url, {
      ...init,
      headers: apiHeaders(init.headers),
      signal: this.connection.signal,
      cache: "no-store",
    });
  }

  /** Reads one connection until it ends or breaks; never throws. */
  async consume(response) {
    this.onState("streaming");
    let watchdog = null;
    const connection = this.connection;
    const arm = () => {
      clearTimeout(watchdog);
      // A connection that went silent (no events, no heartbeats) is dead: drop and resume.
      watchdog = setTimeout(() => connection.abort(), this.stallMs);
    };
    arm();
    try {
      for await (const message of readSSE(response.body, arm)) {
        let event;
        try {
          event = JSON.parse(message.data);
        } catch {
          continue;
        }
        const seq = typeof event.seq === "number" ? event.seq : Number(message.id);
        if (seq <= this.lastSeq) continue; // already seen before a reconnect
        this.lastSeq = seq;
        this.onEvent(event);
        if (TERMINAL.has(event.type)) {
          this.ended = true;
          return;
        }
      }
    } catch {
      // Network error or abort mid-body: the caller resumes.
    } finally {
      clearTimeout(watchdog);
      if (!this.ended) connection.abort();
    }
  }

  /** Stop: ask the server to stop generating. The stream then ends with stream.cancelled. */
  async stop() {
    this.stopRequested = true;
    return this.sendCancel();
  }

  async sendCancel() {
    if (this.id === null || this.ended) return false;
    try {
      const response = await fetch(`/v1/streams/${encodeURIComponent(this.id)}/cancel`, {
        method: "POST",
        headers: apiHeaders(),
        cache: "no-store",
      });
      return response.ok;
    } catch {
      return false; // offline: sent again once the stream reconnects
    }
  }

  /** Stops reading locally without touching the server stream (page switches away). */
  detach() {
    this.ended = true;
    this.connection?.abort();
  }
}
