//! One socket that never reads among 200 that do: it is cut off with 1013
//! once its queue passes `--max-outbound-bytes`, the others lose nothing,
//! the server's memory stays bounded, and every event is in history.
//!
//! The kernel's own send buffer for a socket grows to `tcp_wmem`'s maximum
//! (4 MiB by default) before parley's outbox sees anything queued, so the
//! slow socket's conversation carries several MiB: big messages to a few
//! readers there, while most of the 200 readers sit in four other
//! conversations with steady small traffic.

use std::time::Duration;

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
const LIGHT_MESSAGES: usize = 150;
/// What the server's RSS may grow by over the run (the store's cache holds
/// the ~8 MiB written, twice: messages and event log).
const RSS_BUDGET_KIB: u64 = 96 * 1024;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_cut_off_and_nobody_else_loses_anything() {
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
    let mut heavy_readers = vec![];
    for i in 0..HEAVY_READERS {
        let who = [&alice, &bob, &carol][i % 3];
        heavy_readers.push(reader(server.ws_chat(heavy, who).await, HEAVY_MESSAGES));
    }
    let mut light_readers: Vec<Vec<_>> = (0..LIGHT_CONVERSATIONS).map(|_| vec![]).collect();
    for i in 0..LIGHT_READERS {
        let c = i % LIGHT_CONVERSATIONS;
        let who = [&alice, &bob, &carol][i % 3];
        light_readers[c].push(reader(server.ws_chat(light[c], who).await, LIGHT_MESSAGES));
    }
    let mut heavy_sender = server.ws_chat(heavy, &alice).await;
    let mut light_senders = vec![];
    for &c in &light {
        light_senders.push(server.ws_chat(c, &bob).await);
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
    let mut light_tasks = vec![];
    for (c, mut ws) in light_senders.into_iter().enumerate() {
        light_tasks.push(tokio::spawn(async move {
            let texts: Vec<String> = (0..LIGHT_MESSAGES)
                .map(|i| format!("conv {c} message {i}"))
                .collect();
            let acked = send_all(&mut ws, &texts, 10).await;
            (ws, acked)
        }));
    }
    let (_heavy_sender, heavy_acked) = heavy_task.await.expect("heavy sender");
    check_readers(heavy_readers, &heavy_acked, "heavy").await;
    let mut light_acked = vec![];
    for (c, t) in light_tasks.into_iter().enumerate() {
        let (_ws, acked) = t.await.expect("light sender");
        check_readers(std::mem::take(&mut light_readers[c]), &acked, "light").await;
        light_acked.push(acked);
    }

    // The server lets go of the slow connection by itself, although the
    // client still reads nothing: its end is no longer ESTABLISHED.
    let server_port = port_of(&server.addr);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut state = tcp_state(server_port, slow_port);
    while state.as_deref() == Some("01") && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        state = tcp_state(server_port, slow_port);
    }
    let _ = stop_tx.send(());
    let rss_peak = sampler.await.unwrap();
    eprintln!(
        "slow_consumer: server RSS {rss_before} KiB before, peak {rss_peak} KiB \
         (+{} KiB); \
         server side of the slow socket 10 s later: {state:?} (01 = ESTABLISHED)",
        rss_peak.saturating_sub(rss_before)
    );

    // Reading now: what was buffered, then a 1013 close, then the end; or,
    // when the server gave up on frames it could not deliver, a reset (a cut
    // frame before a reset is fine: the client sees an abnormal close).
    let (ended, bytes) = read_until_end(&mut slow_sock, Duration::from_secs(10)).await;
    let frames = server_frames(&bytes);
    let (_, _, metrics) = server.get_text("/metrics").await;
    let slow_count = metric(&metrics, "parley_slow_consumers_total");
    let parsed: usize = frames.iter().map(|(_, p)| header_len(p.len()) + p.len()).sum();
    let close = frames.iter().rev().find(|(op, _)| *op == 0x8);
    eprintln!(
        "slow_consumer: the slow socket then read {} bytes: {} whole frames ({parsed} bytes), \
         ended {ended:?}, close code {:?}",
        bytes.len(),
        frames.len(),
        close.map(|(_, p)| close_code(p))
    );
    let mut problems = vec![];
    if ended == Ended::Open {
        problems.push("the slow socket was never closed".to_string());
    }
    if parsed < bytes.len() && ended == Ended::Eof {
        let rest = &bytes[parsed..];
        let close_at = rest.windows(4).rposition(|w| w == [0x88, w[1], 0x03, 0xF5]);
        problems.push(format!(
            "the stream is corrupt: after {} whole frames, a frame whose header announces more bytes \
             than follow ({} bytes left){}",
            frames.len(),
            rest.len(),
            match close_at {
                Some(i) => format!(
                    ", and a 1013 close frame starts {} bytes into it: the server cut a frame short \
                     and wrote its close right behind it",
                    i
                ),
                None => String::new(),
            }
        ));
    } else if ended == Ended::Eof {
        match close {
            Some((_, p)) if close_code(p) == Some(1013) => {}
            other => problems.push(format!(
                "the connection ended without a 1013 close frame (last close: {:?})",
                other.map(|(_, p)| close_code(p))
            )),
        }
    }
    // Whatever data frames it got are a prefix of the stream.
    let data: Vec<Value> = frames
        .iter()
        .filter(|(op, _)| *op == 0x1)
        .map(|(_, p)| serde_json::from_slice(p).expect("JSON frame"))
        .collect();
    assert!(data.len() < HEAVY_MESSAGES, "the slow socket was not cut off");
    assert_eq!(data[..], heavy_acked[..data.len()], "the slow socket's frames");
    assert_eq!(slow_count, 1.0, "parley_slow_consumers_total");
    assert!(
        rss_peak.saturating_sub(rss_before) < RSS_BUDGET_KIB,
        "server RSS grew from {rss_before} KiB to a peak of {rss_peak} KiB"
    );
    if state.as_deref() == Some("01") {
        problems.push(
            "after cutting the slow consumer off, the server kept its TCP connection ESTABLISHED \
             for 10 s while the client read nothing; it ended only once the client read"
                .to_string(),
        );
    }

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

    assert!(problems.is_empty(), "slow consumer: {problems:#?}");
}

fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}
