// Starts the real parley binary for a test, as a user starts it: port 0
// (the address is read from "listening on http://ADDR" on stdout) and a
// fresh data dir. PARLEY_BIN names the binary (default: target/debug/parley,
// built by `cargo build`).

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.PARLEY_BIN || join(here, "..", "..", "..", "target", "debug", "parley");
export const SECRET = "client-test-secret";

export class Server {
  constructor(extra = []) {
    if (!existsSync(BIN)) throw new Error(`no parley binary at ${BIN}: run cargo build (or set PARLEY_BIN)`);
    this.extra = extra;
    this.dataDir = mkdtempSync(join(tmpdir(), "parley-js-"));
    this.addr = null;
    this.child = null;
  }

  static async start(extra = []) {
    const s = new Server(extra);
    await s.#spawn("127.0.0.1:0");
    return s;
  }

  get http() {
    return `http://${this.addr}`;
  }
  get ws() {
    return `ws://${this.addr}`;
  }

  #spawn(listen) {
    const args = ["--listen", listen, "--data-dir", this.dataDir, "--jwt-secret", SECRET, ...this.extra];
    const child = spawn(BIN, args, { stdio: ["ignore", "pipe", process.env.PARLEY_TEST_LOG ? "inherit" : "ignore"] });
    this.child = child;
    return new Promise((resolve, reject) => {
      let buf = "";
      const timer = setTimeout(() => reject(new Error("parley did not print its address in 15 s")), 15000);
      child.stdout.on("data", (d) => {
        buf += d;
        const m = buf.match(/listening on http:\/\/(\S+)/);
        if (m && !this.addr) this.addr = m[1];
        if (m) {
          clearTimeout(timer);
          resolve();
        }
      });
      child.on("exit", (code) => {
        clearTimeout(timer);
        reject(new Error(`parley exited with ${code} before listening`));
      });
    });
  }

  #exited() {
    const child = this.child;
    if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
    return new Promise((r) => child.once("exit", r));
  }

  /** SIGTERM: parley closes every socket with 1001 and flushes. */
  async terminate() {
    this.child.kill("SIGTERM");
    await this.#exited();
  }
  /** SIGKILL: no close frame, sockets just drop (1006 for the client). */
  async kill9() {
    this.child.kill("SIGKILL");
    await this.#exited();
  }
  /** Starts again on the same address and data dir. */
  async startAgain() {
    for (let i = 0; ; i++) {
      try {
        await this.#spawn(this.addr);
        return;
      } catch (e) {
        if (i > 20) throw e;
        await sleep(100);
      }
    }
  }
  async stop() {
    if (this.child) {
      this.child.kill("SIGKILL");
      await this.#exited();
    }
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

function b64(x) {
  return Buffer.from(typeof x === "string" ? x : JSON.stringify(x)).toString("base64url");
}

/** An HS256 JWT for `sub`, valid for `ttl` seconds (negative: already expired). */
export function token(sub, { ttl = 3600, role } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const body = b64({ sub, exp: now + ttl, iat: now, ...(role ? { role } : {}) });
  const head = b64({ alg: "HS256", typ: "JWT" });
  const sig = createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Resolves when `pred()` is true (polled), or rejects after `ms`. */
export async function until(pred, ms = 10000, what = "condition") {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

let n = 0;
export function user(prefix) {
  return `${prefix}${process.pid}x${n++}`;
}
