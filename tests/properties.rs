//! Properties over arbitrary input: message text survives every hop byte for
//! byte (through the real server: framing, fragments, parser, sequencer,
//! store, broadcast, REST history JSON; and hop by hop in process, down to
//! the event log), and the frame decoder round-trips whatever a client masks.

#[path = "contract/harness.rs"]
mod harness;

use parley::ids::{ConversationId, MessageId, Seq};
use parley::protocol::{self, ChatEvent, Command, MessageView, Micros};
use parley::store::{Change, EventKind, Message, SledStore, Store};
use parley::wire::{self as frame, OpCode};
use pollster::block_on;
use proptest::prelude::*;
use proptest::sample::Index;

/// The server's default `--max-message-chars`.
const MAX_CHARS: usize = 4000;

/// Characters that stress JSON and text handling, mixed into arbitrary ones.
const AWKWARD: &str = concat!(
    "\0\"\\/\n\r\t\u{8}\u{c}\u{1b}\u{7f}\u{80}\u{85}\u{a0}\u{ad} {}<&'",
    "\u{200b}\u{200d}\u{2028}\u{2029}\u{3000}\u{feff}\u{fffd}\u{ffff}\u{10ffff}",
    "éß中😀👍🏽\u{1f1fa}\u{1f1f8}",
);

fn any_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => any::<char>(),
        3 => proptest::sample::select(AWKWARD.chars().collect::<Vec<_>>()),
        2 => proptest::char::range(' ', '~'),
        1 => proptest::char::range('\0', '\u{1f}'),
    ]
}

/// Text a client may send: arbitrary Unicode, 1..=4000 code points, not
/// blank after trimming. Lengths near the limit are drawn as often as short ones.
fn message_text() -> impl Strategy<Value = String> {
    let len = prop_oneof![1..=64usize, 1..=MAX_CHARS, (MAX_CHARS - 8)..=MAX_CHARS];
    len.prop_flat_map(|n| proptest::collection::vec(any_char(), n))
        .prop_map(|chars| chars.into_iter().collect::<String>())
        .prop_filter("non-empty after trimming", |s| !s.trim().is_empty())
}

/// JSON as a Python client with `json.dumps` defaults writes it: every
/// non-ASCII character as `\uXXXX` (astral ones as surrogate pairs).
fn ascii_json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2 + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

/// The frame a client sends for `text`: serde_json's encoding (as
/// `JSON.stringify` writes it: UTF-8, controls escaped) or the all-ASCII one.
fn client_frame(text: &str, ascii: bool) -> Vec<u8> {
    if ascii {
        format!(
            r#"{{"type":"chat_message","message":{}}}"#,
            ascii_json_string(text)
        )
        .into_bytes()
    } else {
        serde_json::to_vec(&serde_json::json!({"type": "chat_message", "message": text})).unwrap()
    }
}

fn content_of(event_json: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(event_json).expect("the event is JSON");
    v["content"].as_str().expect("'content' is a string").to_owned()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_text_survives_parser_encoder_store_and_event_log_byte_for_byte(
        text in message_text(),
        ascii in any::<bool>(),
    ) {
        // Send: the client's frame, parsed in place as the socket does.
        let mut frame = client_frame(&text, ascii);
        let parsed = match protocol::parse_command(&mut frame, MAX_CHARS) {
            Ok(Command::Send { text }) => text.into_owned(),
            other => panic!("a valid chat_message was refused: {other:?}"),
        };
        prop_assert_eq!(parsed.as_bytes(), text.as_bytes());

        // Broadcast: the event as it goes out live.
        let message = Message {
            id: MessageId(1),
            conversation: ConversationId(1),
            sender: "alice".into(),
            content: parsed,
            timestamp: Micros(1_700_000_000_000_000),
            edited: false,
            deleted: false,
            seq: Seq(1),
        };
        let mut event = Vec::new();
        protocol::encode_chat_event(
            &mut event,
            &ChatEvent::Created(MessageView {
                id: message.id.0,
                sender: &message.sender,
                content: &message.content,
                timestamp: message.timestamp,
                edited: None,
            }),
        );
        let broadcast = content_of(&event);
        prop_assert_eq!(broadcast.as_bytes(), text.as_bytes());

        // Store, then history and the event log (what a resume replays).
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), None).unwrap();
        let change = Change::Chat {
            message: &message,
            kind: EventKind::Created,
            seq: message.seq,
            payload: &event,
            notifications: &[],
        };
        let mut group = store.begin().unwrap();
        group.apply(change).unwrap();
        group.commit().unwrap();
        let page = block_on(store.history(ConversationId(1), None, 50)).unwrap();
        prop_assert_eq!(page.items.len(), 1);
        prop_assert_eq!(page.items[0].content.as_bytes(), text.as_bytes());
        let replay = block_on(store.events_after(ConversationId(1), Seq(0), 10)).unwrap();
        prop_assert_eq!(replay.items.len(), 1);
        prop_assert_eq!(&replay.items[0].payload[..], &event[..]);
        let replayed = content_of(&replay.items[0].payload);
        prop_assert_eq!(replayed.as_bytes(), text.as_bytes());
    }
}

/// Fails unless `got` is `want` byte for byte, naming the first difference
/// (not printing texts of thousands of characters).
fn same_bytes(got: &str, want: &str, what: &str) {
    if got.as_bytes() != want.as_bytes() {
        let at = got
            .bytes()
            .zip(want.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: {} bytes, the sent text {} bytes; first difference at byte {at}",
            got.len(),
            want.len()
        );
    }
}

/// The README's property, end to end: any text a client sends, in one frame
/// or split into two fragments anywhere (even inside a character), comes
/// back byte for byte in the broadcast to another participant and in REST
/// history, through the real server (spawned once, as a user starts it).
#[test]
fn any_text_survives_send_store_history_and_broadcast_byte_for_byte() {
    use harness::*;
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (server, conv, alice, bob) = rt.block_on(async {
        let server = Server::start();
        let (alice, bob) = (user("alice"), user("bob"));
        let conv = server.create_conversation(&alice, &[&bob]).await;
        (server, conv, alice, bob)
    });
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    let strategy = (message_text(), any::<bool>(), any::<Index>());
    runner
        .run(&strategy, |(text, ascii, split)| {
            rt.block_on(async {
                let mut raw = server.raw_chat(conv, &alice).await;
                let mut b = server.ws_chat(conv, &bob).await;
                let frame = client_frame(&text, ascii);
                let at = split.index(frame.len() + 1);
                if at == 0 || at == frame.len() {
                    raw.send_frame(true, OP_TEXT, &frame).await;
                } else {
                    raw.send_frame(false, OP_TEXT, &frame[..at]).await;
                    raw.send_frame(true, OP_CONT, &frame[at..]).await;
                }
                let echo = raw.recv_json().await;
                let broadcast = recv_json(&mut b).await;
                assert!(echo == broadcast, "the sender's echo and Bob's broadcast differ");
                let got = broadcast["content"].as_str().expect("content");
                same_bytes(got, &text, "broadcast content");
                let history = server.history(conv, &alice).await;
                assert_eq!(history[0]["id"], broadcast["id"], "the newest in history");
                let stored = history[0]["content"].as_str().expect("content");
                same_bytes(stored, &text, "history content");
            });
            Ok(())
        })
        .unwrap();
}

/// A payload length: all of 0..=70,000, with the header-size boundaries
/// (125/126, 65,535/65,536) drawn often.
fn payload_len() -> impl Strategy<Value = usize> {
    prop_oneof![0..=130usize, 65_530..=65_541usize, 0..=70_000usize]
}

/// What a client writes: a masked frame with the shortest length encoding.
fn masked(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 14);
    v.push(b0);
    match payload.len() {
        n @ 0..=125 => v.push(0x80 | n as u8),
        n @ 126..=65_535 => {
            v.push(0x80 | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(0x80 | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn any_masked_frame_split_anywhere_waits_for_the_rest_then_yields_the_payload(
        payload in payload_len().prop_flat_map(|n| proptest::collection::vec(any::<u8>(), n)),
        mask in any::<[u8; 4]>(),
        (b0, opcode) in proptest::sample::select(&[
            (0x81u8, OpCode::Text),
            (0x82, OpCode::Binary),
            (0x01, OpCode::Text),
            (0x02, OpCode::Binary),
            (0x80, OpCode::Continuation),
            (0x00, OpCode::Continuation),
        ][..]),
        split in any::<Index>(),
        slack in prop_oneof![Just(0usize), 0..=65_536usize],
        trailing in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let wire = masked(b0, &payload, mask);
        let max_payload = payload.len() + slack;

        // A strict prefix, as a read that stopped short leaves it.
        let cut = split.index(wire.len());
        let mut part = wire[..cut].to_vec();
        let mut needed = 0;
        prop_assert_eq!(frame::decode(&mut part, max_payload, &mut needed), Ok(None));
        prop_assert!(needed > cut && needed <= wire.len(), "needed {} of {}", needed, wire.len());
        if cut >= wire.len() - payload.len() - 4 {
            // The header is in: it knows the whole frame's size.
            prop_assert_eq!(needed, wire.len());
        }

        // The whole frame, with the start of the next one behind it.
        let mut whole = wire.clone();
        whole.extend_from_slice(&trailing);
        let f = frame::decode(&mut whole, max_payload, &mut needed)
            .expect("a valid frame")
            .expect("a whole frame");
        prop_assert_eq!(f.fin, b0 & 0x80 != 0);
        prop_assert_eq!(f.opcode, opcode);
        prop_assert_eq!(f.len, wire.len());
        prop_assert_eq!(&whole[f.payload], &payload[..]);
        prop_assert_eq!(&whole[wire.len()..], &trailing[..]);
    }
}
