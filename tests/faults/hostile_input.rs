//! Hostile bytes: garbage HTTP, absurd frame lengths, invalid UTF-8, frames
//! after a close, a frame dribbled byte by byte, unmasked frames. After each,
//! the others in the conversation still chat normally.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::*;
use crate::own_server;
use crate::util::*;

/// Alice and Bob in one conversation, each with a normal socket.
struct Pair {
    server: Server,
    conv: u64,
    alice: String,
    a: Ws,
    b: Ws,
}

async fn pair(server: Server) -> Pair {
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.create_conversation(&alice, &[&bob]).await;
    let a = server.ws_chat(conv, &alice).await;
    let b = server.ws_chat(conv, &bob).await;
    Pair {
        server,
        conv,
        alice,
        a,
        b,
    }
}

impl Pair {
    /// Bob has heard nothing meanwhile; then Alice and Bob chat normally.
    async fn still_chat(&mut self) {
        expect_silence(&mut self.b, SILENCE_MS).await;
        expect_silence(&mut self.a, 0).await;
        let text = format!("still fine {}", rand::random::<u32>());
        let echo = say(&mut self.a, &text).await;
        assert_eq!(recv_json(&mut self.b).await, echo);
        let reply = say(&mut self.b, "and you").await;
        assert_eq!(recv_json(&mut self.a).await, reply);
    }

    /// A raw chat socket of Alice's with the handshake done.
    async fn raw_tcp(&self) -> TcpStream {
        let mut s = TcpStream::connect(&self.server.addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let path = format!("/ws/chat/{}/", self.conv);
        let status = handshake(&mut s, &self.server.addr, &path, &self.server.token(&self.alice)).await;
        assert_eq!(status, 101);
        s
    }
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn garbage_http_gets_400_and_a_close_and_others_are_served() {
    let mut p = pair(own_server!()).await;
    for garbage in [
        &b"\x00\xff\xfe\x16\x03\x01 hello\r\n\r\n"[..],
        b"GARBAGE / NOT-HTTP/9\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03],
    ] {
        let mut s = TcpStream::connect(&p.server.addr).await.unwrap();
        s.write_all(garbage).await.unwrap();
        let (ended, bytes) = read_until_end(&mut s, Duration::from_secs(5)).await;
        let answer = String::from_utf8_lossy(&bytes).to_string();
        // README: "400 from hyper, connection closed".
        assert!(
            answer.starts_with("HTTP/1.1 400 "),
            "garbage {garbage:?} answered {answer:?} ({ended:?})"
        );
        assert_ne!(
            ended,
            Ended::Open,
            "garbage {garbage:?}: still open after its 400"
        );
    }
    p.still_chat().await;
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn a_frame_header_claiming_2_pow_63_bytes_is_closed_1009_at_once() {
    let mut p = pair(own_server!()).await;
    let mut s = p.raw_tcp().await;
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 63).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    let start = Instant::now();
    s.write_all(&header).await.unwrap();
    let (ended, bytes) = read_until_end(&mut s, Duration::from_secs(5)).await;
    let elapsed = start.elapsed();
    let frames = server_frames(&bytes);
    let close = frames.iter().find(|(op, _)| *op == 0x8);
    eprintln!("hostile_input: 2^63 header: {ended:?} after {elapsed:?}, close {close:?}");
    assert_eq!(close.map(|(_, p)| close_code(p)), Some(Some(1009)), "{bytes:?}");
    assert!(elapsed < Duration::from_secs(3), "closed only after {elapsed:?}");
    p.still_chat().await;
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn invalid_utf8_in_a_text_frame_is_closed_1007() {
    let mut p = pair(own_server!()).await;
    let mut raw = p.server.raw_chat(p.conv, &p.alice).await;
    raw.send_frame(
        true,
        OP_TEXT,
        b"{\"type\":\"chat_message\",\"message\":\"\xC3\x28\"}",
    )
    .await;
    assert_eq!(raw.expect_close().await, Some(1007));
    p.still_chat().await;
    assert_eq!(p.server.history(p.conv, &p.alice).await.len(), 2);
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn frames_after_a_close_frame_change_nothing() {
    let mut p = pair(own_server!()).await;
    let mut raw = p.server.raw_chat(p.conv, &p.alice).await;
    let mut burst = masked_frame(true, 0x8, &1000u16.to_be_bytes());
    for i in 0..20 {
        let text = json!({"type": "chat_message", "message": format!("after close {i}")}).to_string();
        burst.extend(masked_frame(true, 0x1, text.as_bytes()));
    }
    burst.extend(masked_frame(true, 0x9, b"ping?"));
    burst.extend(masked_frame(true, 0x2, b"\x00\x01"));
    // All in one write: the close and what follows arrive together.
    raw.send_frame(true, OP_CLOSE, &1000u16.to_be_bytes()).await;
    let mut s = p.raw_tcp().await;
    s.write_all(&burst).await.unwrap();
    let (ended, bytes) = read_until_end(&mut s, Duration::from_secs(5)).await;
    let frames = server_frames(&bytes);
    assert_ne!(ended, Ended::Open, "the socket stayed open after its close");
    assert_eq!(
        frames.iter().map(|(op, _)| *op).collect::<Vec<_>>(),
        vec![0x8],
        "only the close echo may answer: {frames:?}"
    );
    assert_eq!(raw.expect_close().await, Some(1000));
    p.still_chat().await;
    assert_eq!(
        p.server.history(p.conv, &p.alice).await.len(),
        2,
        "a frame after a close was stored"
    );
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn a_frame_dribbled_byte_by_byte_is_still_processed() {
    let mut p = pair(own_server!()).await;
    let mut s = p.raw_tcp().await;
    let text = "dribbled, one byte at a time";
    let frame = masked_frame(
        true,
        0x1,
        json!({"type": "chat_message", "message": text})
            .to_string()
            .as_bytes(),
    );
    let pause = Duration::from_millis(200) / frame.len() as u32;
    for byte in &frame {
        s.write_all(std::slice::from_ref(byte)).await.unwrap();
        tokio::time::sleep(pause).await;
    }
    let event = recv_json(&mut p.b).await;
    assert_eq!(event["content"], text);
    assert_eq!(event["sender"], p.alice.as_str());
    assert_eq!(recv_json(&mut p.a).await, event);
    // The dribbling socket got it too.
    let (_, bytes) = read_until_end(&mut s, Duration::from_millis(500)).await;
    let frames = server_frames(&bytes);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&frames[0].1).unwrap(),
        event
    );
    p.still_chat().await;
}

#[cfg_attr(parley_external, ignore = "needs its own parley: PARLEY_TEST_EXTERNAL is set")]
#[tokio::test]
async fn an_unmasked_client_frame_is_closed_1002() {
    let mut p = pair(own_server!()).await;
    let mut s = p.raw_tcp().await;
    let text = json!({"type": "chat_message", "message": "unmasked"}).to_string();
    s.write_all(&unmasked_frame(0x1, text.as_bytes())).await.unwrap();
    let (ended, bytes) = read_until_end(&mut s, Duration::from_secs(5)).await;
    let frames = server_frames(&bytes);
    assert_ne!(ended, Ended::Open, "still open after an unmasked frame");
    assert_eq!(
        frames
            .iter()
            .map(|(op, p)| (*op, close_code(p)))
            .collect::<Vec<_>>(),
        vec![(0x8, Some(1002))],
        "{frames:?}"
    );
    p.still_chat().await;
    assert_eq!(
        p.server.history(p.conv, &p.alice).await.len(),
        2,
        "the unmasked frame was stored"
    );
}
