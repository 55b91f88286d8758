// parley's JavaScript client: one file, no dependencies, for browsers and
// Node (>= 22, or 20 with --experimental-websocket). Types: parley.d.ts.
//
//   import { connect, Parley } from "./parley.js";
//   const chat = connect("ws://127.0.0.1:8000/ws/chat/1/", () => token);
//   chat.on("message", (m) => console.log(m.sender, m.content));
//   chat.send("hi");
//
// A socket reconnects by itself (exponential backoff with jitter) and
// resumes with `?after=<newest id seen>`, so the app sees every event once,
// in order, with no gap. What the server says, and what the client does:
//   any close but our own: 1001 / 1012 / 1013 / 1006 (going away,
//     restart, slow consumer, connection lost) → reconnect and resume
//   close 1008, or HTTP 401     → ask getToken({ refresh: true }), reconnect
//   HTTP 403 / 404 on upgrade   → "failed": no point retrying
//   {"type":"resume.truncated"} → "truncated": more was missed than the
//     server replays; page the history API back from `after`

/** An HTTP error answer of the API: `{"error": code, "detail": text}`. */
export class ParleyError extends Error {
  constructor(status, code, detail) {
    super(`${status} ${code}: ${detail}`);
    this.name = "ParleyError";
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

/** A tiny event emitter: `on(type, fn)` answers a function that unsubscribes. */
class Emitter {
  #handlers = new Map();
  on(type, fn) {
    if (!this.#handlers.has(type)) this.#handlers.set(type, new Set());
    this.#handlers.get(type).add(fn);
    return () => this.#handlers.get(type)?.delete(fn);
  }
  off(type, fn) {
    this.#handlers.get(type)?.delete(fn);
  }
  emit(type, value) {
    for (const fn of [...(this.#handlers.get(type) ?? [])]) {
      try {
        fn(value);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}

function httpBase(url) {
  const u = new URL(url);
  u.protocol = u.protocol === "wss:" || u.protocol === "https:" ? "https:" : "http:";
  u.pathname = "/";
  u.search = "";
  u.hash = "";
  return u.toString().replace(/\/$/, "");
}

function wsUrl(url) {
  const u = new URL(url);
  if (u.protocol === "http:") u.protocol = "ws:";
  if (u.protocol === "https:") u.protocol = "wss:";
  return u;
}

/** Calls `getToken`, which may answer a string or a promise of one. */
async function tokenOf(getToken, refresh) {
  const t = await getToken({ refresh });
  if (typeof t !== "string" || t === "") throw new Error("getToken answered no token");
  return t;
}

/**
 * One chat or notifications socket that stays open: see the top of this file.
 * Events: open, message, edited, deleted, notification, error (an error frame
 * from the server), truncated, reconnecting, close, failed.
 */
export class Connection extends Emitter {
  #url;
  #getToken;
  #opts;
  #ws = null;
  #attempt = 0;
  #timer = null;
  #closed = false;
  #refresh = false;
  #opened = false;
  #everConnected = false;
  /** Newest message id (chat) or notification id seen; resumes from here. */
  lastId = null;
  /** "connecting" | "open" | "waiting" | "closed" */
  state = "connecting";
  kind;

  constructor(url, getToken, opts = {}) {
    super();
    this.#url = wsUrl(url);
    this.#getToken = getToken;
    this.#opts = {
      initialDelay: 250,
      maxDelay: 15000,
      WebSocket: globalThis.WebSocket,
      fetch: globalThis.fetch?.bind(globalThis),
      ...opts,
    };
    const m = this.#url.pathname.match(/^\/ws\/chat\/(\d+)\/?$/);
    this.kind = m ? "chat" : "notifications";
    this.conversation = m ? Number(m[1]) : null;
    if (opts.after !== undefined && opts.after !== null) this.lastId = Number(opts.after);
    if (!this.#opts.WebSocket) throw new Error("no WebSocket implementation: pass options.WebSocket");
    queueMicrotask(() => this.#open());
  }

  /** Sends a chat message (chat sockets). Answers false when not open. */
  send(text) {
    return this.#send({ type: "chat_message", message: text });
  }
  edit(messageId, content) {
    return this.#send({ type: "edit_message", message_id: messageId, content });
  }
  delete(messageId) {
    return this.#send({ type: "delete_message", message_id: messageId });
  }
  /** Closes for good (no reconnect). */
  close() {
    this.#closed = true;
    this.state = "closed";
    clearTimeout(this.#timer);
    if (this.#ws && this.#ws.readyState <= 1) this.#ws.close(1000, "client closed");
  }

  #send(frame) {
    if (!this.#ws || this.#ws.readyState !== 1) return false;
    this.#ws.send(JSON.stringify(frame));
    return true;
  }

  async #open() {
    if (this.#closed) return;
    this.state = "connecting";
    this.#opened = false;
    let token;
    try {
      token = await tokenOf(this.#getToken, this.#refresh);
    } catch (e) {
      this.emit("failed", { reason: "token", error: e });
      return this.#retry();
    }
    this.#refresh = false;
    if (this.#closed) return;
    const url = new URL(this.#url);
    // The first connect resumes only when asked; every reconnect resumes
    // from the newest id seen (0: from the start), so nothing is skipped.
    const after = this.lastId ?? (this.#everConnected ? 0 : null);
    if (after !== null) url.searchParams.set("after", String(after));
    let ws;
    try {
      ws = new this.#opts.WebSocket(url.toString(), ["bearer", token]);
    } catch (e) {
      this.emit("failed", { reason: "url", error: e });
      return;
    }
    this.#ws = ws;
    ws.onopen = () => {
      this.#opened = true;
      this.#everConnected = true;
      this.#attempt = 0;
      this.state = "open";
      this.emit("open", { resumedAfter: after });
    };
    ws.onmessage = (e) => this.#frame(e.data);
    ws.onclose = (e) => this.#onClose(ws, e.code, e.reason, token);
    // Some implementations (Node 20's) fire only "error" for a refused
    // handshake; #onClose runs once per socket either way.
    ws.onerror = () => {
      if (!this.#opened) this.#onClose(ws, 1006, "", token);
    };
  }

  #frame(data) {
    if (typeof data !== "string") return;
    let ev;
    try {
      ev = JSON.parse(data);
    } catch {
      return;
    }
    if (this.kind === "notifications") {
      if (ev.message && typeof ev.message === "object") {
        const n = ev.message;
        if (typeof n.id === "number" && (this.lastId === null || n.id > this.lastId)) this.lastId = n.id;
        this.emit("notification", n);
      } else if (ev.type === "error") this.emit("error", ev);
      return;
    }
    switch (ev.type) {
      case undefined:
        if (typeof ev.id === "number" && (this.lastId === null || ev.id > this.lastId)) this.lastId = ev.id;
        this.emit("message", ev);
        break;
      case "message.edited":
        this.emit("edited", ev.message);
        break;
      case "message.deleted":
        this.emit("deleted", { id: ev.message_id });
        break;
      case "resume.truncated":
        this.emit("truncated", { after: ev.after, lastSeen: this.lastId });
        break;
      case "error":
        this.emit("error", ev);
        break;
      default:
        this.emit("unknown", ev);
    }
  }

  async #onClose(ws, code, reason, token) {
    if (ws !== this.#ws) return;
    this.#ws = null;
    const wasOpen = this.#opened;
    if (this.#closed) {
      this.emit("close", { code, reason, reconnect: false });
      return;
    }
    if (code === 1008) this.#refresh = true;
    if (!wasOpen) {
      // The upgrade was refused or the server is down: a browser does not
      // say which, so ask the REST API with the same token.
      const status = await this.#probe(token);
      if (status === 401) this.#refresh = true;
      else if (status === 403 || status === 404) {
        this.state = "closed";
        this.#closed = true;
        this.emit("failed", { reason: status === 403 ? "forbidden" : "not_found", status });
        this.emit("close", { code, reason, reconnect: false });
        return;
      }
    }
    this.emit("close", { code, reason, reconnect: true });
    this.#retry();
  }

  /** HTTP status of the REST twin of this socket's checks (0: unreachable). */
  async #probe(token) {
    const f = this.#opts.fetch;
    if (!f) return 0;
    const path =
      this.kind === "chat" ? `/api/conversations/${this.conversation}/` : "/api/notifications/unread_count/";
    try {
      const r = await f(httpBase(this.#url) + path, { headers: { Authorization: `Bearer ${token}` } });
      return r.status;
    } catch {
      return 0;
    }
  }

  #retry() {
    if (this.#closed) return;
    const { initialDelay, maxDelay } = this.#opts;
    const ceiling = Math.min(maxDelay, initialDelay * 2 ** this.#attempt);
    // "Equal jitter": half fixed, half random, so a restart's crowd spreads out.
    const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    this.#attempt = Math.min(this.#attempt + 1, 30);
    this.state = "waiting";
    this.emit("reconnecting", { attempt: this.#attempt, delay });
    this.#timer = setTimeout(() => this.#open(), delay);
  }
}

/**
 * Opens a chat (`.../ws/chat/<id>/`) or notifications (`.../ws/notifications/`)
 * socket that reconnects and resumes. `getToken({ refresh })` answers the
 * JWT (or a promise of it); `refresh` is true after the server refused it.
 */
export function connect(url, getToken, options) {
  return new Connection(url, getToken, options);
}

/** The REST API plus sockets, for one server. */
export class Parley {
  #base;
  #getToken;
  #fetch;
  #WebSocket;

  /** `baseUrl`: e.g. `http://127.0.0.1:8000` (or "" in a page the server serves). */
  constructor(baseUrl, getToken, options = {}) {
    this.#base = (baseUrl || (globalThis.location ? globalThis.location.origin : "")).replace(/\/$/, "");
    this.#getToken = getToken;
    this.#fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    this.#WebSocket = options.WebSocket;
  }

  /** A chat socket for conversation `id`; `after`: resume after this message id. */
  chat(id, options = {}) {
    return connect(this.#wsUrl(`/ws/chat/${id}/`), this.#getToken, this.#sockOpts(options));
  }
  /** The caller's notifications socket; `after`: resume after this notification id. */
  notifications(options = {}) {
    return connect(this.#wsUrl("/ws/notifications/"), this.#getToken, this.#sockOpts(options));
  }

  conversations() {
    return this.request("GET", "/api/conversations/").then((r) => r.results);
  }
  createConversation({ participants = [], title = null } = {}) {
    return this.request("POST", "/api/conversations/", { participants, title });
  }
  conversation(id) {
    return this.request("GET", `/api/conversations/${id}/`);
  }
  /** One page of history, newest first: `{results, next}` (`next` → `before`). */
  messages(id, { before, limit } = {}) {
    return this.request("GET", `/api/conversations/${id}/messages/${query({ before, limit })}`);
  }
  notificationsPage({ unread, before, limit } = {}) {
    return this.request("GET", `/api/notifications/${query({ unread, before, limit })}`);
  }
  unreadCount() {
    return this.request("GET", "/api/notifications/unread_count/").then((r) => r.count);
  }
  markRead(id) {
    return this.request("POST", `/api/notifications/${id}/read/`);
  }
  readAll() {
    return this.request("POST", "/api/notifications/read_all/").then((r) => r.updated);
  }
  /** Service tokens only. */
  notify(user, message) {
    return this.request("POST", "/api/notifications/", { user, message });
  }
  health() {
    return this.#fetch(`${this.#base}/healthz`).then((r) => r.json());
  }
  metrics() {
    return this.#fetch(`${this.#base}/metrics`).then((r) => {
      if (!r.ok) throw new ParleyError(r.status, "not_found", "metrics are off");
      return r.text();
    });
  }

  /** Any API call; retries once with a refreshed token after a 401. */
  async request(method, path, body) {
    for (let refresh = false; ; refresh = true) {
      const token = await tokenOf(this.#getToken, refresh);
      const init = { method, headers: { Authorization: `Bearer ${token}` } };
      if (body !== undefined) {
        init.headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
      const r = await this.#fetch(this.#base + path, init);
      const text = await r.text();
      const data = text ? JSON.parse(text) : null;
      if (r.ok) return data;
      if (r.status === 401 && !refresh) continue;
      throw new ParleyError(r.status, data?.error ?? "error", data?.detail ?? text);
    }
  }

  #wsUrl(path) {
    const base = this.#base || "http://localhost";
    return wsUrl(base + path).toString();
  }
  #sockOpts(options) {
    return { fetch: this.#fetch, ...(this.#WebSocket ? { WebSocket: this.#WebSocket } : {}), ...options };
  }
}

function query(params) {
  const q = Object.entries(params)
    .filter(([, v]) => v !== undefined && v !== null)
    .map(([k, v]) => `${k}=${encodeURIComponent(String(v))}`)
    .join("&");
  return q ? `?${q}` : "";
}

/**
 * Parses Prometheus text (what `/metrics` answers) into
 * `{ "name{label=\"v\"}": number }`, for dashboards such as the console's.
 */
export function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const i = line.lastIndexOf(" ");
    if (i < 0) continue;
    const v = Number(line.slice(i + 1));
    if (!Number.isNaN(v)) out[line.slice(0, i)] = v;
  }
  return out;
}
