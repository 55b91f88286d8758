//! Limits at the edge, against the real server: sockets per user, upgrades
//! per second per client address, and the time a peer has to answer our
//! close. Each is off (or generous) by default and counted in `/metrics`.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::*;
use crate::own_server;
use crate::util::*;

async fn metric_now(server: &Server, name: &str) -> f64 {
    let (status, _, text) = server.get_text("/metrics").await;
    assert_eq!(status, 200);
    metric(&text, name)
}

#[tokio::test]
async fn max_sockets_per_user_keeps_the_oldest_and_answers_the_new_one_429() {
    let server = own_server!("--max-sockets-per-user", "2");
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.create_conversation(&alice, &[&bob]).await;
    let mut a1 = server.ws_chat(conv, &alice).await;
    let mut a2 = server.ws_notifications(&alice).await;
    let auth = format!("Bearer {}", server.token(&alice));
    for path in [format!("/ws/chat/{conv}/"), "/ws/notifications/".to_string()] {
        match server.raw_ws(&path, &[("Authorization", &auth)]).await {
            Ok(_) => panic!("a third socket of alice's was upgraded on {path}"),
            Err(answer) => {
                assert_eq!(answer.status, 429, "{path}: {answer:?}");
                assert_eq!(answer.json()["error"], "rate_limited", "{answer:?}");
            }
        }
    }
    // Bob is not alice; alice's first two sockets still work.
    let mut b = server.ws_chat(conv, &bob).await;
    let said = say(&mut a1, "the oldest stay").await;
    assert_eq!(recv_json(&mut b).await, said);
    expect_silence(&mut a2, 100).await;
    assert!(metric_now(&server, "parley_limited_upgrades_total").await >= 2.0);

    // One of hers closes: a new one may open.
    a1.close(None).await.expect("close");
    drop(a1);
    let deadline = Instant::now() + Duration::from_secs(5);
    let path = format!("/ws/chat/{conv}/");
    loop {
        match server.raw_ws(&path, &[("Authorization", &auth)]).await {
            Ok(_) => break,
            Err(a) if a.status == 429 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(a) => panic!("upgrade after a close: {a:?}"),
        }
    }
}

#[tokio::test]
async fn max_upgrades_per_ip_answers_429_beyond_the_rate_and_recovers() {
    let _machine = crate::util::alone().await;
    let server = own_server!("--max-upgrades-per-ip", "5");
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let auth = format!("Bearer {}", server.token(&alice));
    let path = format!("/ws/chat/{conv}/");
    let (mut upgraded, mut limited) = (0, 0);
    let start = Instant::now();
    let mut open = vec![];
    for _ in 0..15 {
        match server.raw_ws(&path, &[("Authorization", &auth)]).await {
            Ok(ws) => {
                upgraded += 1;
                open.push(ws);
            }
            Err(a) => {
                assert_eq!(a.status, 429, "{a:?}");
                assert_eq!(a.json()["error"], "rate_limited");
                limited += 1;
            }
        }
    }
    let took = start.elapsed();
    eprintln!("edge_limits: 15 upgrades in {took:?}: {upgraded} upgraded, {limited} answered 429");
    // Five per second; the burst may straddle a second boundary or two.
    let seconds = took.as_secs() + 2;
    assert!(upgraded as u64 <= 5 * seconds, "{upgraded} upgrades in {took:?}");
    assert!(limited >= 1, "no upgrade was limited");
    assert_eq!(
        metric_now(&server, "parley_limited_upgrades_total").await,
        limited as f64
    );
    // REST is not an upgrade: not limited.
    for _ in 0..10 {
        assert_eq!(
            server.get("/api/conversations/", &server.token(&alice)).await.0,
            200
        );
    }
    // The next second takes upgrades again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(server.raw_ws(&path, &[("Authorization", &auth)]).await.is_ok());
}

/// A chat socket's raw TCP stream, upgraded.
async fn raw_socket(server: &Server, conv: u64, who: &str) -> TcpStream {
    let mut s = TcpStream::connect(&server.addr).await.unwrap();
    let path = format!("/ws/chat/{conv}/");
    assert_eq!(
        handshake(&mut s, &server.addr, &path, &server.token(who)).await,
        101
    );
    s
}

/// Reads frames until a close frame; answers its code and when it came.
async fn until_close(s: &mut TcpStream) -> (Option<u16>, Instant) {
    use tokio::io::AsyncReadExt;
    let mut bytes = vec![];
    let mut chunk = [0u8; 4096];
    loop {
        let frames = server_frames(&bytes);
        if let Some((_, p)) = frames.iter().find(|(op, _)| *op == 0x8) {
            return (close_code(p), Instant::now());
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("no close within 10 s")
            .expect("read");
        assert!(n > 0, "ended without a close frame");
        bytes.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_peer_that_does_not_answer_our_close_is_reset_after_the_close_timeout() {
    let _machine = crate::util::alone().await;
    // Sockets quiet for 1 s are pinged and closed (1001) 1 s later: a close
    // that parley starts. One client answers it, the other does not.
    let server = own_server!(
        "--ping-interval",
        "1s",
        "--ping-timeout",
        "1s",
        "--close-timeout",
        "700ms"
    );
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut mute = raw_socket(&server, conv, &alice).await;
    let mut polite = raw_socket(&server, conv, &alice).await;

    let ((mute_code, mute_at), (polite_code, _)) =
        tokio::join!(until_close(&mut mute), until_close(&mut polite));
    assert_eq!((mute_code, polite_code), (Some(1001), Some(1001)));

    // The polite one answers: the server closes TCP first, cleanly.
    polite
        .write_all(&masked_frame(true, OP_CLOSE, &1001u16.to_be_bytes()))
        .await
        .unwrap();
    let start = Instant::now();
    let (ended, _) = read_until_end(&mut polite, Duration::from_secs(5)).await;
    assert_eq!(ended, Ended::Eof, "an answered close ends with FIN");
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "FIN after {:?}",
        start.elapsed()
    );

    // The mute one says nothing: reset once the close timeout has passed.
    let (ended, _) = read_until_end(&mut mute, Duration::from_secs(5)).await;
    let after = mute_at.elapsed();
    eprintln!("edge_limits: unanswered close: {ended:?} {after:?} after the close frame");
    assert_eq!(ended, Ended::Error(std::io::ErrorKind::ConnectionReset));
    assert!(after < Duration::from_millis(1500), "reset only after {after:?}");
    assert_eq!(metric_now(&server, "parley_close_timeouts_total").await, 1.0);
}
