//! What parley keeps: conversations, messages, each conversation's ordered
//! event log, and notifications.
//!
//! Two interfaces, for two kinds of caller:
//! - [`Store`]: reads, from any task. Async, so that a backend across the
//!   network (PostgreSQL) awaits instead of blocking a runtime thread. The
//!   embedded backend answers at once (sled reads are memory-speed).
//! - [`Group`]: writes, from one thread only, the [`crate::sequencer`]:
//!   the one explicit blocking boundary. A group is begun, each change is
//!   applied in order (reads through the group see its earlier changes),
//!   and the group is committed: made durable as a whole, so one flush (or
//!   one transaction) serves many writes. The backend assigns ids, so a
//!   backend shared by several nodes can hand them out itself.
//!
//! Backends: [`SledStore`] (embedded, the default) and [`MemoryStore`]
//! (memory only: for unit tests of the layers above; it loses everything
//! when the process ends). `conformance` holds the tests every backend
//! must pass.

#[cfg(test)]
mod conformance;

/// Opens a sled-backed store in a test, retrying (bounded) while sled's
/// lock is still held: a reopen right after the last handle dropped may
/// find it held a moment longer (sled's threads let go of the database
/// after its owner), as a restarted process would not.
#[cfg(test)]
pub(crate) fn reopen<S>(open: impl Fn() -> Result<S>) -> S {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open() {
            Ok(s) => return s,
            Err(StoreError::Open { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open: {}", e.chain()),
        }
    }
}
pub mod log;
mod memory;
mod postgres;
mod sled_store;
mod wal_store;

pub use memory::MemoryStore;
pub use postgres::{PgStore, Requirement};
pub use sled_store::SledStore;
pub use wal_store::{WalOptions, WalStore};

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, MessageId, NotificationId, Seq};
use crate::protocol::Micros;

/// The cause of an engine failure, kept whole and cheap to clone (a group's
/// failure is told to every writer in it).
pub type Source = Arc<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The engine failed to read or write.
    #[error("store I/O error")]
    Io(#[source] Source),
    /// The store failed earlier and refuses everything until a restart
    /// (sled 0.34 keeps its first I/O error for good).
    #[error("the store failed to write earlier (disk full?); restart parley once it is fixed")]
    Failed,
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("{message}")]
    Open {
        message: String,
        #[source]
        source: Option<Source>,
    },
    /// The database (cluster mode) does not answer now; writes resume by
    /// themselves once it does.
    #[error("{0} does not answer; writes resume when it does")]
    Unreachable(&'static str),
    #[error("the disk is nearly full ({free} bytes free, below --min-free-bytes); writes resume when space returns")]
    Full { free: u64 },
}

impl StoreError {
    pub fn io(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
        StoreError::Io(Arc::new(e))
    }

    pub fn open(message: String, source: impl std::error::Error + Send + Sync + 'static) -> StoreError {
        StoreError::Open {
            message,
            source: Some(Arc::new(source)),
        }
    }

    /// The error and every cause, on one line (for HTTP error details and
    /// logs, which show no source chain by themselves).
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(s) = cur {
            out.push_str(": ");
            out.push_str(&s.to_string());
            cur = s.source();
        }
        out
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Conversation {
    pub id: ConversationId,
    pub title: Option<String>,
    /// The creator first, then the others in the order given.
    pub participants: Vec<String>,
    pub created_at: Micros,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Message {
    pub id: MessageId,
    pub conversation: ConversationId,
    pub sender: String,
    pub content: String,
    pub timestamp: Micros,
    pub edited: bool,
    pub deleted: bool,
    /// Position of this message's creation in the conversation's event log:
    /// where a resume `?after=<id>` starts.
    pub seq: Seq,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Notification {
    pub id: NotificationId,
    pub user: String,
    pub message: String,
    pub is_read: bool,
    pub timestamp: Micros,
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
    pub seq: Seq,
    pub kind: EventKind,
    pub message: MessageId,
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
        seq: Seq,
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

impl<T> Page<T> {
    /// Cuts a newest-first scan of up to `limit + 1` items into a page: the
    /// extra item only says that something older remains. Every backend
    /// reads one more than the limit and ends with this.
    pub(crate) fn cut(mut items: Vec<T>, limit: usize, id: impl Fn(&T) -> u64) -> Page<T> {
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(&id)
        } else {
            None
        };
        Page { items, next }
    }
}

/// A bounded replay: the events after a point, and, when more were missed
/// than the bound allows, the message id the replay follows instead.
#[derive(Debug, Clone)]
pub struct Replay<T> {
    pub truncated_after: Option<u64>,
    pub items: Vec<T>,
}

/// Reads, from any task.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>>;
    async fn conversation_exists(&self, id: ConversationId) -> Result<bool>;
    async fn is_participant(&self, conversation: ConversationId, user: &str) -> Result<bool>;
    /// The user's conversations, oldest first.
    async fn conversations_of(&self, user: &str) -> Result<Vec<Conversation>>;

    async fn message(&self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>>;
    /// Live messages older than `before`, newest first: one range scan.
    async fn history(
        &self,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<Page<Message>>;
    /// Events logged after `after`, oldest first, at most `max` (the newest);
    /// `truncated_after` is a message id.
    async fn events_after(
        &self,
        conversation: ConversationId,
        after: Seq,
        max: usize,
    ) -> Result<Replay<LoggedEvent>>;

    async fn notification(&self, id: NotificationId) -> Result<Option<Notification>>;
    async fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<NotificationId>,
        limit: usize,
    ) -> Result<Page<Notification>>;
    async fn unread_count(&self, user: &str) -> Result<u64>;
    /// The user's notifications with an id above `after`, oldest first, at
    /// most `max`; `truncated_after` is a notification id.
    async fn notifications_after(
        &self,
        user: &str,
        after: NotificationId,
        max: usize,
    ) -> Result<Replay<Notification>>;

    /// The position of the conversation's newest event (0: none yet).
    async fn last_seq(&self, conversation: ConversationId) -> Result<Seq> {
        let newest = self.events_after(conversation, Seq(0), 1).await?;
        Ok(newest.items.last().map_or(Seq(0), |e| e.seq))
    }
    /// The user's newest notification (0: none yet).
    async fn last_notification(&self, user: &str) -> Result<NotificationId> {
        let newest = self.notifications(user, false, None, 1).await?;
        Ok(newest.items.first().map_or(NotificationId(0), |n| n.id))
    }

    /// Whether writes can be taken now: the store works and its disk has
    /// room (for `/healthz`, and checked by the sequencer before each group).
    fn writable(&self) -> Result<()>;
    /// Begins a group of writes. Only the sequencer calls this, and never
    /// with another group open (one whose commit is in flight is not open:
    /// see [`Group::start_commit`]).
    fn begin(&self) -> Result<Box<dyn Group + '_>>;
    /// Begins a group that will touch what `plan` names. A backend shared
    /// by several nodes locks it all here, in one order, so that two nodes'
    /// groups never wait on each other in a circle, and reads it in one
    /// round trip; an embedded backend needs none of it.
    fn begin_planned(&self, plan: &Plan) -> Result<Box<dyn Group + '_>> {
        let _ = plan;
        self.begin()
    }
    /// Makes everything committed so far durable (at shutdown).
    fn flush(&self) -> Result<()>;
}

/// What a group of writes will touch, known before it begins (see
/// [`Store::begin_planned`]). Anything a group touches that its plan did not
/// name still works; a shared backend then locks it as it goes, which two
/// nodes could do in opposite orders.
#[derive(Debug, Default)]
pub struct Plan {
    /// Conversations written to: their event log positions and message ids
    /// are issued in commit order.
    pub conversations: Vec<ConversationId>,
    /// Messages edited or deleted.
    pub messages: Vec<(ConversationId, MessageId)>,
    /// Notifications marked read.
    pub notifications: Vec<NotificationId>,
    /// Users whose unread notifications are all marked read.
    pub unread: Vec<String>,
    /// How many messages the group may create.
    pub new_messages: usize,
}

impl Plan {
    pub fn clear(&mut self) {
        self.conversations.clear();
        self.messages.clear();
        self.notifications.clear();
        self.unread.clear();
        self.new_messages = 0;
    }
}

/// One group of writes, applied in order and made durable together by
/// [`Group::commit`]. Dropped without a commit, what it applied may or may
/// not survive a crash: nothing of it has been shown to anyone.
pub trait Group {
    fn conversation(&mut self, id: ConversationId) -> Result<Option<Conversation>>;
    fn message(&mut self, conversation: ConversationId, id: MessageId) -> Result<Option<Message>>;
    fn notification(&mut self, id: NotificationId) -> Result<Option<Notification>>;
    /// The user's unread notifications, oldest first.
    fn unread(&mut self, user: &str) -> Result<Vec<NotificationId>>;

    /// A new id, above every id issued before, across restarts too.
    fn next_conversation(&mut self) -> Result<ConversationId>;
    fn next_message(&mut self) -> Result<MessageId>;
    fn next_notification(&mut self) -> Result<NotificationId>;
    /// The next position in `conversation`'s event log.
    fn next_seq(&mut self, conversation: ConversationId) -> Result<Seq>;

    /// Says, once the group knows, whose notifications it will create and
    /// how many, before it asks for their ids: a shared backend locks those
    /// users, so that each user's notification ids increase in commit order
    /// whichever node issued them.
    fn notifying(&mut self, users: &[&str], count: usize) -> Result<()> {
        let _ = (users, count);
        Ok(())
    }

    /// The newest notification of `user` before this group, where the
    /// backend knows it (a shared one does, for the users named to
    /// [`Group::notifying`]): a node that receives the group's
    /// notifications can tell from it whether it missed some.
    fn notification_before(&mut self, user: &str) -> Option<NotificationId> {
        let _ = user;
        None
    }

    /// Applies one change atomically: a crash leaves it whole or absent.
    fn apply(&mut self, change: Change<'_>) -> Result<()>;
    /// Makes every change of the group durable.
    fn commit(self: Box<Self>) -> Result<()>;
    /// Starts making the group durable and returns without waiting, so that
    /// the writer can handle the next group meanwhile (its reads see this
    /// one's changes; no reader elsewhere does until [`Commit::wait`] says
    /// it is durable). At most one commit is in flight: the next group is
    /// begun, but not committed, before this one is waited for. Backends
    /// without a background commit do the whole commit here.
    fn start_commit(self: Box<Self>) -> Box<dyn Commit> {
        Box::new(Done(Some(self.commit())))
    }
}

/// A group's commit in flight.
pub trait Commit: Send {
    /// Waits until the group is durable (or failed); only then may anything
    /// of it be shown.
    fn wait(self: Box<Self>) -> Result<()>;
}

/// A commit that finished when it started.
struct Done(Option<Result<()>>);

impl Commit for Done {
    fn wait(mut self: Box<Self>) -> Result<()> {
        self.0.take().unwrap_or(Ok(()))
    }
}
