//! One socket that never reads among 200 that do. README promises: its
//! queue is bounded by `--max-outbound-bytes`; past it the socket is closed
//! with 1013, and since it takes nothing, the connection is reset 2 s after
//! that close was decided (a reset, not a FIN: the close frame itself is
//! stuck behind unsent bytes, and a peer must not take a cut frame for a
//! clean end). Publishing never waits on it: the other readers' latency
//! stays low while it is stuck, nobody loses anything, the server's memory
//! stays bounded, and every event is in history.
//!
//! The kernel's own send buffer for a socket grows to `tcp_wmem`'s maximum
//! (4 MiB by default) before parley's outbox sees anything queued, so the
//! slow socket's conversation carries several MiB: big messages to a few
//! readers there, while most of the 200 readers sit in four other
//! conversations with a steady trickle of small messages whose send →
//! receive latency is measured throughout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;
use crate::own_server;
use crate::util::*;

/// Readers in the slow socket's conversation (the sender aside).
const HEAVY_READERS: usize = 10;
/// Readers in the other conversations, spread over them.
const LIGHT_READERS: usize = 190;
const LIGHT_CONVERSATIONS: usize = 4;
/// Big messages: enough to fill the kernel's buffers and the outbox.
const HEAVY_MESSAGES: usize = 140;
const HEAVY_CHARS: usize = 60_000;
/// Pause between two light messages of one sender.
const LIGHT_PACE: Duration = Duration::from_millis(10);
/// What the server's RSS may grow by over the run (the store's cache holds
/// the ~8 MiB written, twice: messages and event log).
const RSS_BUDGET_KIB: u64 = 96 * 1024;
/// README: the reset comes 2 s (`--close-timeout`) after the close is
/// decided. The decision is seen through `/metrics`, the reset through the
/// client's socket state, both polled every 5 ms from a thread of their own.
/// Never earlier than the timeout (less what polling can hide); later by at
/// most the late slack: on a quiet machine it is 2.05–2.15 s, and a server
/// starved of CPU by other processes fires its timer late, never early.
const RESET_AFTER: Duration = Duration::from_secs(2);
const RESET_EARLY_SLACK: Duration = Duration::from_millis(300);
const RESET_LATE_SLACK: Duration = Duration::from_millis(1500);
/// No light message may take longer than this from send to receipt, while
/// the slow socket is stuck or at any other time. A publisher that waited
/// on the stuck socket would hold every conversation for seconds.
const LATENCY_BOUND: Duration = Duration::from_millis(1000);

/// Sends `texts` on `ws`, pipelined in windows, and answers the echoes.
async fn send_all(ws: &mut Ws, texts: &[String], window: usize) -> Vec<Value> {
    let mut acked = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(window) {
        for text in chunk {
            send_json(ws, &json!({"type": "chat_message", "message": text})).await;
        }
        acked.extend(recv_n(ws, chunk.len()).await);
    }
    let got: Vec<&str> = acked.iter().map(|e| e["content"].as_str().unwrap()).collect();
    assert_eq!(got, texts, "the sender's own echoes");
    acked
}

/// A reader that takes `n` events, then expects nothing more.
fn reader(mut ws: Ws, n: usize) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            got.push(recv_json(&mut ws).await);
        }
        expect_silence(&mut ws, 100).await;
        got
    })
}

/// The microseconds since `t0` a light message was sent at (its text ends
/// with ` t=<micros>`).
fn sent_at(event: &Value) -> u64 {
    let text = event["content"].as_str().expect("content");
    text.rsplit("t=")
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{text:?}"))
}

/// What a light reader got, and (sent at, latency) of each, in microseconds.
type LightRead = (Vec<Value>, Vec<(u64, u64)>);

/// A light reader: takes events until the sender's "end", noting for each
/// (sent at, latency) in microseconds since `t0`.
fn light_reader(mut ws: Ws, t0: Instant) -> tokio::task::JoinHandle<LightRead> {
    tokio::spawn(async move {
        let (mut got, mut latencies) = (vec![], vec![]);
        loop {
            let event = recv_json(&mut ws).await;
            if event["content"] == "end" {
                got.push(event);
                return (got, latencies);
            }
            let now = t0.elapsed().as_micros() as u64;
            let sent = sent_at(&event);
            latencies.push((sent, now.saturating_sub(sent)));
            got.push(event);
        }
    })
}

/// A light sender: one message, its echo, a short pause, until `stop`; then
/// "end". Answers every echo.
fn light_sender(
    mut ws: Ws,
    c: usize,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut acked = vec![];
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let text = format!("conv {c} message {i} t={}", t0.elapsed().as_micros());
            acked.push(say(&mut ws, &text).await);
            i += 1;
            tokio::time::sleep(LIGHT_PACE).await;
        }
        acked.push(say(&mut ws, "end").await);
        acked
    })
}

async fn check_readers(readers: Vec<tokio::task::JoinHandle<Vec<Value>>>, acked: &[Value], what: &str) {
    for (i, r) in readers.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .unwrap_or_else(|_| panic!("{what} reader {i} did not get every message within 60 s"))
            .unwrap_or_else(|e| panic!("{what} reader {i} failed: {e}"));
        if got != acked {
            let first = got.iter().zip(acked).position(|(a, b)| a != b);
            panic!(
                "{what} reader {i} got {} events, other than the sender's {} (first difference at {first:?})",
                got.len(),
                acked.len()
            );
        }
    }
}

/// When (since `t0`) the slow consumer was cut off, seen as
/// `parley_slow_consumers_total` turning 1, and when its connection left
/// ESTABLISHED on the client's side, with the state it went to: `None`
/// (gone from the table: the connection was reset) or e.g. "08"
/// (CLOSE_WAIT: a FIN).
async fn watch_cut_off(
    server: &Server,
    t0: Instant,
    client_port: u16,
) -> (Duration, Duration, Option<String>) {
    let addr = server.addr.clone();
    // On its own OS thread, with blocking reads: the test's runtime is busy
    // decoding 200 readers' frames, and a poll loop on it would see the cut
    // and the reset late by however long its turn takes.
    tokio::task::spawn_blocking(move || watch_cut_off_blocking(&addr, t0, client_port))
        .await
        .expect("watcher thread")
}

fn watch_cut_off_blocking(addr: &str, t0: Instant, client_port: u16) -> (Duration, Duration, Option<String>) {
    let server_port = port_of(addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    let cut = loop {
        if metric(&metrics_blocking(addr), "parley_slow_consumers_total") >= 1.0 {
            break t0.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the slow consumer was never cut off (60 s)"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = tcp_state(client_port, server_port);
        if state.as_deref() != Some("01") {
            return (cut, t0.elapsed(), state);
        }
        assert!(
            Instant::now() < deadline,
            "10 s after the cut-off, the slow consumer's connection is still ESTABLISHED"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `GET /metrics` with a blocking socket (for the watcher thread).
fn metrics_blocking(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect for /metrics");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read /metrics");
    out
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_reset_2s_after_its_1013_and_nobody_else_is_delayed() {
    let _machine = crate::util::alone().await;
    let server = own_server!("--max-outbound-bytes", "65536", "--max-message-chars", "60000");
    let pid = pid_of(&server);
    let (alice, bob, carol, slow) = (user("alice"), user("bob"), user("carol"), user("slow"));
    let heavy = server.create_conversation(&alice, &[&bob, &carol, &slow]).await;
    let mut light = vec![];
    for _ in 0..LIGHT_CONVERSATIONS {
        light.push(server.create_conversation(&alice, &[&bob, &carol]).await);
    }

    // The slow consumer: handshake done, then never a read, tiny window.
    let mut slow_sock = connect_small_rcvbuf(&server.addr, 4096).await;
    let slow_port = slow_sock.local_addr().unwrap().port();
    let status = handshake(
        &mut slow_sock,
        &server.addr,
        &format!("/ws/chat/{heavy}/"),
        &server.token(&slow),
    )
    .await;
    assert_eq!(status, 101, "slow consumer's upgrade");

    // 200 readers, each checking it gets every message of its conversation, in order.
    let t0 = Instant::now();
    let mut heavy_readers = vec![];
    for i in 0..HEAVY_READERS {
        let who = [&alice, &bob, &carol][i % 3];
        heavy_readers.push(reader(server.ws_chat(heavy, who).await, HEAVY_MESSAGES));
    }
    let mut light_readers: Vec<Vec<_>> = (0..LIGHT_CONVERSATIONS).map(|_| vec![]).collect();
    for i in 0..LIGHT_READERS {
        let c = i % LIGHT_CONVERSATIONS;
        let who = [&alice, &bob, &carol][i % 3];
        light_readers[c].push(light_reader(server.ws_chat(light[c], who).await, t0));
    }
    let mut heavy_sender = server.ws_chat(heavy, &alice).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut light_senders = vec![];
    for (c, &conv) in light.iter().enumerate() {
        light_senders.push(light_sender(
            server.ws_chat(conv, &bob).await,
            c,
            t0,
            stop.clone(),
        ));
    }
    let rss_before = rss_kib(pid);

    // Sample the RSS while messages flow.
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(rss_kib(pid));
            tokio::select! {
                _ = &mut stop_rx => return peak,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    });

    let heavy_texts: Vec<String> = (0..HEAVY_MESSAGES)
        .map(|i| format!("{i:05} {}", "h".repeat(HEAVY_CHARS - 6)))
        .collect();
    let heavy_task = tokio::spawn(async move {
        let acked = send_all(&mut heavy_sender, &heavy_texts, 10).await;
        (heavy_sender, acked)
    });

    // The cut-off, and the reset that must follow it.
    let (cut, ended_at, state) = watch_cut_off(&server, t0, slow_port).await;
    // Light traffic goes on a little past the reset, then ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);

    let (_heavy_sender, heavy_acked) = heavy_task.await.expect("heavy sender");
    check_readers(heavy_readers, &heavy_acked, "heavy").await;
    let mut light_acked = vec![];
    let mut latencies = vec![];
    for (c, t) in light_senders.into_iter().enumerate() {
        let acked = t.await.expect("light sender");
        for (i, r) in std::mem::take(&mut light_readers[c]).into_iter().enumerate() {
            let (got, lat) = tokio::time::timeout(Duration::from_secs(60), r)
                .await
                .unwrap_or_else(|_| panic!("light reader {i} of {c} did not get \"end\" within 60 s"))
                .unwrap_or_else(|e| panic!("light reader {i} of {c} failed: {e}"));
            assert_eq!(
                got, acked,
                "light reader {i} of conversation {c}: every message, in order"
            );
            latencies.extend(lat);
        }
        light_acked.push(acked);
    }
    let _ = stop_tx.send(());
    let rss_peak = sampler.await.unwrap();

    // Latency of the other readers while the slow one was stuck (from the
    // cut-off to the reset: its close waits behind frames it does not
    // take) and over the whole run.
    let (cut_us, end_us) = (cut.as_micros() as u64, ended_at.as_micros() as u64);
    let mut stuck: Vec<u64> = latencies
        .iter()
        .filter(|(sent, _)| (cut_us..=end_us).contains(sent))
        .map(|(_, l)| *l)
        .collect();
    stuck.sort_unstable();
    let mut all: Vec<u64> = latencies.iter().map(|(_, l)| *l).collect();
    all.sort_unstable();
    let pct = |v: &[u64], p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
    };
    eprintln!(
        "slow_consumer: cut off at {cut:?}, connection ended {:?} later ({state:?}: None = reset); \
         server RSS {rss_before} KiB before, peak {rss_peak} KiB (+{} KiB); \
         light deliveries while stuck: {} (p50 {:?} us, p99 {:?} us, max {:?} us); \
         over the run: {} (p99 {:?} us, max {:?} us)",
        ended_at.saturating_sub(cut),
        rss_peak.saturating_sub(rss_before),
        stuck.len(),
        pct(&stuck, 0.5),
        pct(&stuck, 0.99),
        stuck.last(),
        all.len(),
        pct(&all, 0.99),
        all.last(),
    );

    // Reset, not FIN, and 2 s after the close was decided.
    assert_eq!(
        state, None,
        "the slow consumer's connection must be reset (it took nothing, so its 1013 close is stuck \
         behind unsent bytes); its client side went to state {state:?} instead (08 = a FIN)"
    );
    let after = ended_at.saturating_sub(cut);
    assert!(
        after + RESET_EARLY_SLACK >= RESET_AFTER && after <= RESET_AFTER + RESET_LATE_SLACK,
        "the reset came {after:?} after the cut-off; README: 2 s (-{RESET_EARLY_SLACK:?}, +{RESET_LATE_SLACK:?})"
    );
    let (ended, bytes) = read_until_end(&mut slow_sock, Duration::from_secs(5)).await;
    assert_eq!(
        ended,
        Ended::Error(std::io::ErrorKind::ConnectionReset),
        "the slow consumer's read"
    );
    // Whatever data frames it still got are a prefix of the stream.
    let data: Vec<Value> = server_frames(&bytes)
        .iter()
        .filter(|(op, _)| *op == 0x1)
        .map(|(_, p)| serde_json::from_slice(p).expect("JSON frame"))
        .collect();
    assert!(data.len() < HEAVY_MESSAGES, "the slow socket was not cut off");
    assert_eq!(data[..], heavy_acked[..data.len()], "the slow socket's frames");
    let (_, _, metrics) = server.get_text("/metrics").await;
    assert_eq!(
        metric(&metrics, "parley_slow_consumers_total"),
        1.0,
        "parley_slow_consumers_total"
    );

    // Nobody else was delayed.
    assert!(
        stuck.len() >= 50,
        "only {} light deliveries happened while the slow consumer was stuck: nothing was measured",
        stuck.len()
    );
    let worst = Duration::from_micros(*all.last().unwrap());
    assert!(
        worst <= LATENCY_BOUND,
        "a light message took {worst:?} from send to receipt (bound {LATENCY_BOUND:?}): publishing \
         waited on something"
    );
    assert!(
        rss_peak.saturating_sub(rss_before) < RSS_BUDGET_KIB,
        "server RSS grew from {rss_before} KiB to a peak of {rss_peak} KiB"
    );

    // Every event is in history, the slow consumer's or not.
    for (conv, acked) in std::iter::once((heavy, &heavy_acked)).chain(light.iter().copied().zip(&light_acked))
    {
        let mut history = server.history(conv, &alice).await;
        history.reverse();
        assert_eq!(history.len(), acked.len(), "history of {conv}");
        for (h, a) in history.iter().zip(acked) {
            assert_eq!(h["id"], a["id"]);
            assert_eq!(h["content"], a["content"]);
        }
    }
}
