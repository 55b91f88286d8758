//! The operator's limits: connection cap, handshake deadline, ping
//! timeout, body size, rate limit.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;
use crate::own_server;
use crate::util::*;

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn max_connections_refuses_the_fourth_upgrade_with_503_until_one_closes() {
    let server = own_server!("--max-connections", "3");
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let path = format!("/ws/chat/{conv}/");
    let auth = format!("Bearer {}", server.token(&alice));
    let mut open = vec![];
    for _ in 0..3 {
        open.push(server.ws_chat(conv, &alice).await);
    }
    match server.raw_ws(&path, &[("Authorization", &auth)]).await {
        Ok(_) => panic!("a 4th socket was upgraded with --max-connections 3"),
        Err(answer) => {
            assert_eq!(answer.status, 503, "4th upgrade: {answer:?}");
        }
    }
    // Plain HTTP is not a WebSocket: still served at the cap.
    let (status, _) = server.get("/api/conversations/", &server.token(&alice)).await;
    assert_eq!(status, 200);
    // The three still chat.
    say(&mut open[0], "still here").await;
    for ws in open.iter_mut().skip(1) {
        assert_eq!(recv_json(ws).await["content"], "still here");
    }

    // One closes; a new upgrade then succeeds.
    let mut gone = open.pop().unwrap();
    gone.close(None).await.expect("close");
    drop(gone);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match server.raw_ws(&path, &[("Authorization", &auth)]).await {
            Ok(_) => break,
            Err(a) if a.status == 503 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(a) => panic!("upgrade after a close: {a:?}"),
        }
    }
}

/// Reads until the connection ends; panics if it is still open after `within`.
/// Reads until the server disconnects, which must happen between `after`
/// and `within` from now: a server that drops the connection at once does
/// not honour the timeout either.
async fn expect_disconnect(stream: &mut TcpStream, after: Duration, within: Duration, what: &str) -> Vec<u8> {
    let start = Instant::now();
    let (ended, bytes) = read_until_end(stream, within).await;
    assert!(
        start.elapsed() >= after,
        "{what}: disconnected after {:?}, before the timeout ({after:?} at least)",
        start.elapsed()
    );
    assert_ne!(
        ended,
        Ended::Open,
        "{what}: still connected after {within:?} (got {:?})",
        String::from_utf8_lossy(&bytes)
    );
    eprintln!(
        "limits: {what}: disconnected after {:?} ({ended:?}, answer {:?})",
        start.elapsed(),
        String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
    );
    bytes
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn handshake_timeout_disconnects_silent_and_half_sent_requests() {
    let _machine = crate::util::alone().await;
    let server = own_server!("--handshake-timeout", "1s");
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    // An upgraded socket is past its handshake: it may idle longer.
    let mut idle = server.ws_chat(conv, &alice).await;

    let mut silent = TcpStream::connect(&server.addr).await.unwrap();
    let mut half = TcpStream::connect(&server.addr).await.unwrap();
    half.write_all(
        format!(
            "GET /ws/chat/{conv}/ HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n",
            server.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (a, b) = tokio::join!(
        expect_disconnect(
            &mut silent,
            Duration::from_millis(800),
            Duration::from_secs(4),
            "a client that sends nothing"
        ),
        expect_disconnect(
            &mut half,
            Duration::from_millis(800),
            Duration::from_secs(4),
            "a client that sends half a head"
        ),
    );
    for bytes in [a, b] {
        // Either nothing, or an HTTP error answer (408 / 400): never a 101.
        assert!(
            bytes.is_empty() || !String::from_utf8_lossy(&bytes).contains(" 101 "),
            "{:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
    // The upgraded socket, quiet for 2 s+, still works; so does the server.
    say(&mut idle, "after the timeouts").await;
    assert_eq!(server.get("/healthz", &server.token(&alice)).await.0, 200);
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn a_socket_that_never_answers_pings_is_closed_and_one_that_does_stays() {
    let _machine = crate::util::alone().await;
    let server = own_server!("--ping-interval", "1s", "--ping-timeout", "1s");
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;

    // tungstenite answers pings while it reads.
    let mut good = server.ws_chat(conv, &alice).await;
    let keep_reading = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
        let mut pings = 0;
        loop {
            match tokio::time::timeout_at(deadline, good.next()).await {
                Err(_) => return (good, pings),
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(other) => panic!("the ping-answering socket got {other:?}"),
            }
        }
    });

    // A raw client that reads everything and answers nothing.
    let mut mute = server.raw_chat(conv, &alice).await;
    let start = Instant::now();
    let mut pings = 0;
    let mut close = None;
    let outcome = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match mute.read_frame().await {
                None => return "connection ended",
                Some(f) if f.opcode == OP_PING => pings += 1,
                Some(f) if f.opcode == OP_CLOSE => {
                    close = (f.payload.len() >= 2).then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                    return "close frame";
                }
                Some(f) => panic!("unexpected frame {f:?}"),
            }
        }
    })
    .await;
    let elapsed = start.elapsed();
    eprintln!("limits: mute socket: {outcome:?} after {elapsed:?}, {pings} pings, close code {close:?}");
    assert!(
        outcome.is_ok(),
        "a socket that never answers pings was still open after 8 s"
    );
    assert!(pings >= 1, "no ping before the close");
    assert!(elapsed <= Duration::from_secs(5), "closed only after {elapsed:?}");
    // Not before a quiet interval (1 s) plus the ping timeout (1 s) passed.
    assert!(
        elapsed >= Duration::from_millis(1800),
        "closed after {elapsed:?}, before --ping-interval + --ping-timeout (2 s)"
    );

    let (mut good, good_pings) = keep_reading.await.unwrap();
    assert!(good_pings >= 1, "the answering socket was never pinged");
    say(&mut good, "still open").await;
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn a_body_over_max_body_bytes_is_413_too_large() {
    let server = own_server!("--max-body-bytes", "1000");
    let alice = user("alice");
    let token = server.token(&alice);
    let body = json!({"participants": ["x".repeat(2000)]}).to_string();
    let (status, answer) = http_once(
        &server.addr,
        "POST",
        "/api/conversations/",
        &token,
        body.as_bytes(),
    )
    .await;
    let answer: serde_json::Value = serde_json::from_slice(&answer).expect("JSON error body");
    assert_rest_error(&(status, answer), 413, "too_large");
    let answer = server
        .post(
            "/api/notifications/",
            &server.service_token(),
            json!({"user": alice, "message": "y".repeat(1500)}),
        )
        .await;
    assert_rest_error(&answer, 413, "too_large");
    let (status, _) = server.get("/api/notifications/", &token).await;
    assert_eq!(status, 200);
    let (_, list) = server.get("/api/notifications/", &token).await;
    assert_eq!(list["results"], json!([]), "a refused body stored something");
    // Under the limit: fine.
    server.create_conversation(&alice, &[]).await;
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn frames_beyond_the_rate_limit_are_refused_and_not_stored() {
    let server = own_server!("--rate-limit", "5");
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.create_conversation(&alice, &[&bob]).await;
    let mut a = server.ws_chat(conv, &alice).await;
    let mut b = server.ws_chat(conv, &bob).await;
    for i in 0..20 {
        send_json(
            &mut a,
            &json!({"type": "chat_message", "message": format!("burst {i}")}),
        )
        .await;
    }
    let answers = recv_n(&mut a, 20).await;
    let accepted: Vec<_> = answers
        .iter()
        .filter(|v| v.get("id").is_some())
        .cloned()
        .collect();
    let limited = answers.iter().filter(|v| v["code"] == "rate_limited").count();
    for v in &answers {
        if v.get("id").is_none() {
            assert_error(v, "rate_limited");
        }
    }
    eprintln!(
        "limits: 20 frames at once with --rate-limit 5: {} accepted, {limited} rate_limited",
        accepted.len()
    );
    assert!(
        (5..=7).contains(&accepted.len()),
        "accepted {} of a burst of 20",
        accepted.len()
    );
    assert_eq!(accepted.len() + limited, 20);
    // Bob saw exactly the accepted ones, no error frame.
    assert_eq!(recv_n(&mut b, accepted.len()).await, accepted);
    expect_silence(&mut b, SILENCE_MS).await;
    let mut history = server.history(conv, &alice).await;
    history.reverse();
    let ids: Vec<_> = history.iter().map(id_of).collect();
    assert_eq!(ids, accepted.iter().map(id_of).collect::<Vec<_>>(), "stored");
    // The socket stays open and, a second later, may send again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    say(&mut a, "after the pause").await;
    assert_eq!(recv_json(&mut b).await["content"], "after the pause");
}
