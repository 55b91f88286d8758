//! RFC 6455 framing rules README's failure table promises beyond the
//! single-frame cases of `chat_errors`: reserved opcodes, a data frame
//! inside a fragmented message, a continuation with nothing to continue
//! (1002), and UTF-8 checked over the whole reassembled message, not per
//! fragment (1007 when it is invalid across the split, accepted when a valid
//! character is split). After each, the conversation's other sockets got
//! nothing: the next frame they see is a sentinel message sent afterwards.

use serde_json::json;

use crate::harness::*;

/// Alice's raw socket to break the rules on, and Bob's ordinary one, in one
/// conversation; `sentinel` checks Bob got nothing before the next message.
struct Setup {
    server: Server,
    conv: u64,
    alice: String,
    raw: RawWs,
    b: Ws,
}

async fn setup() -> Setup {
    let server = Server::start();
    let (alice, bob) = (user("alice"), user("bob"));
    let conv = server.create_conversation(&alice, &[&bob]).await;
    let raw = server.raw_chat(conv, &alice).await;
    let b = server.ws_chat(conv, &bob).await;
    Setup {
        server,
        conv,
        alice,
        raw,
        b,
    }
}

impl Setup {
    /// A fresh socket of Alice's says something; it is the next thing Bob sees.
    async fn sentinel(&mut self) {
        let mut a = self.server.ws_chat(self.conv, &self.alice).await;
        let text = format!("sentinel {}", rand::random::<u32>());
        let echo = say(&mut a, &text).await;
        assert_eq!(
            recv_json(&mut self.b).await,
            echo,
            "the first thing Bob sees after the bad frames is the sentinel"
        );
    }
}

/// The start of a chat message's JSON, up to its text.
const HEAD: &[u8] = br#"{"type":"chat_message","message":""#;

#[tokio::test]
async fn reserved_opcodes_0x3_to_0x7_and_0xb_to_0xf_are_closed_1002() {
    for opcode in (0x3..=0x7).chain(0xB..=0xF) {
        let mut s = setup().await;
        s.raw.send_frame(true, opcode, b"{}").await;
        assert_eq!(
            s.raw.expect_close().await,
            Some(1002),
            "a frame with reserved opcode {opcode:#x}"
        );
        s.sentinel().await;
    }
}

#[tokio::test]
async fn a_data_frame_inside_a_fragmented_message_is_closed_1002() {
    for interloper in [OP_TEXT, OP_BINARY] {
        let mut s = setup().await;
        s.raw.send_frame(false, OP_TEXT, HEAD).await;
        let whole = json!({"type": "chat_message", "message": "interleaved"}).to_string();
        s.raw.send_frame(true, interloper, whole.as_bytes()).await;
        assert_eq!(
            s.raw.expect_close().await,
            Some(1002),
            "opcode {interloper:#x} while a text message is unfinished"
        );
        s.sentinel().await;
    }
}

#[tokio::test]
async fn a_continuation_frame_with_no_message_to_continue_is_closed_1002() {
    for fin in [true, false] {
        let mut s = setup().await;
        let whole = json!({"type": "chat_message", "message": "orphan"}).to_string();
        s.raw.send_frame(fin, OP_CONT, whole.as_bytes()).await;
        assert_eq!(
            s.raw.expect_close().await,
            Some(1002),
            "an orphan continuation (fin {fin})"
        );
        s.sentinel().await;
    }
}

#[tokio::test]
async fn invalid_utf8_across_fragments_is_closed_1007() {
    let mut s = setup().await;
    // 0xC3 starts a two-byte character; the next fragment does not finish it.
    let mut first = HEAD.to_vec();
    first.push(0xC3);
    s.raw.send_frame(false, OP_TEXT, &first).await;
    s.raw.send_frame(true, OP_CONT, b"(\"}").await;
    assert_eq!(s.raw.expect_close().await, Some(1007));
    s.sentinel().await;
}

#[tokio::test]
async fn a_valid_character_split_across_fragments_is_accepted() {
    let mut s = setup().await;
    // "é" is C3 A9: one byte in each fragment.
    let mut first = HEAD.to_vec();
    first.extend_from_slice(b"caf\xC3");
    s.raw.send_frame(false, OP_TEXT, &first).await;
    s.raw.send_frame(true, OP_CONT, b"\xA9\"}").await;
    let echo = s.raw.recv_json().await;
    assert_eq!(echo["content"], "café", "{echo}");
    assert_eq!(recv_json(&mut s.b).await, echo);
}
