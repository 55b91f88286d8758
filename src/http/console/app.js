// The console: parley's own JavaScript client (/client/parley.js) driving a
// small page. State that survives a reload (token, open conversation) lives
// in localStorage; a reload reopens the conversation, reads the newest page
// of history and connects with ?after=<newest id> so nothing is missed.

import { Parley, parseMetrics } from "/client/parley.js";
import { LineChart } from "/console/charts.js";

const $ = (id) => document.getElementById(id);
const store = {
  get token() { return localStorage.getItem("parley.token"); },
  set token(v) { v ? localStorage.setItem("parley.token", v) : localStorage.removeItem("parley.token"); },
  get room() { return Number(localStorage.getItem("parley.room")) || null; },
  set room(v) { v ? localStorage.setItem("parley.room", String(v)) : localStorage.removeItem("parley.room"); },
};

let api = null;
let me = null;
let chat = null; // the open conversation's Connection
let notes = null; // the notifications Connection
let room = null; // { id, oldest (for paging back), next }
let unread = 0;

function userOf(token) {
  try {
    const b = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(b)).sub;
  } catch {
    return null;
  }
}

// ------------------------------------------------------------- sign in --

async function mint(username) {
  const r = await fetch("/api/console/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ username }),
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(r.status === 404 ? "this server does not sign tokens (a secret is configured or it is not on loopback): paste a token" : body.detail);
  return body.token;
}

$("mint-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    signIn(await mint($("mint-user").value.trim()));
  } catch (err) {
    $("signin-error").textContent = err.message;
  }
});
$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const t = $("token-input").value.trim();
  if (!userOf(t)) return ($("signin-error").textContent = "that is not a JWT");
  signIn(t);
});
$("signout").addEventListener("click", () => {
  store.token = null;
  store.room = null;
  location.reload();
});

function signIn(token) {
  store.token = token;
  me = userOf(token);
  api = new Parley("", () => store.token);
  $("signin").hidden = true;
  $("whoami").hidden = false;
  $("me").textContent = me;
  show("chat");
  loadConversations().then(() => store.room && openRoom(store.room));
  startNotifications();
}

// ---------------------------------------------------------------- tabs --

for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => show(b.dataset.tab));
function show(tab) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === tab);
  $("chat-view").hidden = tab !== "chat" || !api;
  $("figures-view").hidden = tab !== "figures";
  $("signin").hidden = tab !== "chat" || !!api;
  if (tab === "figures") startFigures();
}

// -------------------------------------------------------- conversations --

async function loadConversations() {
  const list = await api.conversations();
  const ul = $("conversations");
  ul.replaceChildren(
    ...list
      .sort((a, b) => b.id - a.id)
      .map((c) => {
        const li = document.createElement("li");
        li.dataset.id = c.id;
        li.textContent = c.title ?? `#${c.id}`;
        const small = document.createElement("small");
        small.textContent = c.participants.join(", ");
        li.append(small);
        li.classList.toggle("active", room?.id === c.id);
        li.addEventListener("click", () => openRoom(c.id));
        return li;
      }),
  );
}

$("create-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const participants = $("create-participants").value.split(",").map((s) => s.trim()).filter(Boolean);
  const title = $("create-title").value.trim() || null;
  try {
    const c = await api.createConversation({ participants, title });
    $("create-participants").value = "";
    $("create-title").value = "";
    await loadConversations();
    openRoom(c.id);
  } catch (err) {
    $("room-error").textContent = err.message;
  }
});

// ---------------------------------------------------------------- room --

async function openRoom(id) {
  chat?.close();
  chat = null;
  $("room-error").textContent = "";
  let c;
  try {
    c = await api.conversation(id);
  } catch (err) {
    store.room = null;
    $("room-error").textContent = err.message;
    return;
  }
  store.room = id;
  room = { id, next: null };
  for (const li of $("conversations").children) li.classList.toggle("active", Number(li.dataset.id) === id);
  $("room-title").textContent = c.title ?? `#${id}`;
  $("messages").replaceChildren();
  const page = await api.messages(id, { limit: 50 });
  for (const m of page.results.slice().reverse()) render(m);
  room.next = page.next;
  $("older").hidden = page.next === null;
  $("send-form").hidden = false;
  // Everything after the newest message we show, replayed, then live.
  const after = page.results.length ? page.results[0].id : 0;
  chat = api.chat(id, { after });
  chat.on("message", render);
  chat.on("edited", ({ id, content }) => {
    const li = msgEl(id);
    if (li) {
      li.querySelector(".text").textContent = content;
      li.querySelector(".meta .edited").textContent = " · edited";
    }
  });
  chat.on("deleted", ({ id }) => msgEl(id)?.remove());
  chat.on("truncated", ({ after }) => {
    // More was missed than the server replays: show history up to `after` again.
    fillGap(id, after);
  });
  chat.on("error", (e) => ($("room-error").textContent = `${e.code}: ${e.detail}`));
  chat.on("open", () => ($("room-state").textContent = "live"));
  chat.on("reconnecting", ({ delay }) => ($("room-state").textContent = `reconnecting in ${delay} ms`));
  chat.on("failed", ({ reason }) => ($("room-state").textContent = reason));
  $("room").dataset.socket = "connecting";
  chat.on("open", () => ($("room").dataset.socket = "open"));
}

async function fillGap(id, after) {
  const have = new Set([...$("messages").children].map((li) => Number(li.dataset.id)));
  let before = after + 1;
  for (;;) {
    const page = await api.messages(id, { before, limit: 100 });
    const fresh = page.results.filter((m) => !have.has(m.id));
    for (const m of fresh) render(m);
    if (fresh.length < page.results.length || page.next === null) break;
    before = page.next;
  }
}

$("older").addEventListener("click", async () => {
  if (!room?.next) return;
  const page = await api.messages(room.id, { before: room.next, limit: 50 });
  for (const m of page.results) render(m, true);
  room.next = page.next;
  $("older").hidden = page.next === null;
});

const msgEl = (id) => $("messages").querySelector(`li[data-id="${id}"]`);

/** Adds a message in id order (history, replay and live all meet here; a duplicate is ignored). */
function render(m) {
  if (msgEl(m.id)) return;
  const li = document.createElement("li");
  li.dataset.id = m.id;
  const mine = m.sender === me;
  li.classList.toggle("mine", mine);
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = `${m.sender} · ${new Date(m.timestamp).toLocaleTimeString()}`;
  const edited = document.createElement("span");
  edited.className = "edited";
  edited.textContent = m.edited ? " · edited" : "";
  meta.append(edited);
  if (mine) {
    const actions = document.createElement("span");
    actions.className = "actions";
    const edit = document.createElement("button");
    edit.textContent = "edit";
    edit.className = "edit";
    edit.addEventListener("click", () => {
      const text = prompt("Edit message", li.querySelector(".text").textContent);
      if (text !== null && text.trim()) chat?.edit(m.id, text);
    });
    const del = document.createElement("button");
    del.textContent = "delete";
    del.className = "delete";
    del.addEventListener("click", () => chat?.delete(m.id));
    actions.append(edit, del);
    meta.append(actions);
  }
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = m.content;
  li.append(meta, text);
  const ol = $("messages");
  const later = [...ol.children].find((x) => Number(x.dataset.id) > m.id);
  const atBottom = ol.scrollTop + ol.clientHeight >= ol.scrollHeight - 10;
  ol.insertBefore(li, later ?? null);
  if (!later && atBottom) ol.scrollTop = ol.scrollHeight;
}

$("send-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("send-text").value;
  if (!text.trim()) return;
  if (chat?.send(text)) $("send-text").value = "";
  else $("room-error").textContent = "not connected yet; try again";
});

// ------------------------------------------------------- notifications --

function setUnread(n) {
  unread = Math.max(0, n);
  $("badge").textContent = String(unread);
  $("badge").hidden = unread === 0;
}

async function startNotifications() {
  const page = await api.notificationsPage({ limit: 30 });
  setUnread(await api.unreadCount());
  const ul = $("notifications");
  ul.replaceChildren();
  for (const n of page.results.slice().reverse()) renderNote(n);
  const after = page.results.length ? page.results[0].id : 0;
  notes = api.notifications({ after });
  notes.on("notification", (n) => {
    if (ul.querySelector(`li[data-id="${n.id}"]`)) return;
    // Someone may have added us to a conversation: show it in the list.
    loadConversations().catch(() => {});
    renderNote(n);
    if (!n.is_read) setUnread(unread + 1);
  });
}

function renderNote(n) {
  const li = document.createElement("li");
  li.dataset.id = n.id;
  li.classList.toggle("unread", !n.is_read);
  li.textContent = n.message;
  if (!n.is_read) {
    const b = document.createElement("button");
    b.textContent = "mark read";
    b.className = "mark-read";
    b.addEventListener("click", async () => {
      await api.markRead(n.id);
      li.classList.remove("unread");
      b.remove();
      setUnread(await api.unreadCount());
    });
    li.append(b);
  }
  $("notifications").prepend(li);
}

$("bell").addEventListener("click", () => ($("notifications-panel").hidden = !$("notifications-panel").hidden));
$("read-all").addEventListener("click", async () => {
  await api.readAll();
  for (const li of $("notifications").querySelectorAll("li.unread")) {
    li.classList.remove("unread");
    li.querySelector("button")?.remove();
  }
  setUnread(await api.unreadCount());
});

// ------------------------------------------------------------- figures --

let figures = null;

function startFigures() {
  if (figures) return;
  const charts = {
    sockets: new LineChart($("chart-sockets"), [{ color: "#0a66c2" }, { color: "#e37400" }]),
    messages: new LineChart($("chart-messages"), [{ color: "#0a66c2" }]),
    deliveries: new LineChart($("chart-deliveries"), [{ color: "#188038" }]),
    flush: Object.assign(new LineChart($("chart-flush"), [{ color: "#a142f4" }]), { floor: 0.1 }),
    slow: new LineChart($("chart-slow"), [{ color: "#d93025" }]),
  };
  const history = []; // the last 11 samples, for rates and the p99 window
  figures = setInterval(async () => {
    let m;
    try {
      const r = await fetch("/metrics");
      if (!r.ok) throw new Error(`/metrics answered ${r.status}`);
      m = parseMetrics(await r.text());
      $("figures-error").textContent = "";
    } catch (e) {
      $("figures-error").textContent = e.message;
      return;
    }
    const sample = { t: performance.now(), m };
    history.push(sample);
    if (history.length > 11) history.shift();
    const prev = history.length > 1 ? history[history.length - 2] : null;
    const rate = (key) => (prev ? Math.max(0, ((m[key] ?? 0) - (prev.m[key] ?? 0)) / ((sample.t - prev.t) / 1000)) : null);
    charts.sockets.push([m['parley_open_sockets{kind="chat"}'] ?? 0, m['parley_open_sockets{kind="notifications"}'] ?? 0]);
    charts.messages.push([rate('parley_writes_total{kind="message"}')]);
    charts.deliveries.push([rate("parley_deliveries_total")]);
    charts.flush.push([p99(history[0].m, m)]);
    charts.slow.push([m.parley_slow_consumers_total ?? 0]);
  }, 1000);
}

/** p99 of the flush histogram between two samples, in ms (null: no flush in the window). */
function p99(old, now) {
  const buckets = Object.keys(now)
    .filter((k) => k.startsWith("parley_store_flush_seconds_bucket"))
    .map((k) => ({ le: Number(k.match(/le="([^"]+)"/)[1].replace("+Inf", "Infinity")), n: now[k] - (old[k] ?? 0) }))
    .sort((a, b) => a.le - b.le);
  const total = buckets.length ? buckets[buckets.length - 1].n : 0;
  if (total <= 0) return null;
  const b = buckets.find((x) => x.n >= 0.99 * total);
  return Number.isFinite(b.le) ? b.le * 1000 : null;
}

// --------------------------------------------------------------- start --

if (store.token && userOf(store.token)) signIn(store.token);
else show("chat");
