//! Target parsing, tokens, a tiny HTTP/1.1 client for the REST calls and the
//! WebSocket client handshake (hand-written, then fastwebsockets for frames).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use fastwebsockets::{Role, WebSocketRead, WebSocketWrite};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// Where the server is: a loopback IPv4 address and the Host header.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub addr: SocketAddrV4,
    pub host: String,
}

/// Parse `http://HOST:PORT[/]` (or `ws://`). Only loopback targets are
/// accepted: this tool must never send load anywhere else.
pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("ws://"))
        .ok_or_else(|| format!("--url must start with http:// or ws://, got {url}"))?;
    let hostport = rest.split('/').next().unwrap_or("");
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>().map_err(|_| format!("bad port in --url {url}"))?,
        ),
        None => (hostport, 80),
    };
    let ip: Ipv4Addr = if host == "localhost" {
        Ipv4Addr::LOCALHOST
    } else {
        host.parse()
            .map_err(|_| format!("--url host must be an IPv4 loopback address or localhost, got {host}"))?
    };
    if !ip.is_loopback() {
        return Err(format!(
            "refusing non-loopback target {ip}: load goes only to 127.0.0.0/8"
        ));
    }
    Ok(Target {
        addr: SocketAddrV4::new(ip, port),
        host: hostport.to_owned(),
    })
}

/// Parse `--url`: one base URL or several separated by commas (a cluster's
/// nodes), each as in [`parse_url`], so each must be loopback.
pub fn parse_urls(list: &str) -> Result<Vec<Target>, String> {
    let urls: Vec<&str> = list.split(',').map(str::trim).collect();
    if urls.iter().any(|u| u.is_empty()) {
        return Err(format!("--url has an empty entry: {list}"));
    }
    urls.into_iter().map(parse_url).collect()
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
}

/// HS256 JWT with `sub` = user and `exp` = now + 1 h.
pub fn token(secret: &str, user: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = Claims {
        sub: user,
        exp: now + 3600,
        iat: now,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding cannot fail")
}

fn find_header_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn status_code(head: &str) -> Option<u16> {
    head.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// One keep-alive HTTP/1.1 connection for the few REST calls.
pub struct Http {
    target: Target,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Http {
    pub fn new(target: Target) -> Self {
        Http {
            target,
            conn: None,
            buf: Vec::new(),
        }
    }

    /// `method path` with a bearer token and an optional JSON body; returns
    /// (status, body). Retries once on a fresh connection if a kept-alive one
    /// turned out dead.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> io::Result<(u16, Vec<u8>)> {
        let reused = self.conn.is_some();
        match timeout(
            Duration::from_secs(30),
            self.request_once(method, path, token, body),
        )
        .await
        {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) if reused => {
                self.conn = None;
                let _ = e;
                timeout(
                    Duration::from_secs(30),
                    self.request_once(method, path, token, body),
                )
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "REST request timed out"))?
            }
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(io::Error::new(io::ErrorKind::TimedOut, "REST request timed out"))
            }
        }
    }

    async fn request_once(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> io::Result<(u16, Vec<u8>)> {
        if self.conn.is_none() {
            let s = TcpStream::connect(SocketAddr::V4(self.target.addr)).await?;
            s.set_nodelay(true)?;
            self.conn = Some(s);
            self.buf.clear();
        }
        let conn = self.conn.as_mut().expect("connected above");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n",
            self.target.host
        );
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let body = body.unwrap_or("");
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        conn.write_all(req.as_bytes()).await?;

        // Head.
        let head_end = loop {
            if let Some(e) = find_header_end(&self.buf) {
                break e;
            }
            if self.buf.len() > 64 * 1024 {
                return Err(io::Error::other("response head too large"));
            }
            let mut chunk = [0u8; 8192];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before response",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end);
        let status =
            status_code(&head).ok_or_else(|| io::Error::other(format!("bad status line: {head:?}")))?;
        let close = header_value(&head, "connection")
            .map(|v| v.eq_ignore_ascii_case("close"))
            .unwrap_or(false);
        let chunked = header_value(&head, "transfer-encoding")
            .map(|v| v.to_ascii_lowercase().contains("chunked"))
            .unwrap_or(false);
        let body = if chunked {
            let mut out = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break p;
                    }
                    read_more(conn, &mut self.buf).await?;
                };
                let size_str = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| io::Error::other("bad chunk size"))?;
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    read_more(conn, &mut self.buf).await?;
                }
                out.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
                if size == 0 {
                    break;
                }
            }
            out
        } else if let Some(len) = header_value(&head, "content-length") {
            let len: usize = len.parse().map_err(|_| io::Error::other("bad content-length"))?;
            while self.buf.len() < len {
                read_more(conn, &mut self.buf).await?;
            }
            self.buf.drain(..len).collect()
        } else {
            // Body until close.
            loop {
                let mut chunk = [0u8; 8192];
                let n = conn.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
            self.conn = None;
            std::mem::take(&mut self.buf)
        };
        if close {
            self.conn = None;
        }
        Ok((status, body))
    }
}

async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 8192];
    let n = conn.read(&mut chunk).await?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed mid-body",
        ));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// The read half of a socket, with whatever bytes were read past the end of
/// the handshake response served first.
pub struct Prefixed {
    pre: Vec<u8>,
    pos: usize,
    inner: OwnedReadHalf,
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.pre.len() {
            let n = buf.remaining().min(this.pre.len() - this.pos);
            buf.put_slice(&this.pre[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.pre.len() {
                this.pre = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

pub type WsRead = WebSocketRead<Prefixed>;
pub type WsWrite = WebSocketWrite<OwnedWriteHalf>;

fn ws_key(seed: u64) -> String {
    // 16 pseudo-random bytes, base64: the server only echoes a hash of it.
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15 ^ crate::sys::mono_ns();
    let mut bytes = [0u8; 16];
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let mut out = String::with_capacity(24);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// Why a socket could not be opened, as a short class for counting.
#[derive(Debug)]
pub struct OpenError(pub String);

/// Open one authenticated WebSocket from source address `src`.
pub async fn open_ws(
    target: &Target,
    src: Ipv4Addr,
    path: &str,
    jwt: &str,
    seed: u64,
    limit: Duration,
) -> Result<(WsRead, WsWrite), OpenError> {
    let sock = TcpSocket::new_v4().map_err(|e| OpenError(format!("socket: {}", e.kind())))?;
    // Let connect() pick the port so ports are unique per 4-tuple, not per address.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a valid fd with a c_int option value.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    sock.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))
        .map_err(|e| OpenError(format!("bind: {}", e.kind())))?;
    let fut = async {
        let stream = sock
            .connect(SocketAddr::V4(target.addr))
            .await
            .map_err(|e| OpenError(format!("connect: {}", e.kind())))?;
        stream.set_nodelay(true).ok();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {jwt}\r\n\r\n",
            target.host,
            ws_key(seed)
        );
        let (mut rd, mut wr) = stream.into_split();
        wr.write_all(req.as_bytes())
            .await
            .map_err(|e| OpenError(format!("write: {}", e.kind())))?;
        let mut buf = Vec::with_capacity(512);
        let end = loop {
            if let Some(e) = find_header_end(&buf) {
                break e;
            }
            if buf.len() > 16 * 1024 {
                return Err(OpenError("handshake: response head too large".into()));
            }
            let mut chunk = [0u8; 1024];
            let n = rd
                .read(&mut chunk)
                .await
                .map_err(|e| OpenError(format!("handshake read: {}", e.kind())))?;
            if n == 0 {
                return Err(OpenError("handshake: closed by server".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]);
        match status_code(&head) {
            Some(101) => {}
            Some(s) => return Err(OpenError(format!("http {s}"))),
            None => return Err(OpenError("handshake: bad status line".into())),
        }
        let pre = buf[end..].to_vec();
        let reader = Prefixed {
            pre,
            pos: 0,
            inner: rd,
        };
        Ok(fastwebsockets::after_handshake_split(reader, wr, Role::Client))
    };
    match timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(OpenError("timeout".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing_is_loopback_only() {
        let t = parse_url("http://127.0.0.1:8301").unwrap();
        assert_eq!(t.addr.port(), 8301);
        assert_eq!(t.host, "127.0.0.1:8301");
        assert!(parse_url("http://localhost:1/").is_ok());
        assert!(parse_url("http://10.0.0.1:80").is_err());
        assert!(parse_url("http://example.com:80").is_err());
        assert!(parse_url("ftp://127.0.0.1:1").is_err());
    }

    #[test]
    fn url_lists_are_loopback_only_throughout() {
        let ts = parse_urls("http://127.0.0.1:1, http://127.0.0.2:2/").unwrap();
        assert_eq!(ts.len(), 2);
        assert_eq!(ts[1].addr.port(), 2);
        assert_eq!(parse_urls("http://127.0.0.1:8301").unwrap().len(), 1);
        assert!(parse_urls("http://127.0.0.1:1,http://10.0.0.1:2").is_err());
        assert!(parse_urls("http://127.0.0.1:1,").is_err());
        assert!(parse_urls("").is_err());
    }

    #[test]
    fn key_is_base64_of_16_bytes() {
        let k = ws_key(7);
        assert_eq!(k.len(), 24);
        assert!(k.ends_with("=="));
    }

    #[test]
    fn token_has_three_parts() {
        assert_eq!(token("s", "alice").split('.').count(), 3);
    }
}
