//! Starts the server under test and talks to it over real sockets.
//!
//! By default every test spawns its own `parley` binary on port 0 with a
//! fresh data directory. With `PARLEY_TEST_EXTERNAL=127.0.0.1:PORT` nothing is
//! spawned: every test uses that server (JWT secret from `PARLEY_TEST_SECRET`),
//! and the tests that need to restart, kill or configure the server are
//! compiled as ignored (`build.rs` sets `cfg(parley_external)`; each such
//! test carries `#[cfg_attr(parley_external, ignore = "…")]`), so the report
//! counts them as ignored, never as passed (see [`Server::own`]). `PARLEY_TEST_BIN=/path` spawns another
//! executable with parley's command line instead of the built `parley`.
//!
//! Two WebSocket clients live here: [`Ws`] (tokio-tungstenite) for ordinary
//! traffic, and [`RawWs`], a small hand-written client over a `TcpStream`, for
//! exact bytes: handshake answers, frame sizes, fragments, invalid UTF-8 and
//! close codes.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The secret the spawned server is started with.
pub const SECRET: &str = "parley-test-secret";
/// How long a test waits for a frame or an answer that must come.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a test listens to conclude that nothing is coming.
pub const SILENCE_MS: u64 = 250;
/// The default limits of PROTOCOL.md.
pub const MAX_CHARS: usize = 4000;
pub const MAX_FRAME: usize = 64 * 1024;

/// A client socket of the ordinary kind.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A unique username for one test, so tests can share an external server.
pub fn user(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::random::<u32>())
}

pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A parley of the test's own, which a restart, a kill or an extra flag
/// needs. Such a test carries
/// `#[cfg_attr(parley_external, ignore = "needs its own parley: …")]`.
#[macro_export]
macro_rules! own_server {
    ($($arg:expr),* $(,)?) => {
        $crate::harness::Server::own(&[$($arg),*])
    };
}

// ------------------------------------------------------------------ server --

/// The server under test: a spawned `parley`, or an external one.
pub struct Server {
    /// `host:port` the server listens on.
    pub addr: String,
    secret: String,
    child: Option<Child>,
    data_dir: Option<tempfile::TempDir>,
    args: Vec<String>,
    http: reqwest::Client,
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("build reqwest client")
}

fn external() -> Option<String> {
    std::env::var("PARLEY_TEST_EXTERNAL")
        .ok()
        .filter(|s| !s.is_empty())
}

impl Server {
    /// The server for a test that needs nothing special.
    pub fn start() -> Server {
        match external() {
            Some(addr) => Server {
                addr,
                secret: std::env::var("PARLEY_TEST_SECRET").unwrap_or_else(|_| SECRET.into()),
                child: None,
                data_dir: None,
                args: vec![],
                http: http_client(),
            },
            None => Self::spawn_fresh(&[]),
        }
    }

    /// A spawned server of the test's own, started with `extra` flags.
    /// Against an external server such tests are compiled as ignored; one
    /// run anyway (`--include-ignored`) fails here rather than pass unrun.
    pub fn own(extra: &[&str]) -> Server {
        assert!(
            external().is_none(),
            "this test needs its own parley and cannot run with PARLEY_TEST_EXTERNAL set"
        );
        Self::spawn_fresh(extra)
    }

    fn spawn_fresh(extra: &[&str]) -> Server {
        let data_dir = tempfile::tempdir().expect("create data dir");
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, addr) = spawn_parley(data_dir.path().to_path_buf(), &args);
        Server {
            addr,
            secret: SECRET.into(),
            child: Some(child),
            data_dir: Some(data_dir),
            args,
            http: http_client(),
        }
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("no spawned server to terminate");
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait for parley") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("parley did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The spawned server's process id.
    #[allow(dead_code)] // used by the cluster suite only
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("no spawned server").id()
    }

    /// SIGKILLs the server: nothing gets a chance to flush.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("no spawned server to kill");
        child.kill().expect("SIGKILL parley");
        child.wait().expect("reap parley");
    }

    /// Starts the server again on the same data directory with the same flags.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is still running");
        let dir = self.data_dir.as_ref().expect("no data dir").path().to_path_buf();
        let (child, addr) = spawn_parley(dir, &self.args);
        self.child = Some(child);
        self.addr = addr;
    }

    /// Starts the (stopped) server again on the same data directory with
    /// other flags.
    #[allow(dead_code)] // used by the faults suite only
    pub fn start_again_with(&mut self, args: &[&str]) {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self.start_again();
    }

    /// SIGTERM, wait, and start again on the same data directory.
    pub fn restart(&mut self) {
        let status = self.terminate();
        assert!(status.success(), "parley exited with {status} on SIGTERM");
        self.start_again();
    }

    // -------------------------------------------------------------- tokens --

    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// A valid HS256 user token for `sub`, expiring in an hour.
    pub fn token(&self, sub: &str) -> String {
        self.sign(&json!({"sub": sub, "exp": now_secs() + 3600}))
    }

    /// A valid HS256 service token.
    pub fn service_token(&self) -> String {
        self.service_token_for(&user("svc"))
    }

    pub fn service_token_for(&self, sub: &str) -> String {
        self.sign(&json!({"sub": sub, "role": "service", "exp": now_secs() + 3600}))
    }

    /// Any claims, HS256 with the server's secret.
    pub fn sign(&self, claims: &Value) -> String {
        sign_with(Algorithm::HS256, self.secret.as_bytes(), claims)
    }

    // ---------------------------------------------------------------- REST --

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Any request; `body` is sent as is. Answers (status, JSON body or Null).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method.clone(), self.url(path));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("read body");
        (status, parse_body(method.as_ref(), path, status, &bytes))
    }

    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.request("GET", path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.request("POST", path, Some(token), Some(body.to_string().into_bytes()))
            .await
    }

    /// A GET with these extra headers and no token; answers the status.
    pub async fn request_with_headers(&self, path: &str, headers: &[(&str, &str)]) -> u16 {
        let mut req = self.http.get(self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("GET").status().as_u16()
    }

    /// A GET with this `Authorization` header value; answers the status.
    pub async fn request_with_header(&self, path: &str, authorization: &str) -> u16 {
        self.request_with_headers(path, &[("Authorization", authorization)])
            .await
    }

    /// POSTs a JSON-looking body of `size` bytes to `path`, writing it while
    /// reading the answer, so a server that answers before reading it all
    /// is heard. Answers (status, JSON body or Null).
    pub async fn post_huge(&self, path: &str, token: &str, size: usize) -> (u16, Value) {
        let stream = TcpStream::connect(&self.addr).await.expect("connect");
        let (mut rd, mut wr) = stream.into_split();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        let writer = tokio::spawn(async move {
            if wr.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            // {"participants":["xxxx...
            let mut body = br#"{"participants":[""#.to_vec();
            body.resize(size, b'x');
            for chunk in body.chunks(64 * 1024) {
                if wr.write_all(chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = vec![];
        let read = async {
            let mut chunk = [0u8; 8192];
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok());
                    if let Some(len) = len {
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                match rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("no answer to a huge body");
        writer.abort();
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
            panic!(
                "no HTTP answer to a huge body: {:?}",
                String::from_utf8_lossy(&buf)
            )
        });
        let (status, body) = split_response(&buf, end);
        (status, parse_body("POST", path, status, &body))
    }

    /// A POST without a body at all.
    pub async fn post_empty(&self, path: &str, token: &str) -> (u16, Value) {
        self.request("POST", path, Some(token), None).await
    }

    /// A GET answering text (for `/metrics`).
    pub async fn get_text(&self, path: &str) -> (u16, String, String) {
        let resp = self.http.get(self.url(path)).send().await.expect("GET");
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or("").to_string())
            .unwrap_or_default();
        (status, ct, resp.text().await.unwrap())
    }

    /// Creates a conversation of `owner` with `others`; answers its id.
    pub async fn create_conversation(&self, owner: &str, others: &[&str]) -> u64 {
        let (status, body) = self
            .post(
                "/api/conversations/",
                &self.token(owner),
                json!({ "participants": others }),
            )
            .await;
        assert_eq!(status, 201, "create conversation: {body}");
        body["id"].as_u64().expect("conversation id")
    }

    /// The whole history of a conversation, newest first, walked by pages.
    pub async fn history(&self, conv: u64, user: &str) -> Vec<Value> {
        let token = self.token(user);
        let mut out = vec![];
        let mut before: Option<u64> = None;
        loop {
            let path = match before {
                Some(b) => format!("/api/conversations/{conv}/messages/?limit=100&before={b}"),
                None => format!("/api/conversations/{conv}/messages/?limit=100"),
            };
            let (status, body) = self.get(&path, &token).await;
            assert_eq!(status, 200, "history: {body}");
            out.extend(body["results"].as_array().expect("results").iter().cloned());
            match body["next"].as_u64() {
                Some(n) => before = Some(n),
                None => return out,
            }
        }
    }

    /// Service POST of a notification for `to`; answers the 201 body.
    pub async fn notify(&self, to: &str, text: &str) -> Value {
        let (status, body) = self
            .post(
                "/api/notifications/",
                &self.service_token(),
                json!({"user": to, "message": text}),
            )
            .await;
        assert_eq!(status, 201, "post notification: {body}");
        body
    }

    // ----------------------------------------------------------- sockets --

    /// Opens `path` with `Authorization: Bearer <token>`.
    pub async fn ws(&self, path: &str, token: &str) -> Ws {
        let mut req = format!("ws://{}{}", self.addr, path)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            "Authorization",
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        let (ws, resp) = tokio::time::timeout(RECV_TIMEOUT, tokio_tungstenite::connect_async(req))
            .await
            .unwrap_or_else(|_| panic!("upgrade of {path} timed out"))
            .unwrap_or_else(|e| panic!("upgrade of {path} failed: {e:?}"));
        assert_eq!(resp.status().as_u16(), 101);
        ws
    }

    pub async fn ws_chat(&self, conv: u64, user: &str) -> Ws {
        self.ws(&format!("/ws/chat/{conv}/"), &self.token(user)).await
    }

    pub async fn ws_notifications(&self, user: &str) -> Ws {
        self.ws("/ws/notifications/", &self.token(user)).await
    }

    /// A raw upgrade of `path` with extra header lines; the answer is either
    /// a socket (101) or the server's HTTP answer.
    pub async fn raw_ws(&self, path: &str, headers: &[(&str, &str)]) -> Result<RawWs, HttpAnswer> {
        RawWs::connect(&self.addr, path, headers).await
    }

    /// A raw chat socket authenticated by the header.
    pub async fn raw_chat(&self, conv: u64, user: &str) -> RawWs {
        let auth = format!("Bearer {}", self.token(user));
        self.raw_ws(&format!("/ws/chat/{conv}/"), &[("Authorization", &auth)])
            .await
            .unwrap_or_else(|a| panic!("upgrade refused: {a:?}"))
    }

    pub async fn raw_notifications(&self, user: &str) -> RawWs {
        let auth = format!("Bearer {}", self.token(user));
        self.raw_ws("/ws/notifications/", &[("Authorization", &auth)])
            .await
            .unwrap_or_else(|a| panic!("upgrade refused: {a:?}"))
    }

    /// The status of a refused (or accepted: 101) upgrade.
    pub async fn upgrade_status(&self, path: &str, headers: &[(&str, &str)]) -> u16 {
        match self.raw_ws(path, headers).await {
            Ok(_) => 101,
            Err(answer) => answer.status,
        }
    }

    pub async fn upgrade_status_with_token(&self, path: &str, token: &str) -> u16 {
        let auth = format!("Bearer {token}");
        self.upgrade_status(path, &[("Authorization", &auth)]).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The address a spawned parley announces on stdout (`listening on
/// http://ADDR`), or `None` if it does not within 15 s. Keeps draining its
/// stdout afterwards so the server never blocks on a full pipe.
pub fn announced_addr(child: &mut Child) -> Option<String> {
    let stdout = child.stdout.take().expect("parley's stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("listening on http://") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr.to_string());
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(15)).ok()
}

fn spawn_parley(data_dir: PathBuf, extra: &[String]) -> (Child, String) {
    // PARLEY_TEST_BIN runs another binary with parley's CLI (to try the harness).
    let bin = std::env::var_os("PARLEY_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_parley")));
    let mut cmd = Command::new(bin);
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--jwt-secret")
        .arg(SECRET)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("PARLEY_TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().expect("spawn parley");
    match announced_addr(&mut child) {
        Some(addr) => (child, addr),
        None => {
            let _ = child.kill();
            let status = child.wait();
            panic!(
                "parley {extra:?} did not print `listening on http://<addr>` (exit: {status:?}); \
                 set PARLEY_TEST_LOG=1 to see its stderr"
            );
        }
    }
}

/// A raw HTTP/1.1 answer whose head ends at `end` (the `\r\n\r\n`):
/// its status and its body, de-chunked when it was sent chunked.
pub fn split_response(buf: &[u8], end: usize) -> (u16, Vec<u8>) {
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let body = &buf[end + 4..];
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_vec()
    };
    (status, body)
}

pub fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    while let Some(i) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..i])
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap_or(0);
        data = &data[i + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

fn parse_body(method: &str, path: &str, status: u16, bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!(
            "{method} {path} answered {status} with a body that is not JSON ({e}): {:?}",
            String::from_utf8_lossy(bytes)
        )
    })
}

// ------------------------------------------------------------------ tokens --

pub fn sign_with(alg: Algorithm, key: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(key)).expect("sign token")
}

/// A token with `"alg": "none"` and an empty signature.
pub fn unsigned_token(claims: &Value) -> String {
    format!(
        "{}.{}.",
        base64url(json!({"alg": "none", "typ": "JWT"}).to_string().as_bytes()),
        base64url(claims.to_string().as_bytes())
    )
}

pub fn base64url(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

// ----------------------------------------------------- tungstenite sockets --

pub async fn send_json(ws: &mut Ws, value: &Value) {
    send_text(ws, &value.to_string()).await;
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send text frame");
}

pub async fn send_binary(ws: &mut Ws, data: &[u8]) {
    ws.send(Message::binary(data.to_vec()))
        .await
        .expect("send binary frame");
}

/// The next text frame as JSON; panics after [`RECV_TIMEOUT`], on a close or
/// on anything that is not a JSON text frame.
pub async fn recv_json(ws: &mut Ws) -> Value {
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no frame within {RECV_TIMEOUT:?}"));
        match next {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .unwrap_or_else(|e| panic!("text frame is not JSON ({e}): {t:?}"))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(frame))) => {
                panic!("socket closed ({frame:?}) while waiting for a frame")
            }
            Some(Ok(other)) => panic!("expected a JSON text frame, got {other:?}"),
            Some(Err(e)) => panic!("socket error while waiting for a frame: {e}"),
            None => panic!("socket ended while waiting for a frame"),
        }
    }
}

/// Receives `n` frames.
pub async fn recv_n(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(recv_json(ws).await);
    }
    out
}

/// Asserts that nothing arrives for `ms` milliseconds.
pub async fn expect_silence(ws: &mut Ws, ms: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("expected silence, got {other:?}"),
        }
    }
}

/// Waits for the close frame; answers its code (None: no code in it).
/// Panics when the connection ends without a close frame.
pub async fn expect_close(ws: &mut Ws) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + RECV_TIMEOUT;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no close frame within {RECV_TIMEOUT:?}"));
        match next {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("connection ended without a close frame: {e}"),
            None => panic!("connection ended without a close frame"),
        }
    }
}

/// Sends a chat message and answers the next frame, which must be its echo.
pub async fn say(ws: &mut Ws, text: &str) -> Value {
    send_json(ws, &json!({"type": "chat_message", "message": text})).await;
    let echo = recv_json(ws).await;
    assert_eq!(echo["content"], text, "expected the echo of {text:?}, got {echo}");
    echo
}

/// The id of a message event.
pub fn id_of(event: &Value) -> u64 {
    event["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no positive integer id in {event}"))
}

// --------------------------------------------------------------- checks --

/// Asserts that `value` is an object with exactly these keys.
pub fn assert_keys(value: &Value, keys: &[&str]) {
    let obj = value
        .as_object()
        .unwrap_or_else(|| panic!("expected an object, got {value}"));
    let mut got: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
    got.sort_unstable();
    let mut want = keys.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "keys of {value}");
}

/// Asserts RFC 3339, UTC, `Z` suffix, optional fractional seconds.
pub fn assert_timestamp(value: &Value) {
    let s = value
        .as_str()
        .unwrap_or_else(|| panic!("timestamp is not a string: {value}"));
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.len() >= r.end && b[r].iter().all(u8::is_ascii_digit);
    let ok = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[b.len() - 1] == b'Z'
        && match b[19] {
            b'Z' => b.len() == 20,
            b'.' => b.len() > 21 && digits(20..b.len() - 1),
            _ => false,
        };
    assert!(ok, "not an RFC 3339 UTC timestamp with a Z suffix: {s:?}");
}

/// Asserts the Part A shape of a new-message event.
pub fn assert_message_shape(event: &Value) {
    assert_keys(event, &["id", "sender", "content", "timestamp"]);
    assert!(event["id"].as_u64().is_some_and(|id| id > 0), "id: {event}");
    assert!(event["sender"].is_string(), "sender: {event}");
    assert!(event["content"].is_string(), "content: {event}");
    assert_timestamp(&event["timestamp"]);
}

/// Asserts a socket error frame with this code.
pub fn assert_error(frame: &Value, code: &str) {
    assert_keys(frame, &["type", "code", "detail"]);
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["code"], code, "{frame}");
    assert!(frame["detail"].is_string(), "detail: {frame}");
}

/// Asserts a REST error answer.
pub fn assert_rest_error(answer: &(u16, Value), status: u16, code: &str) {
    let (got, body) = answer;
    assert_eq!(*got, status, "status, body {body}");
    assert_keys(body, &["error", "detail"]);
    assert_eq!(body["error"], code, "{body}");
    assert!(body["detail"].is_string(), "{body}");
}

/// Asserts the Part A shape of a notification (the inner object).
pub fn assert_notification_shape(n: &Value) {
    assert_keys(n, &["id", "message", "is_read", "timestamp"]);
    assert!(n["id"].as_u64().is_some_and(|id| id > 0), "id: {n}");
    assert!(n["message"].is_string(), "message: {n}");
    assert!(n["is_read"].is_boolean(), "is_read: {n}");
    assert_timestamp(&n["timestamp"]);
}

// ----------------------------------------------------------------- raw WS --

/// A refused upgrade (or any HTTP answer read off a raw socket).
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// One frame read off a raw socket.
#[derive(Debug)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A hand-written WebSocket client: every byte is the test's choice.
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The 101 answer's headers.
    pub handshake: HttpAnswer,
}

impl RawWs {
    pub async fn connect(addr: &str, path: &str, headers: &[(&str, &str)]) -> Result<RawWs, HttpAnswer> {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.expect("send upgrade");
        let mut raw = RawWs {
            stream,
            buf: vec![],
            handshake: HttpAnswer {
                status: 0,
                headers: vec![],
                body: vec![],
            },
        };
        let mut answer = tokio::time::timeout(RECV_TIMEOUT, raw.read_http_head())
            .await
            .unwrap_or_else(|_| panic!("no answer to the upgrade of {path}"));
        if answer.status == 101 {
            raw.handshake = answer;
            return Ok(raw);
        }
        answer.body = tokio::time::timeout(RECV_TIMEOUT, raw.read_http_body(&answer))
            .await
            .unwrap_or_else(|_| panic!("body of the {} answer to {path} did not end", answer.status));
        Err(answer)
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn read_http_head(&mut self) -> HttpAnswer {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            assert!(self.fill().await, "connection closed before an HTTP answer");
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        HttpAnswer {
            status,
            headers,
            body: vec![],
        }
    }

    async fn read_http_body(&mut self, head: &HttpAnswer) -> Vec<u8> {
        if let Some(len) = head.header("content-length") {
            let len: usize = len.parse().expect("content-length");
            while self.buf.len() < len {
                if !self.fill().await {
                    break;
                }
            }
            let n = len.min(self.buf.len());
            return self.buf.drain(..n).collect();
        }
        if head
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            let mut body = vec![];
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    if !self.fill().await {
                        return body;
                    }
                };
                let size_line = String::from_utf8_lossy(&self.buf[..line_end]).to_string();
                let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                    .expect("chunk size");
                self.buf.drain(..line_end + 2);
                if size == 0 {
                    return body;
                }
                while self.buf.len() < size + 2 {
                    if !self.fill().await {
                        return body;
                    }
                }
                body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
            }
        }
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    /// Sends one masked frame; a write error (the server closed first) is ignored.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let _ = self.stream.write_all(&masked_frame(fin, opcode, payload)).await;
    }

    /// Sends bytes as they are (frames the test built itself).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, OP_TEXT, text.as_bytes()).await;
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string()).await;
    }

    /// The next frame, or None when the connection ended.
    pub async fn read_frame(&mut self) -> Option<RawFrame> {
        tokio::time::timeout(RECV_TIMEOUT, self.read_frame_inner())
            .await
            .unwrap_or_else(|_| panic!("no frame within {RECV_TIMEOUT:?}"))
    }

    async fn need(&mut self, n: usize) -> bool {
        while self.buf.len() < n {
            if !self.fill().await {
                return false;
            }
        }
        true
    }

    async fn read_frame_inner(&mut self) -> Option<RawFrame> {
        if !self.need(2).await {
            return None;
        }
        let fin = self.buf[0] & 0x80 != 0;
        let opcode = self.buf[0] & 0x0F;
        let masked = self.buf[1] & 0x80 != 0;
        let (len, mut at) = match self.buf[1] & 0x7F {
            126 => {
                if !self.need(4).await {
                    return None;
                }
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                if !self.need(10).await {
                    return None;
                }
                (
                    u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                    10,
                )
            }
            n => (n as usize, 2),
        };
        let mask = if masked {
            if !self.need(at + 4).await {
                return None;
            }
            let m = [self.buf[at], self.buf[at + 1], self.buf[at + 2], self.buf[at + 3]];
            at += 4;
            Some(m)
        } else {
            None
        };
        if !self.need(at + len).await {
            return None;
        }
        let mut payload: Vec<u8> = self.buf[at..at + len].to_vec();
        self.buf.drain(..at + len);
        if let Some(m) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= m[i % 4];
            }
        }
        Some(RawFrame { fin, opcode, payload })
    }

    /// The next data message as JSON (pings and pongs skipped).
    pub async fn recv_json(&mut self) -> Value {
        loop {
            let frame = self
                .read_frame()
                .await
                .expect("connection ended while waiting for a frame");
            match frame.opcode {
                OP_PING | OP_PONG => continue,
                OP_TEXT => {
                    assert!(frame.fin, "fragmented answers are not expected");
                    return serde_json::from_slice(&frame.payload).unwrap_or_else(|e| {
                        panic!(
                            "frame is not JSON ({e}): {:?}",
                            String::from_utf8_lossy(&frame.payload)
                        )
                    });
                }
                OP_CLOSE => panic!(
                    "socket closed ({:?}) while waiting for a frame",
                    close_code(&frame.payload)
                ),
                op => panic!("unexpected frame opcode {op}"),
            }
        }
    }

    /// Waits for a close frame and answers its code; panics when the
    /// connection ends without one.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.read_frame().await {
                None => panic!("the connection ended without a close frame"),
                Some(f) if f.opcode == OP_CLOSE => return close_code(&f.payload),
                Some(_) => continue,
            }
        }
    }
}

fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

// --------------------------------------------------------- chat fixtures --

/// Alice (two sockets) and Bob (one socket) in one conversation, for rules
/// about bad input: what the sender gets, and that nobody else gets anything.
pub struct Room {
    pub server: Server,
    pub conv: u64,
    pub alice: String,
    pub bob: String,
    /// Alice's socket that sends the bad frames.
    pub a1: Ws,
    /// Alice's second socket.
    pub a2: Ws,
    pub b: Ws,
}

impl Room {
    pub async fn open() -> Room {
        Self::open_on(Server::start()).await
    }

    pub async fn open_on(server: Server) -> Room {
        let alice = user("alice");
        let bob = user("bob");
        let conv = server.create_conversation(&alice, &[&bob]).await;
        let a1 = server.ws_chat(conv, &alice).await;
        let a2 = server.ws_chat(conv, &alice).await;
        let b = server.ws_chat(conv, &bob).await;
        Room {
            server,
            conv,
            alice,
            bob,
            a1,
            a2,
            b,
        }
    }

    /// Alice says `text` on a1; every socket gets it; answers the event.
    pub async fn alice_says(&mut self, text: &str) -> Value {
        let echo = say(&mut self.a1, text).await;
        assert_eq!(recv_json(&mut self.a2).await, echo);
        assert_eq!(recv_json(&mut self.b).await, echo);
        echo
    }

    pub async fn bob_says(&mut self, text: &str) -> Value {
        let echo = say(&mut self.b, text).await;
        assert_eq!(recv_json(&mut self.a1).await, echo);
        assert_eq!(recv_json(&mut self.a2).await, echo);
        echo
    }

    /// Sends an event frame on a1 and answers what all three sockets got.
    pub async fn alice_does(&mut self, frame: Value) -> Value {
        send_json(&mut self.a1, &frame).await;
        let event = recv_json(&mut self.a1).await;
        assert_eq!(recv_json(&mut self.a2).await, event);
        assert_eq!(recv_json(&mut self.b).await, event);
        event
    }

    pub async fn history(&self) -> Vec<Value> {
        self.server.history(self.conv, &self.alice).await
    }

    /// The rule about bad input, whole: each frame sent on a1 is answered on
    /// a1 with its error code; the socket stays open; no other socket gets
    /// anything; stored history does not change.
    pub async fn expect_errors(&mut self, cases: &[(Frame, &str)]) {
        let before = self.history().await;
        for (frame, code) in cases {
            match frame {
                Frame::Text(t) => send_text(&mut self.a1, t).await,
                Frame::Binary(b) => send_binary(&mut self.a1, b).await,
            }
            let answer = recv_json(&mut self.a1).await;
            assert_eq!(answer["code"], *code, "frame {frame:?} answered {answer}");
            assert_error(&answer, code);
        }
        assert_eq!(self.history().await, before, "bad input changed the history");
        // Still open, and the first thing the others see is this message:
        // no error frame reached them.
        let probe = format!("p{}", rand::random::<u16>() % 1000);
        self.alice_says(&probe).await;
    }

    pub async fn expect_error(&mut self, frame: Value, code: &str) {
        self.expect_errors(&[(Frame::Text(frame.to_string()), code)])
            .await;
    }
}

/// A frame a test sends as is.
#[derive(Debug, Clone)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

pub fn text(s: &str) -> Frame {
    Frame::Text(s.to_string())
}

pub fn json_frame(v: Value) -> Frame {
    Frame::Text(v.to_string())
}

/// One masked client frame, header and all.
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(if fin { 0x80 } else { 0 } | opcode);
    let len = payload.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask: [u8; 4] = rand::random();
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}
