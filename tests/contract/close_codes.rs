//! RFC 6455 close handling on the real sockets, `/ws/chat/` and
//! `/ws/notifications/` alike: which close codes are echoed and which fail
//! the connection (§7.4), a close reason that is not UTF-8, fragmented text
//! that turns invalid, and who closes TCP first (§7.1.1: the server, right
//! after the close handshake or after failing the connection, without
//! waiting for the client).

use std::time::{Duration, Instant};

use crate::harness::*;

/// Well under the default close timeout (2 s): a server that closes TCP
/// only when that timer fires does not pass.
const PROMPT: Duration = Duration::from_millis(1000);

/// One raw socket on each endpoint, for `who`.
async fn both_sockets(server: &Server) -> Vec<(&'static str, RawWs)> {
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    vec![
        ("chat", server.raw_chat(conv, &alice).await),
        ("notifications", server.raw_notifications(&alice).await),
    ]
}

/// Sends `frame` raw, answers the close code the server sent, and checks
/// that the server then ended the TCP connection promptly by itself.
async fn close_after(raw: &mut RawWs, fin: bool, opcode: u8, payload: &[u8], what: &str) -> Option<u16> {
    raw.send_frame(fin, opcode, payload).await;
    let code = raw.expect_close().await;
    let start = Instant::now();
    // Without answering: after failing the connection, or after echoing
    // our close, the server owes nothing more and closes first.
    let next = raw.read_frame().await;
    assert!(next.is_none(), "{what}: a frame after the close: {next:?}");
    let took = start.elapsed();
    assert!(took < PROMPT, "{what}: TCP closed only after {took:?}");
    code
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

#[tokio::test]
async fn valid_close_codes_are_echoed_and_the_server_closes_tcp_first() {
    let server = Server::start();
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
    ] {
        for (kind, mut raw) in both_sockets(&server).await {
            let what = format!("{kind}: close {code}");
            let got = close_after(&mut raw, true, OP_CLOSE, &close_payload(code, b"bye"), &what).await;
            assert_eq!(got, Some(code), "{what}");
        }
    }
}

#[tokio::test]
async fn an_empty_close_is_answered_1000() {
    let server = Server::start();
    for (kind, mut raw) in both_sockets(&server).await {
        let got = close_after(&mut raw, true, OP_CLOSE, b"", kind).await;
        assert_eq!(got, Some(1000), "{kind}");
    }
}

#[tokio::test]
async fn codes_that_must_not_appear_on_the_wire_or_are_unassigned_are_1002() {
    let server = Server::start();
    for code in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        for (kind, mut raw) in both_sockets(&server).await {
            let what = format!("{kind}: close {code}");
            let got = close_after(&mut raw, true, OP_CLOSE, &close_payload(code, b""), &what).await;
            assert_eq!(got, Some(1002), "{what}");
        }
    }
}

#[tokio::test]
async fn a_one_byte_close_payload_is_1002() {
    let server = Server::start();
    for (kind, mut raw) in both_sockets(&server).await {
        let got = close_after(&mut raw, true, OP_CLOSE, &[0x03], kind).await;
        assert_eq!(got, Some(1002), "{kind}");
    }
}

#[tokio::test]
async fn a_close_reason_that_is_not_utf8_is_1007() {
    let server = Server::start();
    for (kind, mut raw) in both_sockets(&server).await {
        let payload = close_payload(
            1000,
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
        );
        let got = close_after(&mut raw, true, OP_CLOSE, &payload, kind).await;
        assert_eq!(got, Some(1007), "{kind}");
    }
}

#[tokio::test]
async fn a_protocol_error_is_closed_1002_without_waiting_for_the_client() {
    let server = Server::start();
    for (kind, mut raw) in both_sockets(&server).await {
        // RSV1 set, no extension negotiated.
        let mut frame = masked_frame(true, OP_TEXT, b"{}");
        frame[0] |= 0x40;
        raw.send_raw(&frame).await;
        let code = raw.expect_close().await;
        assert_eq!(code, Some(1002), "{kind}");
        let start = Instant::now();
        assert!(raw.read_frame().await.is_none(), "{kind}: more after the close");
        assert!(
            start.elapsed() < PROMPT,
            "{kind}: TCP closed after {:?}",
            start.elapsed()
        );
    }
}

#[tokio::test]
async fn fragmented_text_fails_1007_as_soon_as_a_fragment_is_invalid() {
    let server = Server::start();
    for (kind, mut raw) in both_sockets(&server).await {
        // "κόσμε" then the encoding of a UTF-16 surrogate, which no later
        // fragment can make valid; the final fragment is never sent.
        raw.send_frame(false, OP_TEXT, "κόσμε".as_bytes()).await;
        let code = close_after(&mut raw, false, OP_CONT, b"\xed\xa0\x80", kind).await;
        assert_eq!(code, Some(1007), "{kind}");
    }
}

#[tokio::test]
async fn text_split_inside_a_character_across_fragments_is_fine() {
    let server = Server::start();
    let alice = user("alice");
    let conv = server.create_conversation(&alice, &[]).await;
    let mut raw = server.raw_chat(conv, &alice).await;
    let text = serde_json::json!({"type": "chat_message", "message": "κόσμε"}).to_string();
    let bytes = text.as_bytes();
    // Cut in the middle of "κ" (2 bytes in UTF-8).
    let cut = text.find('κ').unwrap() + 1;
    raw.send_frame(false, OP_TEXT, &bytes[..cut]).await;
    raw.send_frame(true, OP_CONT, &bytes[cut..]).await;
    let echo = raw.recv_json().await;
    assert_eq!(echo["content"], "κόσμε");
}

#[tokio::test]
async fn a_text_frame_fails_1007_as_soon_as_its_first_bytes_are_invalid() {
    let server = Server::start();
    for (kind, mut raw) in both_sockets(&server).await {
        // One 2,000-byte frame: valid text, then a surrogate; only the
        // first half is sent, the rest never is.
        let mut payload = "κόσμε".repeat(50).into_bytes();
        payload.extend_from_slice(b"\xed\xa0\x80");
        payload.resize(2000, b'x');
        let frame = masked_frame(true, OP_TEXT, &payload);
        raw.send_raw(&frame[..1000]).await;
        let code = raw.expect_close().await;
        assert_eq!(code, Some(1007), "{kind}");
    }
}
