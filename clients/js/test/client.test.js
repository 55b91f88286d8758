// clients/js against the real parley binary (node --test).

import { test, after } from "node:test";
import assert from "node:assert/strict";

import { connect, Parley, ParleyError, parseMetrics } from "../parley.js";
import { Server, token, until, user, sleep } from "./server.js";

const servers = [];
after(async () => {
  for (const s of servers) await s.stop();
});
async function server(extra) {
  const s = await Server.start(extra);
  servers.push(s);
  return s;
}

/** A conversation of `owner` with `others`, through the client's REST helpers. */
async function conversation(s, owner, others) {
  const api = new Parley(s.http, () => token(owner));
  return (await api.createConversation({ participants: others, title: "t" })).id;
}

/** Everything a connection emits, in order. */
function record(conn) {
  const log = { messages: [], events: [], closes: [], truncated: [], opens: [] };
  conn.on("message", (m) => {
    log.messages.push(m);
    log.events.push(["message", m.id]);
  });
  conn.on("edited", (m) => log.events.push(["edited", m.id]));
  conn.on("deleted", (m) => log.events.push(["deleted", m.id]));
  conn.on("close", (c) => log.closes.push(c.code));
  conn.on("truncated", (t) => log.truncated.push(t));
  conn.on("open", (o) => log.opens.push(o));
  return log;
}

/** A plain socket that sends `texts` and waits for each echo. */
async function say(s, conv, who, texts) {
  const ids = [];
  const ws = new WebSocket(`${s.ws}/ws/chat/${conv}/`, ["bearer", token(who)]);
  await new Promise((r, j) => {
    ws.onopen = r;
    ws.onerror = () => j(new Error("sender socket failed"));
  });
  const got = [];
  ws.onmessage = (e) => got.push(JSON.parse(e.data));
  for (const t of texts) {
    ws.send(JSON.stringify({ type: "chat_message", message: t }));
    await until(() => got.some((m) => m.content === t), 5000, `echo of ${t}`);
    ids.push(got.find((m) => m.content === t).id);
  }
  ws.close();
  return ids;
}

test("REST helpers: create, list, history pages, errors as ParleyError", async () => {
  const s = await server();
  const [alice, bob] = [user("alice"), user("bob")];
  const api = new Parley(s.http, () => token(alice));
  const c = await api.createConversation({ participants: [bob], title: "hello" });
  assert.deepEqual(c.participants, [alice, bob]);
  assert.equal((await api.conversations()).length, 1);
  await say(s, c.id, alice, ["one", "two", "three"]);
  const page = await api.messages(c.id, { limit: 2 });
  assert.deepEqual(page.results.map((m) => m.content), ["three", "two"]);
  const older = await api.messages(c.id, { before: page.next, limit: 2 });
  assert.deepEqual(older.results.map((m) => m.content), ["one"]);
  assert.equal(older.next, null);
  const err = await api.messages(c.id, { limit: 0 }).catch((e) => e);
  assert.ok(err instanceof ParleyError);
  assert.equal(err.status, 400);
  assert.equal(err.code, "invalid_field");
  const stranger = new Parley(s.http, () => token(user("eve")));
  assert.equal((await stranger.conversation(c.id).catch((e) => e)).status, 403);
  assert.equal(await new Parley(s.http, () => token(bob)).unreadCount(), 3);
  assert.ok(parseMetrics(await api.metrics())['parley_writes_total{kind="message"}'] >= 3);
});

test("a 401 asks getToken for a fresh token, on REST and on the socket", async () => {
  const s = await server();
  const [alice, bob] = [user("alice"), user("bob")];
  const conv = await conversation(s, alice, [bob]);
  const asked = [];
  const getToken = ({ refresh }) => {
    asked.push(refresh);
    return refresh ? token(alice) : token(alice, { ttl: -3600 });
  };
  const api = new Parley(s.http, getToken);
  assert.equal((await api.conversation(conv)).id, conv);
  assert.deepEqual(asked, [false, true]);

  asked.length = 0;
  const chat = connect(`${s.ws}/ws/chat/${conv}/`, getToken, { initialDelay: 50 });
  const log = record(chat);
  await until(() => log.opens.length === 1, 10000, "open after refresh");
  assert.deepEqual(asked.slice(0, 2), [false, true]);
  chat.close();
});

test("a conversation the user is not in fails for good (no retry loop)", async () => {
  const s = await server();
  const conv = await conversation(s, user("alice"), [user("bob")]);
  const chat = connect(`${s.ws}/ws/chat/${conv}/`, () => token(user("eve")), { initialDelay: 50 });
  const failed = await new Promise((r) => chat.on("failed", r));
  assert.equal(failed.reason, "forbidden");
  assert.equal(chat.state, "closed");
});

test("reconnects across a restart of parley (close 1001) and resumes with no gap", async () => {
  const s = await server();
  const [alice, bob] = [user("alice"), user("bob")];
  const conv = await conversation(s, alice, [bob]);
  const before = await say(s, conv, bob, ["b1", "b2"]);
  const chat = connect(`${s.ws}/ws/chat/${conv}/`, () => token(alice), { after: before[0], initialDelay: 1500, maxDelay: 3000 });
  const log = record(chat);
  await until(() => log.messages.length === 1, 5000, "replay of b2");
  await say(s, conv, bob, ["b3"]);
  await until(() => log.messages.length === 2, 5000, "live b3");

  await s.terminate();
  await until(() => log.closes.length === 1, 5000, "close");
  assert.equal(log.closes[0], 1001, "SIGTERM closes with 1001 (going away)");
  await s.startAgain();
  // Sent while alice is away (her first retry waits at least 750 ms).
  const missed = await say(s, conv, bob, ["b4", "b5"]);
  await until(() => log.messages.length === 4, 15000, "resume after restart");
  const live = await say(s, conv, bob, ["b6"]);
  await until(() => log.messages.length === 5, 5000, "live after resume");
  assert.deepEqual(log.messages.map((m) => m.content), ["b2", "b3", "b4", "b5", "b6"]);
  assert.equal(log.opens.length, 2);
  assert.equal(log.opens[1].resumedAfter, log.messages[1].id);
  assert.equal(chat.lastId, live[0]);
  assert.ok(missed[0] > log.messages[1].id);
  chat.close();
});

test("resumes across a kill -9 of parley: edits and deletes replayed too, nothing twice", async () => {
  const s = await server();
  const [alice, bob] = [user("alice"), user("bob")];
  const conv = await conversation(s, alice, [bob]);
  const chat = connect(`${s.ws}/ws/chat/${conv}/`, () => token(alice), { initialDelay: 1500, maxDelay: 3000 });
  const log = record(chat);
  await until(() => chat.state === "open", 5000, "open");
  const [m1] = await say(s, conv, bob, ["k1"]);
  await until(() => log.messages.length === 1, 5000, "k1");

  await s.kill9();
  await until(() => log.closes.length === 1, 5000, "close after kill -9");
  assert.equal(log.closes[0], 1006, "a killed server sends no close frame");
  await s.startAgain();
  // Bob edits k1, sends k2 and deletes it while alice is away.
  const ws = new WebSocket(`${s.ws}/ws/chat/${conv}/`, ["bearer", token(bob)]);
  const got = [];
  ws.onmessage = (e) => got.push(JSON.parse(e.data));
  await new Promise((r) => (ws.onopen = r));
  ws.send(JSON.stringify({ type: "edit_message", message_id: m1, content: "k1!" }));
  ws.send(JSON.stringify({ type: "chat_message", message: "k2" }));
  await until(() => got.some((m) => m.content === "k2"), 5000, "k2");
  const m2 = got.find((m) => m.content === "k2").id;
  ws.send(JSON.stringify({ type: "delete_message", message_id: m2 }));
  await until(() => got.some((m) => m.type === "message.deleted"), 5000, "delete");
  ws.close();

  await until(() => log.events.length === 4, 15000, "replay after kill -9");
  assert.deepEqual(log.events, [
    ["message", m1],
    ["edited", m1],
    ["message", m2],
    ["deleted", m2],
  ]);
  await sleep(300);
  assert.equal(log.events.length, 4, "nothing replayed twice");
  chat.close();
});

test("a replay over --max-replay-events is truncated: the app is told and pages history for the gap", async () => {
  const s = await server(["--max-replay-events", "3"]);
  const [alice, bob] = [user("alice"), user("bob")];
  const conv = await conversation(s, alice, [bob]);
  const chat = connect(`${s.ws}/ws/chat/${conv}/`, () => token(alice), { initialDelay: 1500, maxDelay: 3000 });
  const log = record(chat);
  await until(() => chat.state === "open", 5000, "open");
  const [first] = await say(s, conv, bob, ["t0"]);
  await until(() => log.messages.length === 1, 5000, "t0");

  await s.kill9();
  await s.startAgain();
  const missed = await say(s, conv, bob, ["t1", "t2", "t3", "t4", "t5", "t6", "t7"]);
  await until(() => log.messages.length === 4, 15000, "truncated replay");
  assert.equal(log.truncated.length, 1);
  const { after, lastSeen } = log.truncated[0];
  assert.equal(lastSeen, first);
  assert.equal(after, missed[3], "the replay is the newest 3");
  assert.deepEqual(log.messages.slice(1).map((m) => m.content), ["t5", "t6", "t7"]);

  // What the app does with it: history from `after` back to what it had.
  const api = new Parley(s.http, () => token(alice));
  const gap = [];
  for (let before = after + 1; ; ) {
    const page = await api.messages(conv, { before, limit: 2 });
    const fresh = page.results.filter((m) => m.id > lastSeen);
    gap.push(...fresh);
    if (fresh.length < page.results.length || page.next === null) break;
    before = page.next;
  }
  assert.deepEqual(gap.map((m) => m.content).reverse(), ["t1", "t2", "t3", "t4"]);
  chat.close();
});

test("notifications socket: live, resumed with ?after= after a restart", async () => {
  const s = await server();
  const bob = user("bob");
  const svc = new Parley(s.http, () => token("svc", { role: "service" }));
  const notes = connect(`${s.ws}/ws/notifications/`, () => token(bob), { initialDelay: 1500, maxDelay: 3000 });
  const got = [];
  notes.on("notification", (n) => got.push(n.message));
  await until(() => notes.state === "open", 5000, "open");
  await svc.notify(bob, "n1");
  await until(() => got.length === 1, 5000, "n1");
  await s.terminate();
  await s.startAgain();
  await svc.notify(bob, "n2");
  await svc.notify(bob, "n3");
  await until(() => got.length === 3, 15000, "resumed notifications");
  assert.deepEqual(got, ["n1", "n2", "n3"]);
  notes.close();
});
