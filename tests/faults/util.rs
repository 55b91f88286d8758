//! What the faults tests need beyond the contract harness: the server's
//! process (pid, RSS, data dir), raw TCP clients with chosen socket options,
//! and a hand-made WebSocket handshake.

#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::Server;

/// The pid of the process listening on the server's port (found through
/// `/proc/net/tcp*` and the descriptors in `/proc/<pid>/fd`).
pub fn pid_of(server: &Server) -> u32 {
    let port: u16 = server
        .addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port in server address");
    let mut inodes = vec![];
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 {
                continue;
            }
            let local_port = cols[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // 0A: LISTEN
            if local_port == Some(port) && cols[3] == "0A" {
                inodes.push(format!("socket:[{}]", cols[9]));
            }
        }
    }
    assert!(!inodes.is_empty(), "nothing listens on port {port}");
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.to_string_lossy() == *i) {
                    return pid;
                }
            }
        }
    }
    panic!("no process holds the listening socket of port {port}");
}

/// Resident set size of `pid`, in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The command line of `pid`.
pub fn cmdline_of(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("read cmdline")
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The `--data-dir` the server was started with (the last one given).
pub fn data_dir_of(server: &Server) -> String {
    let args = cmdline_of(pid_of(server));
    args.windows(2)
        .filter(|w| w[0] == "--data-dir")
        .map(|w| w[1].clone())
        .next_back()
        .expect("--data-dir on the command line")
}

/// Whether `pid` is still alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A TCP connection with a receive buffer of about `rcvbuf` bytes (set
/// before connecting, so the window the server sees is small from the start).
pub async fn connect_small_rcvbuf(addr: &str, rcvbuf: u32) -> TcpStream {
    let addr: std::net::SocketAddr = addr.parse().expect("socket address");
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
    socket.connect(addr).await.expect("connect")
}

/// Sends a WebSocket upgrade for `path` with a bearer token and reads the
/// answer's head, byte by byte so nothing after it is consumed. Answers the
/// status.
pub async fn handshake(stream: &mut TcpStream, addr: &str, path: &str, token: &str) -> u16 {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.expect("send upgrade");
    let mut head = vec![];
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("no answer to the upgrade")
            .expect("read upgrade answer");
        assert!(n == 1, "connection closed during the handshake");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad answer head {head:?}"))
}

/// How a connection ended, as seen by a reader.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Orderly end of stream (FIN).
    Eof,
    /// Reset or another read error.
    Error(std::io::ErrorKind),
    /// Still open when the deadline passed.
    Open,
}

/// Reads and discards until the connection ends or `within` passes; answers
/// how it ended and every byte read.
pub async fn read_until_end(stream: &mut TcpStream, within: Duration) -> (Ended, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + within;
    let mut all = vec![];
    let mut chunk = vec![0u8; 65536];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return (Ended::Open, all),
            Ok(Ok(0)) => return (Ended::Eof, all),
            Ok(Ok(n)) => all.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return (Ended::Error(e.kind()), all),
        }
    }
}

/// Server frames (unmasked) in `bytes`, in order: (opcode, payload). A
/// trailing partial frame is left out.
pub fn server_frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = vec![];
    let mut at = 0;
    while bytes.len() >= at + 2 {
        let opcode = bytes[at] & 0x0F;
        let (len, hdr) = match bytes[at + 1] & 0x7F {
            126 if bytes.len() >= at + 4 => (u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize, 4),
            127 if bytes.len() >= at + 10 => (
                u64::from_be_bytes(bytes[at + 2..at + 10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if bytes.len() < at + hdr + len {
            break;
        }
        out.push((opcode, bytes[at + hdr..at + hdr + len].to_vec()));
        at += hdr + len;
    }
    out
}

/// The close code in a close frame's payload.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

/// An unmasked frame, as a server would send it (a client must not).
pub fn unmasked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    assert!(payload.len() < 126);
    frame.push(payload.len() as u8);
    frame.extend_from_slice(payload);
    frame
}

/// The value of a counter in `/metrics` text (sum over its label sets).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The kernel's state of the TCP socket bound to `local_port` and connected
/// to `remote_port` on this host (hex state of `/proc/net/tcp*`: "01"
/// established, "04" FIN_WAIT1, ...), or None when no such socket exists.
pub fn tcp_state(local_port: u16, remote_port: u16) -> Option<String> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 4 {
                continue;
            }
            let port = |c: &str| c.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if port(cols[1]) == Some(local_port) && port(cols[2]) == Some(remote_port) {
                return Some(cols[3].to_string());
            }
        }
    }
    None
}

/// The port of `addr` (`host:port`).
pub fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

/// One HTTP/1.1 request written in a single write (head and body), then
/// the whole answer read until the server closes. Answers (status, body).
pub async fn http_once(addr: &str, method: &str, path: &str, token: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    stream.write_all(&req).await.expect("send request");
    let (_, bytes) = read_until_end(&mut stream, Duration::from_secs(10)).await;
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {:?}", String::from_utf8_lossy(&bytes)));
    let head = String::from_utf8_lossy(&bytes[..end]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, bytes[end + 4..].to_vec())
}

/// A parley spawned by the faults tests themselves, for what the harness
/// cannot choose (the data dir). Killed when dropped.
pub struct Spawned {
    pub addr: String,
    pub child: std::process::Child,
    http: reqwest::Client,
}

impl Spawned {
    /// A conversation `creator` starts with `others` (201 or the test
    /// fails); answers its id.
    pub async fn conversation(&self, creator: &str, others: &[&str]) -> u64 {
        let (status, body) = self
            .request(
                "POST",
                "/api/conversations/",
                Some(&self.token(creator)),
                Some(serde_json::json!({ "participants": others })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_u64().expect("a conversation id")
    }

    pub fn start(data_dir: &str, extra: &[&str]) -> Spawned {
        Self::start_with_env(data_dir, extra, &[])
    }

    /// As [`Spawned::start`], with these environment variables set.
    pub fn start_with_env(data_dir: &str, extra: &[&str], env: &[(&str, &str)]) -> Spawned {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_parley"))
            .envs(env.iter().copied())
            .args(["--listen", "127.0.0.1:0", "--data-dir", data_dir])
            .args(["--jwt-secret", crate::harness::SECRET])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(if std::env::var_os("PARLEY_TEST_LOG").is_some() {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::null()
            })
            .spawn()
            .expect("spawn parley");
        let addr = match crate::harness::announced_addr(&mut child) {
            Some(addr) => addr,
            None => {
                let _ = child.kill();
                panic!("parley on {data_dir} did not start: {:?}", child.wait());
            }
        };
        Spawned {
            addr,
            child,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    pub fn token(&self, sub: &str) -> String {
        let claims = serde_json::json!({"sub": sub, "exp": crate::harness::now_secs() + 3600});
        crate::harness::sign_with(
            jsonwebtoken::Algorithm::HS256,
            crate::harness::SECRET.as_bytes(),
            &claims,
        )
    }

    pub fn service_token(&self) -> String {
        let claims =
            serde_json::json!({"sub": "svc", "role": "service", "exp": crate::harness::now_secs() + 3600});
        crate::harness::sign_with(
            jsonwebtoken::Algorithm::HS256,
            crate::harness::SECRET.as_bytes(),
            &claims,
        )
    }

    /// (status, JSON body or Null).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("http://{}{path}", self.addr));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    /// A GET without a token; answers (status, body text).
    pub async fn request_text(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body"))
    }

    pub async fn post(&self, path: &str, token: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.request("POST", path, Some(token), Some(body)).await
    }

    pub async fn ws_chat(&self, conv: u64, who: &str) -> crate::harness::Ws {
        self.ws_path(&format!("/ws/chat/{conv}/"), who)
            .await
            .unwrap_or_else(|e| panic!("upgrade: {e}"))
    }

    /// A socket on `path` (query included) as `who`; Err(the refusal).
    pub async fn ws_path(&self, path: &str, who: &str) -> Result<crate::harness::Ws, String> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}{path}", self.addr).into_client_request().unwrap();
        req.headers_mut().insert(
            "Authorization",
            format!("Bearer {}", self.token(who)).parse().unwrap(),
        );
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(ws),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The whole history, newest first; Err((status, body)) when a page fails.
    pub async fn history(
        &self,
        conv: u64,
        who: &str,
    ) -> Result<Vec<serde_json::Value>, (u16, serde_json::Value)> {
        let token = self.token(who);
        let mut out = vec![];
        let mut path = format!("/api/conversations/{conv}/messages/?limit=100");
        loop {
            let (status, page) = self.request("GET", &path, Some(&token), None).await;
            if status != 200 {
                return Err((status, page));
            }
            out.extend(page["results"].as_array().unwrap().iter().cloned());
            match page["next"].as_u64() {
                Some(n) => path = format!("/api/conversations/{conv}/messages/?limit=100&before={n}"),
                None => return Ok(out),
            }
        }
    }
}

/// The next text frame as JSON, or None after `within` (or on a close).
pub async fn recv_within(ws: &mut crate::harness::Ws, within: Duration) -> Option<serde_json::Value> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(t.as_str()).ok(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            _ => return None,
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tests that load the machine hard (10,000 sockets, kill -9 under load)
/// and tests that measure time run one at a time: the harness runs a
/// binary's tests in parallel, and on two cores a heavy neighbour stretches
/// every timing (a 2 s reset measured at 3.7 s). Each such test holds
/// [`alone`] for its whole run; the light tests still run beside them.
static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held for the whole of a test that loads the machine or measures time.
pub async fn alone() -> tokio::sync::MutexGuard<'static, ()> {
    MACHINE.lock().await
}
