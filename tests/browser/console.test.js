// The console (and so clients/js) in Chromium against the real parley
// binary: two browser contexts chat, delete, reload and resume, raise and
// clear the notification badge, and chart /metrics; CORS from a listed and
// an unlisted origin. Run: `npm ci && node --test console.test.js` here
// (needs /usr/bin/chromium, or CHROMIUM=path; PARLEY_BIN, default
// target/debug/parley). SCREENSHOTS=dir writes console.png and figures.png there.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const BIN = process.env.PARLEY_BIN || join(here, "..", "..", "target", "debug", "parley");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = process.env.SCREENSHOTS;

let parley, dataDir, browser, base;
let allowedOrigin, refusedOrigin;
const origins = [];

/** A page on another origin (a second HTTP server) that calls parley's REST API. */
function originServer() {
  const srv = createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html" });
    res.end("<!doctype html><title>other origin</title><p>another app</p>");
  });
  origins.push(srv);
  return new Promise((r) => srv.listen(0, "127.0.0.1", () => r(`http://127.0.0.1:${srv.address().port}`)));
}

function startParley(args) {
  const child = spawn(BIN, args, { stdio: ["ignore", "pipe", process.env.PARLEY_TEST_LOG ? "inherit" : "ignore"] });
  return new Promise((resolve, reject) => {
    let buf = "";
    const t = setTimeout(() => reject(new Error("parley did not start")), 15000);
    child.stdout.on("data", (d) => {
      buf += d;
      const m = buf.match(/listening on (http:\/\/\S+)/);
      if (m) {
        clearTimeout(t);
        resolve({ child, url: m[1] });
      }
    });
    child.on("exit", (c) => reject(new Error(`parley exited ${c}`)));
  });
}

before(async () => {
  assert.ok(existsSync(BIN), `no parley binary at ${BIN}: cargo build first`);
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: apt-get install chromium`);
  allowedOrigin = await originServer();
  refusedOrigin = await originServer();
  dataDir = mkdtempSync(join(tmpdir(), "parley-browser-"));
  // Zero configuration (no secret: parley generates one in its data dir, on
  // loopback), so the console may sign tokens.
  ({ child: parley, url: base } = await startParley([
    "--listen", "127.0.0.1:0", "--data-dir", dataDir, "--cors-origins", allowedOrigin,
  ]));
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    // A fresh --user-data-dir: playwright makes a temporary profile for
    // launch() itself (and refuses the flag).
  });
});

after(async () => {
  await browser?.close();
  parley?.kill("SIGKILL");
  for (const s of origins) s.close();
  for (const d of [dataDir]) if (d) rmSync(d, { recursive: true, force: true });
});

async function signedIn(name) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 760 } });
  const page = await ctx.newPage();
  page.on("pageerror", (e) => console.error(`[${name}] page error:`, e.message));
  await page.goto(base + "/");
  await page.fill("#mint-user", name);
  await page.click("#mint-form button");
  await page.waitForSelector("#whoami:not([hidden])");
  return page;
}

const texts = (page) => page.$$eval("#messages li .text", (els) => els.map((e) => e.textContent));
const send = async (page, text) => {
  await page.fill("#send-text", text);
  await page.click("#send-form button");
};
const openRoom = async (page, title) => {
  await page.click(`#conversations li:has-text("${title}")`);
  await page.waitForSelector('#room[data-socket="open"]');
};

let alice, bob;

test("two browsers chat through the console; a delete reaches the other", async () => {
  alice = await signedIn("alice");
  await alice.fill("#create-participants", "bob");
  await alice.fill("#create-title", "standup");
  await alice.click("#create-form button");
  await alice.waitForSelector('#room[data-socket="open"]');
  bob = await signedIn("bob");
  await openRoom(bob, "standup");

  await send(alice, "hello bob");
  await bob.waitForSelector('#messages li:has-text("hello bob")');
  await send(bob, "hi alice");
  await alice.waitForSelector('#messages li:has-text("hi alice")');
  assert.deepEqual(await texts(bob), ["hello bob", "hi alice"]);

  // Only one's own messages have edit/delete.
  assert.equal(await alice.locator('#messages li:has-text("hi alice") .delete').count(), 0);
  await alice.click('#messages li:has-text("hello bob") .delete');
  await bob.waitForSelector('#messages li:has-text("hello bob")', { state: "detached" });
  assert.deepEqual(await texts(bob), ["hi alice"]);
});

test("a reload keeps the conversation and resumes with ?after= without a gap", async () => {
  const sockets = [];
  bob.on("websocket", (ws) => sockets.push(ws.url()));
  const reloading = bob.reload({ waitUntil: "commit" });
  // Sent while bob's page is away.
  for (const t of ["away 1", "away 2", "away 3"]) await send(alice, t);
  await reloading;
  await bob.waitForSelector('#room[data-socket="open"]');
  await send(alice, "live again");
  await bob.waitForSelector('#messages li:has-text("live again")');
  assert.deepEqual(await texts(bob), ["hi alice", "away 1", "away 2", "away 3", "live again"]);
  const chatUrl = sockets.find((u) => u.includes("/ws/chat/"));
  assert.match(chatUrl, /[?&]after=\d+/, `the chat socket resumes: ${chatUrl}`);
  assert.equal(await bob.textContent("#room-title"), "standup");
});

test("a notification raises the badge; mark read clears it", async () => {
  // A second conversation bob is not looking at: alice's message notifies him.
  await alice.fill("#create-participants", "bob");
  await alice.fill("#create-title", "side");
  await alice.click("#create-form button");
  await alice.waitForSelector('#room-title:has-text("side")');
  await alice.waitForSelector('#room[data-socket="open"]');
  // Messages sent while bob's page was reloading notified him already: read all first.
  await bob.click("#bell");
  await bob.click("#read-all");
  await bob.waitForSelector("#badge", { state: "hidden" });
  await send(alice, "ping from side");
  await bob.waitForSelector("#badge:not([hidden])");
  assert.equal(await bob.textContent("#badge"), "1");
  await bob.click('#notifications li:has-text("alice") .mark-read');
  await bob.waitForSelector("#badge", { state: "hidden" });
  if (SHOTS) await bob.screenshot({ path: join(SHOTS, "console.png") });
});

test("the figures panel charts /metrics", async () => {
  await alice.click("#tab-figures");
  // A few seconds of traffic (half a minute when taking screenshots, so the charts show a shape).
  const rounds = SHOTS ? 60 : 6;
  for (let i = 0; i < rounds; i++) {
    for (let k = 0; k < 1 + (i % 7); k++) await send(bob, `traffic ${i}.${k}`);
    await bob.waitForTimeout(400);
  }
  await alice.waitForTimeout(1500);
  for (const id of ["sockets", "messages", "deliveries", "flush", "slow"]) {
    const points = Number(await alice.getAttribute(`#chart-${id}`, "data-points"));
    assert.ok(points > 0, `chart ${id} has no points`);
    // Something other than the background was drawn in the plot area.
    const inked = await alice.$eval(`#chart-${id}`, (c) => {
      const d = c.getContext("2d").getImageData(50, 5, c.width - 60, c.height - 30).data;
      let n = 0;
      for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
      return n;
    });
    assert.ok(inked > 100, `chart ${id} is blank (${inked} pixels)`);
  }
  if (SHOTS) await alice.screenshot({ path: join(SHOTS, "figures.png") });
  await alice.click("#tab-chat");
});

test("CORS: a listed origin may call the REST API, an unlisted one is refused", async () => {
  const token = (await (await fetch(base + "/api/console/token", { method: "POST", body: '{"username":"carol"}' })).json()).token;
  const ctx = await browser.newContext();
  const page = await ctx.newPage();
  const call = ({ url, tok }) =>
    fetch(url + "/api/conversations/", { headers: { Authorization: `Bearer ${tok}` } })
      .then((r) => r.status)
      .catch((e) => `refused: ${e.name}`);
  await page.goto(allowedOrigin + "/");
  assert.equal(await page.evaluate(call, { url: base, tok: token }).then(String), "200");
  await page.goto(refusedOrigin + "/");
  assert.match(String(await page.evaluate(call, { url: base, tok: token })), /^refused/);
  await ctx.close();
});
