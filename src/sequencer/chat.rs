//! Conversations and their messages: create a conversation; send, edit and
//! delete a message (Part A), with the notifications a new message causes.

use std::sync::Arc;

use smallvec::SmallVec;

use super::{WriteError, Writer};
use crate::ids::{ConversationId, MessageId, Seq};
use crate::outbox::Outbox;
use crate::protocol::{self, ChatEvent, MessageView, Micros, Rejection};
use crate::store::{Change, Conversation, EventKind, Group, Message, Notification, StoreError};

use super::ChatOp;

/// Conversations whose participant lists are kept in memory.
const PARTICIPANT_CACHE: usize = 100_000;

/// Why a chat command was not done.
enum ChatError {
    /// Told to the sender's socket only (`not_found`, `forbidden`).
    Rejected(Rejection),
    Store(StoreError),
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        ChatError::Store(e)
    }
}

impl Writer {
    pub(super) fn chat(
        &mut self,
        g: &mut dyn Group,
        conversation: ConversationId,
        op: ChatOp,
        outbox: Arc<Outbox>,
    ) {
        // Who gets a notification for a new message was decided when the
        // group began (see `Writer::notifying`), one entry per new message.
        let absent = match op {
            ChatOp::Send(_) => self.absent.pop_front().flatten(),
            ChatOp::Edit(..) | ChatOp::Delete(_) => None,
        };
        match self.chat_op(g, conversation, &outbox.user, op, absent) {
            Ok(()) => self.out.accepted(outbox),
            Err(ChatError::Rejected(r)) => self.out.reject(outbox, r),
            Err(ChatError::Store(e)) => {
                tracing::error!("chat write failed: {}", e.chain());
                self.out.reject(outbox, protocol::UNAVAILABLE);
            }
        }
    }

    /// Validates `op` against the stored message (edits and deletes), then
    /// records its event.
    fn chat_op(
        &mut self,
        g: &mut dyn Group,
        conversation: ConversationId,
        user: &Arc<str>,
        op: ChatOp,
        absent: Option<SmallVec<[Arc<str>; 4]>>,
    ) -> Result<(), ChatError> {
        // The event's position in the log. A message keeps the position of
        // its creation: where `?after=<id>` resumes from.
        let seq = g.next_seq(conversation)?;
        let (message, kind) = match op {
            ChatOp::Send(text) => {
                #[cfg(feature = "test-hooks")]
                crate::test_hooks::panic_if_asked("sequencer", &text);
                let m = Message {
                    id: g.next_message()?,
                    conversation,
                    sender: user.to_string(),
                    content: text.into(),
                    timestamp: Micros::now(),
                    edited: false,
                    deleted: false,
                    seq,
                };
                (m, EventKind::Created)
            }
            ChatOp::Edit(id, content) => {
                let mut m = existing(g, conversation, id, user)?;
                m.content = content.into();
                m.edited = true;
                (m, EventKind::Edited)
            }
            ChatOp::Delete(id) => {
                let mut m = existing(g, conversation, id, user)?;
                m.deleted = true;
                (m, EventKind::Deleted)
            }
        };
        self.record(g, &message, kind, seq, absent)
    }

    /// Encodes the event once, stores it with the notifications it causes,
    /// and queues its frame for the conversation.
    fn record(
        &mut self,
        g: &mut dyn Group,
        message: &Message,
        kind: EventKind,
        seq: Seq,
        absent: Option<SmallVec<[Arc<str>; 4]>>,
    ) -> Result<(), ChatError> {
        self.scratch.clear();
        protocol::encode_chat_event(&mut self.scratch, &event(message, kind));
        let notifications = match kind {
            EventKind::Created => self.notify_absent(g, message, absent)?,
            EventKind::Edited | EventKind::Deleted => SmallVec::new(),
        };
        let write_kind = match kind {
            EventKind::Created => "message",
            EventKind::Edited => "edit",
            EventKind::Deleted => "delete",
        };
        let json = std::mem::take(&mut self.scratch);
        let change = Change::Chat {
            message,
            kind,
            seq,
            payload: &json,
            notifications: &notifications,
        };
        let applied = self.apply(g, change, write_kind);
        self.scratch = json;
        applied?;
        self.out.event(message.conversation, seq, &self.scratch);
        for n in &notifications {
            self.w.metrics.write("notification");
            self.queue_notification(g, n);
        }
        Ok(())
    }

    /// A notification for each participant with no socket watching the
    /// conversation, the sender excepted.
    fn notify_absent(
        &mut self,
        g: &mut dyn Group,
        message: &Message,
        absent: Option<SmallVec<[Arc<str>; 4]>>,
    ) -> Result<SmallVec<[Notification; 4]>, StoreError> {
        let absent = match absent {
            Some(absent) => absent,
            None => {
                let participants = self.participants(g, message.conversation)?;
                self.w
                    .presence
                    .absent(message.conversation, &participants, &message.sender)
            }
        };
        let mut out = SmallVec::new();
        if absent.is_empty() {
            // In a room where everyone is watching, a message allocates no
            // notification text.
            return Ok(out);
        }
        let text = format!("New message from {}", message.sender);
        for p in absent {
            out.push(Notification {
                id: g.next_notification()?,
                user: p.to_string(),
                message: text.clone(),
                is_read: false,
                timestamp: message.timestamp,
            });
        }
        Ok(out)
    }

    pub(super) fn participants(
        &mut self,
        g: &mut dyn Group,
        conversation: ConversationId,
    ) -> Result<Arc<[Arc<str>]>, StoreError> {
        if let Some(p) = self.participants.get(&conversation) {
            return Ok(p.clone());
        }
        let list: Arc<[Arc<str>]> = match g.conversation(conversation)? {
            Some(c) => c.participants.iter().map(|p| Arc::from(p.as_str())).collect(),
            None => Arc::from([]),
        };
        if self.participants.len() >= PARTICIPANT_CACHE {
            self.participants.clear();
        }
        self.participants.insert(conversation, list.clone());
        Ok(list)
    }

    pub(super) fn create_conversation(
        &mut self,
        g: &mut dyn Group,
        creator: &str,
        title: Option<String>,
        others: Vec<String>,
    ) -> Result<Conversation, WriteError> {
        let mut participants = vec![creator.to_string()];
        for p in others {
            if !participants.contains(&p) {
                participants.push(p);
            }
        }
        let conv = Conversation {
            id: g.next_conversation()?,
            title,
            participants,
            created_at: Micros::now(),
        };
        self.apply(g, Change::Conversation(&conv), "conversation")?;
        Ok(conv)
    }
}

/// The message `id` of this conversation, if it is live and `user` sent it;
/// Part C's order: `not_found` before `forbidden`.
fn existing(
    g: &mut dyn Group,
    conversation: ConversationId,
    id: MessageId,
    user: &str,
) -> Result<Message, ChatError> {
    match g.message(conversation, id)? {
        Some(m) if !m.deleted => {
            if m.sender == user {
                Ok(m)
            } else {
                Err(ChatError::Rejected(protocol::FORBIDDEN))
            }
        }
        _ => Err(ChatError::Rejected(protocol::NOT_FOUND)),
    }
}

/// The event announcing `message`'s new state, as Part A shows it.
fn event(message: &Message, kind: EventKind) -> ChatEvent<'_> {
    match kind {
        EventKind::Created => ChatEvent::Created(MessageView {
            id: message.id.0,
            sender: &message.sender,
            content: &message.content,
            timestamp: message.timestamp,
            edited: None,
        }),
        EventKind::Edited => ChatEvent::Edited {
            id: message.id.0,
            content: &message.content,
        },
        EventKind::Deleted => ChatEvent::Deleted { id: message.id.0 },
    }
}
