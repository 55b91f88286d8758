// The close-code policy, with a scripted WebSocket in place of a server:
// the codes the real server rarely sends on demand (1012, 1013, 1008).

import { test } from "node:test";
import assert from "node:assert/strict";

import { connect } from "../parley.js";

/** A WebSocket that records what was opened and lets the test drive it. */
function fakeSockets() {
  const opened = [];
  class FakeWebSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      opened.push(this);
      queueMicrotask(() => {
        this.readyState = 1;
        this.onopen?.({});
      });
    }
    send() {}
    close(code = 1000) {
      this.readyState = 3;
      this.onclose?.({ code, reason: "" });
    }
    /** The server sends a frame. */
    deliver(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    /** The server closes. */
    drop(code) {
      this.readyState = 3;
      this.onclose?.({ code, reason: "" });
    }
  }
  return { opened, FakeWebSocket };
}

const until = async (pred) => {
  for (let i = 0; i < 200 && !pred(); i++) await new Promise((r) => setTimeout(r, 5));
  assert.ok(pred(), "condition not reached");
};

for (const code of [1001, 1006, 1012, 1013]) {
  test(`close ${code}: reconnect and resume after the newest id, same token`, async () => {
    const { opened, FakeWebSocket } = fakeSockets();
    const asked = [];
    const chat = connect("ws://h/ws/chat/7/", ({ refresh }) => (asked.push(refresh), "tok"), {
      WebSocket: FakeWebSocket,
      initialDelay: 1,
      fetch: async () => ({ status: 200 }),
    });
    const kinds = [];
    chat.on("message", (m) => kinds.push(m.id));
    await until(() => chat.state === "open");
    assert.deepEqual(opened[0].protocols, ["bearer", "tok"]);
    assert.equal(new URL(opened[0].url).searchParams.get("after"), null);
    opened[0].deliver({ id: 41, sender: "a", content: "x", timestamp: "t" });
    opened[0].deliver({ type: "message.edited", message: { id: 41, content: "y" } });
    opened[0].drop(code);
    await until(() => opened.length === 2 && chat.state === "open");
    assert.equal(new URL(opened[1].url).searchParams.get("after"), "41");
    assert.deepEqual(asked, [false, false]);
    chat.close();
  });
}

test("close 1008: ask getToken for a new token before reconnecting", async () => {
  const { opened, FakeWebSocket } = fakeSockets();
  const asked = [];
  const notes = connect("ws://h/ws/notifications/", ({ refresh }) => (asked.push(refresh), refresh ? "new" : "old"), {
    WebSocket: FakeWebSocket,
    initialDelay: 1,
  });
  await until(() => notes.state === "open");
  opened[0].deliver({ message: { id: 9, message: "n", is_read: false, timestamp: "t" } });
  opened[0].drop(1008);
  await until(() => opened.length === 2);
  assert.deepEqual(asked, [false, true]);
  assert.deepEqual(opened[1].protocols, ["bearer", "new"]);
  assert.equal(new URL(opened[1].url).searchParams.get("after"), "9");
  notes.close();
});

test("backoff grows exponentially with jitter, and is capped", async () => {
  // Every handshake is refused: "error" and "close", never "open".
  class Refused {
    constructor() {
      this.readyState = 0;
      queueMicrotask(() => {
        this.readyState = 3;
        this.onerror?.({});
        this.onclose?.({ code: 1006, reason: "" });
      });
    }
    close() {}
  }
  const delays = [];
  const chat = connect("ws://h/ws/chat/1/", () => "t", {
    WebSocket: Refused,
    initialDelay: 2,
    maxDelay: 16,
    fetch: async () => ({ status: 0 }),
  });
  chat.on("reconnecting", ({ delay }) => delays.push(delay));
  await until(() => delays.length >= 7);
  chat.close();
  const ceilings = [2, 4, 8, 16, 16, 16, 16];
  delays.slice(0, 7).forEach((d, i) => {
    assert.ok(d >= ceilings[i] / 2 && d <= ceilings[i], `delay ${i} = ${d}, ceiling ${ceilings[i]}`);
  });
});
