//! Shutdown under load: SIGTERM with 10,000 open sockets while resuming
//! sockets keep joining. Every open socket gets its 1001, every resume
//! attempt ends (a 101 then 1001, or a 503, or a refused connection: never
//! a hang), and parley exits 0 within its bound.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::harness::*;
use crate::own_server;
use crate::util::*;

const SOCKETS: usize = 10_000;
/// Upgrades in flight while opening the sockets.
const OPENING: usize = 128;
/// What parley may take from SIGTERM to exit with 10,000 sockets: the
/// close timeout (2 s) plus its slack, and the final flush.
const EXIT_BOUND: Duration = Duration::from_secs(8);

/// Raises this process's descriptor limit (children inherit it) to at
/// least `want`; false if the hard limit does not allow it.
fn raise_fd_limit(want: u64) -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return false;
        }
        if lim.rlim_cur >= want {
            return true;
        }
        if lim.rlim_max < want {
            return false;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
    }
}

/// An upgrade of `path`; None when refused or cut (what shutdown may do to
/// a join), else the status and the stream.
async fn try_upgrade(addr: &str, path: &str, token: &str) -> Option<(u16, TcpStream)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut head = vec![];
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let status = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())?;
    Some((status, s))
}

/// Reads until the server's close frame, answers it as a client does, and
/// reads to the end. Answers the close code (None: ended without one).
async fn await_close(mut s: TcpStream) -> Option<u16> {
    let mut bytes = vec![];
    let mut chunk = vec![0u8; 16384];
    let code = loop {
        if let Some((_, p)) = server_frames(&bytes).into_iter().find(|(op, _)| *op == 0x8) {
            break close_code(&p);
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
        }
    };
    let echo = masked_frame(true, OP_CLOSE, &code.unwrap_or(1000).to_be_bytes());
    let _ = s.write_all(&echo).await;
    let _ = read_until_end(&mut s, Duration::from_secs(5)).await;
    code
}

/// One long test on purpose: its steps (history to replay, 10,000 sockets,
/// resumes joining, SIGTERM, what each socket saw) share one server and
/// are only meaningful together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_10000_open_sockets_and_resumes_in_flight_closes_all_1001_and_exits_0() {
    let _machine = crate::util::alone().await;
    if !raise_fd_limit(SOCKETS as u64 + 1000) {
        eprintln!(
            "SKIPPED shutdown test: needs {} open files per process (ulimit -n); raise the hard limit",
            SOCKETS + 1000
        );
        return;
    }
    let mut server = own_server!();
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.create_conversation(&alice, &[&bob]).await;
    // Something for the resumes to replay.
    let mut ws = server.ws_chat(conv, &alice).await;
    let first = id_of(&say(&mut ws, "first").await);
    for i in 0..200 {
        send_json(
            &mut ws,
            &serde_json::json!({"type": "chat_message", "message": format!("m{i}")}),
        )
        .await;
    }
    recv_n(&mut ws, 200).await;

    // 10,000 sockets: chat and notifications, alice's and bob's.
    let opened = Instant::now();
    let tokens = [server.token(&alice), server.token(&bob)];
    let mut streams = Vec::with_capacity(SOCKETS);
    let mut opening = JoinSet::new();
    for i in 0..SOCKETS {
        if opening.len() >= OPENING {
            streams.push(opening.join_next().await.unwrap().unwrap());
        }
        let addr = server.addr.clone();
        let token = tokens[i % 2].clone();
        let path = if i % 4 < 2 {
            format!("/ws/chat/{conv}/")
        } else {
            "/ws/notifications/".to_string()
        };
        opening.spawn(async move {
            let (status, s) = try_upgrade(&addr, &path, &token)
                .await
                .unwrap_or_else(|| panic!("socket {i} could not upgrade"));
            assert_eq!(status, 101, "socket {i}");
            s
        });
    }
    while let Some(s) = opening.join_next().await {
        streams.push(s.unwrap());
    }
    eprintln!(
        "shutdown: {} sockets open in {:?}",
        streams.len(),
        opened.elapsed()
    );
    let mut closes = JoinSet::new();
    for s in streams {
        closes.spawn(await_close(s));
    }

    // Resumes joining all the time, through the SIGTERM.
    let resumer = {
        let addr = server.addr.clone();
        let token = tokens[1].clone();
        let path = format!("/ws/chat/{conv}/?after={first}");
        tokio::spawn(async move {
            // A new resume every few milliseconds, each kept open until its
            // close, until the listener is gone.
            let refused = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let mut attempts = JoinSet::new();
            while !refused.load(std::sync::atomic::Ordering::Relaxed) {
                let (addr, path, token) = (addr.clone(), path.clone(), token.clone());
                let refused = refused.clone();
                attempts.spawn(async move {
                    match try_upgrade(&addr, &path, &token).await {
                        None => {
                            refused.store(true, std::sync::atomic::Ordering::Relaxed);
                            "refused or cut".to_string()
                        }
                        Some((101, s)) => format!("101 then close {:?}", await_close(s).await),
                        Some((status, _)) => format!("answered {status}"),
                    }
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
            while let Some(o) = attempts.join_next().await {
                *outcomes.entry(o.unwrap()).or_default() += 1;
            }
            outcomes
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let sigterm = Instant::now();
    let exit = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (status, Instant::now(), server)
    });
    let mut codes = std::collections::BTreeMap::<Option<u16>, usize>::new();
    let all_closed = tokio::time::timeout(EXIT_BOUND + Duration::from_secs(5), async {
        while let Some(c) = closes.join_next().await {
            *codes.entry(c.unwrap()).or_default() += 1;
        }
    })
    .await;
    let closed_in = sigterm.elapsed();
    let (status, exited_at, _server) = exit.await.unwrap();
    let exited_in = exited_at - sigterm;
    let outcomes = tokio::time::timeout(Duration::from_secs(15), resumer)
        .await
        .expect("a resume attempt hung through the shutdown")
        .unwrap();
    eprintln!(
        "shutdown: SIGTERM with {SOCKETS} sockets: every socket closed in {closed_in:?}, exit {status} \
         after {exited_in:?}; close codes {codes:?}; resumes {outcomes:?}"
    );
    assert!(
        all_closed.is_ok(),
        "sockets still open {closed_in:?} after SIGTERM: {codes:?}"
    );
    assert_eq!(codes.get(&Some(1001)), Some(&SOCKETS), "close codes: {codes:?}");
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(exited_in < EXIT_BOUND, "exited only {exited_in:?} after SIGTERM");
    for o in outcomes.keys() {
        assert!(
            o == "refused or cut" || o == "answered 503" || o == "101 then close Some(1001)",
            "a resume during shutdown ended as {o:?}"
        );
    }
    assert!(
        outcomes.keys().any(|o| o.starts_with("101")),
        "no resume was in flight: {outcomes:?}"
    );
}
