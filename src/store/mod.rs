//! What parley keeps: conversations, messages, each conversation's ordered
//! event log, and notifications.
//!
//! [`Store`] is the seam for a second backend (PostgreSQL as the system of
//! record for several nodes): the socket and HTTP code see only this trait.
//! Its writes are called by one thread, the [`crate::sequencer`], which owns
//! ids and order; each [`Change`] is atomic, and [`Store::sync`] makes every
//! change before it durable, so one sync serves a whole group of writes.

mod sled_store;

pub use sled_store::SledStore;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::protocol::Micros;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error: {0}")]
    Io(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Open(String),
    #[error("the disk is nearly full ({free} bytes free, below --min-free-bytes); writes resume when space returns")]
    Full { free: u64 },
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Conversation {
    pub id: u64,
    pub title: Option<String>,
    /// The creator first, then the others in the order given.
    pub participants: Vec<String>,
    pub created_at: Micros,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Message {
    pub id: u64,
    pub conversation: u64,
    pub sender: String,
    pub content: String,
    pub timestamp: Micros,
    pub edited: bool,
    pub deleted: bool,
    /// Position of this message's creation in the conversation's event log:
    /// where a resume `?after=<id>` starts.
    pub seq: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Notification {
    pub id: u64,
    pub user: String,
    pub message: String,
    pub is_read: bool,
    pub timestamp: Micros,
}

/// The last id issued of each kind. Persisted with every change, so ids keep
/// increasing across restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub conversation: u64,
    pub message: u64,
    pub notification: u64,
    pub event: u64,
}

/// Which kind of event a log entry is; a truncated replay names the newest
/// message created before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Edited,
    Deleted,
}

/// One entry of a conversation's event log: exactly the frame payload that
/// went out live.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    pub seq: u64,
    pub kind: EventKind,
    pub message: u64,
    pub payload: Bytes,
}

/// One atomic write. A crash leaves each change whole or absent.
pub enum Change<'a> {
    Conversation(&'a Conversation),
    /// A message created, edited or deleted: its new state, the event that
    /// announced it, and the notifications it caused.
    Chat {
        message: &'a Message,
        kind: EventKind,
        /// Position in the conversation's event log.
        seq: u64,
        /// The event's JSON, exactly as it goes out.
        payload: &'a [u8],
        notifications: &'a [Notification],
    },
    /// New notifications, or existing ones whose `is_read` changed.
    Notifications(&'a [Notification]),
}

/// A page of newest-first results; `next` is the `before` of the next page,
/// `None` as soon as nothing older remains.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<u64>,
}

/// A bounded replay: the events after a point, and, when more were missed
/// than the bound allows, the message id the replay follows instead.
#[derive(Debug, Clone)]
pub struct Replay<T> {
    pub truncated_after: Option<u64>,
    pub items: Vec<T>,
}

pub trait Store: Send + Sync + 'static {
    /// Where counting resumes: above every id issued or reserved.
    fn counters(&self) -> Result<Counters>;
    /// Durably reserves ids up to `upto` (flushed before it returns).
    fn reserve(&self, upto: &Counters) -> Result<()>;

    fn conversation(&self, id: u64) -> Result<Option<Conversation>>;
    fn conversation_exists(&self, id: u64) -> Result<bool>;
    fn is_participant(&self, conversation: u64, user: &str) -> Result<bool>;
    /// The user's conversations, oldest first.
    fn conversations_of(&self, user: &str) -> Result<Vec<Conversation>>;

    fn message(&self, conversation: u64, id: u64) -> Result<Option<Message>>;
    /// Live messages older than `before`, newest first: one range scan.
    fn history(&self, conversation: u64, before: Option<u64>, limit: usize) -> Result<Page<Message>>;
    /// Events logged after `after_seq`, oldest first, at most `max` (the newest).
    fn events_after(&self, conversation: u64, after_seq: u64, max: usize) -> Result<Replay<LoggedEvent>>;

    fn notification(&self, id: u64) -> Result<Option<Notification>>;
    fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page<Notification>>;
    fn unread(&self, user: &str) -> Result<Vec<u64>>;
    /// The user's notifications with an id above `after`, oldest first, at most `max`.
    fn notifications_after(&self, user: &str, after: u64, max: usize) -> Result<Replay<Notification>>;

    /// Applies one change atomically, persisting `counters` with it.
    fn commit(&self, change: Change<'_>, counters: &Counters) -> Result<()>;
    /// Makes every committed change durable.
    fn sync(&self) -> Result<()>;
    /// Whether writes can be taken now: the store works and its disk has
    /// room (for `/healthz`, and checked by the sequencer before each group).
    fn writable(&self) -> Result<()>;
}
