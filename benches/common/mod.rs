//! What the store and log benches both write: a typical chat message and
//! its event JSON, built as the sequencer builds them.

use parley::ids::{ConversationId, MessageId, Seq};
use parley::protocol::{self, ChatEvent, MessageView, Micros};
use parley::store::Message;

const SENDERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
const TEXT: &str = "hi everyone, the release notes are in the doc";

/// Message `id` of `conversation` at log position `seq` (45 characters,
/// one of four senders), and its ~150-byte `message` event JSON.
pub fn chat_message(id: MessageId, conversation: ConversationId, seq: Seq) -> (Message, Vec<u8>) {
    let m = Message {
        id,
        conversation,
        sender: SENDERS[(id.0 % 4) as usize].to_string(),
        content: TEXT.to_string(),
        timestamp: Micros(1_767_225_600_000_000 + id.0),
        edited: false,
        deleted: false,
        seq,
    };
    let mut json = Vec::with_capacity(256);
    protocol::encode_chat_event(
        &mut json,
        &ChatEvent::Created(MessageView {
            id: m.id.0,
            sender: &m.sender,
            content: &m.content,
            timestamp: m.timestamp,
            edited: None,
        }),
    );
    (m, json)
}
