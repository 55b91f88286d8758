//! The one writer: every change to the store goes through here, in one total
//! order, and is broadcast only after it is durable.
//!
//! A dedicated thread takes requests in groups (whatever queued up while the
//! previous group was being flushed), validates each against the store,
//! assigns ids, commits it atomically, then makes the whole group durable
//! with one flush (group commit) and only then publishes. Each
//! conversation's events of a group are encoded once into one buffer of
//! frames, and that one buffer goes to every socket of the conversation.
//!
//! Because this thread is the only publisher, a resuming socket is replayed
//! and subscribed here, between two groups: nothing can be published between
//! the end of its replay and the start of its live stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use smallvec::SmallVec;
use tokio::sync::{mpsc, oneshot};

use crate::config::Durability;
use crate::hub::{Hub, Outbox};
use crate::metrics::Metrics;
use crate::protocol::{self, ChatEvent, MessageView, Micros, NotificationView, Rejection, Rfc3339};
use crate::store::{Change, Conversation, Counters, EventKind, Message, Notification, Store, StoreError};
use crate::wire::{self as frame, OpCode};

/// Most requests handled under one flush.
const MAX_GROUP: usize = 1024;
/// Requests waiting for the writer; senders wait beyond it (backpressure).
const QUEUE: usize = 16 * 1024;
/// Ids reserved at a time in `interval` mode (see `Writer::reserve`).
const ID_BLOCK: u64 = 10_000;
/// Conversations whose participant lists are kept in memory.
const PARTICIPANT_CACHE: usize = 100_000;

/// A write that could not be done.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("not found")]
    NotFound,
    #[error("the store cannot be written: {0}")]
    Unavailable(#[from] StoreError),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// What a chat socket asks for, already validated by `protocol`.
#[derive(Debug)]
pub enum ChatOp {
    Send(Box<str>),
    Edit(u64, Box<str>),
    Delete(u64),
}

type Reply<T> = oneshot::Sender<Result<T, WriteError>>;

/// A reply waiting for its group's flush; told the flush error, if any.
type Answer = Box<dyn FnOnce(Option<&StoreError>) + Send>;

pub enum Request {
    Chat {
        conversation: u64,
        user: Arc<str>,
        op: ChatOp,
        /// Where `not_found` / `forbidden` go: the sender's socket only.
        outbox: Arc<Outbox>,
    },
    CreateConversation {
        creator: Arc<str>,
        title: Option<String>,
        participants: Vec<String>,
        reply: Reply<Conversation>,
    },
    Notify {
        user: String,
        text: String,
        reply: Reply<Notification>,
    },
    MarkRead {
        user: Arc<str>,
        id: u64,
        reply: Reply<Notification>,
    },
    ReadAll {
        user: Arc<str>,
        reply: Reply<u64>,
    },
    /// Done after the group is published, so it joins between two groups.
    Resume(Resume),
}

/// A socket that replays what it missed, then goes live (Part D).
pub enum Resume {
    /// Replay the conversation after `after_seq`, then join its live stream.
    Chat {
        conversation: u64,
        after_seq: u64,
        outbox: Arc<Outbox>,
        reply: Reply<()>,
    },
    /// Replay the user's notifications after `after`, then listen live.
    Notifications {
        after: u64,
        outbox: Arc<Outbox>,
        reply: Reply<()>,
    },
}

/// The handle sockets and REST handlers submit requests through.
#[derive(Clone)]
pub struct Sequencer {
    tx: mpsc::Sender<Request>,
}

impl Sequencer {
    /// Starts the writer thread; it ends when every handle is dropped, after
    /// a last flush.
    pub fn start(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        durability: Durability,
        max_replay: usize,
    ) -> Result<(Sequencer, std::thread::JoinHandle<()>), StoreError> {
        let counters = store.counters()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = Writer {
            store,
            hub,
            metrics,
            durability,
            max_replay,
            counters,
            reserved: counters,
            participants: HashMap::new(),
            scratch: Vec::with_capacity(1024),
            out: Outgoing::default(),
        };
        let handle = std::thread::Builder::new()
            .name("parley-sequencer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Io(e.to_string()))?;
        Ok((Sequencer { tx }, handle))
    }

    /// Queues a request without waiting; `Full` hands it back.
    pub fn try_submit(&self, r: Request) -> Result<(), mpsc::error::TrySendError<Request>> {
        self.tx.try_send(r)
    }

    /// A sender to wait for room with, when `try_submit` found the queue full.
    pub fn sender(&self) -> mpsc::Sender<Request> {
        self.tx.clone()
    }

    pub async fn submit(&self, r: Request) -> Result<(), WriteError> {
        self.tx.send(r).await.map_err(|_| WriteError::ShuttingDown)
    }

    /// Submits a request carrying `reply` and waits for its answer.
    pub async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, WriteError> {
        let (tx, rx) = oneshot::channel();
        self.submit(make(tx)).await?;
        rx.await.map_err(|_| WriteError::ShuttingDown)?
    }
}

struct Writer {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    durability: Durability,
    max_replay: usize,
    counters: Counters,
    /// Ids below these may have been shown; see `reserve`.
    reserved: Counters,
    participants: HashMap<u64, Arc<[Arc<str>]>>,
    /// Reused for encoding each event's JSON.
    scratch: Vec<u8>,
    out: Outgoing,
}

/// What one group will publish and answer once it is durable.
#[derive(Default)]
struct Outgoing {
    /// Frames per conversation, in accepted order; `index` finds the entry.
    conversations: Vec<(u64, BytesMut, u64)>,
    index: HashMap<u64, usize>,
    users: Vec<(Arc<str>, BytesMut)>,
    /// Finds a user's entry: a message to a large room notifies thousands.
    user_index: HashMap<Arc<str>, usize>,
    rejections: Vec<(Arc<Outbox>, Rejection)>,
    failed: Vec<Arc<Outbox>>,
    replies: Vec<Answer>,
    resumes: Vec<Resume>,
    writes: usize,
}

impl Outgoing {
    fn conversation(&mut self, id: u64) -> &mut (u64, BytesMut, u64) {
        let i = *self.index.entry(id).or_insert_with(|| {
            self.conversations.push((id, BytesMut::new(), 0));
            self.conversations.len() - 1
        });
        &mut self.conversations[i]
    }

    fn user(&mut self, user: &str) -> &mut BytesMut {
        let i = match self.user_index.get(user) {
            Some(&i) => i,
            None => {
                let name: Arc<str> = Arc::from(user);
                self.users.push((name.clone(), BytesMut::new()));
                self.user_index.insert(name, self.users.len() - 1);
                self.users.len() - 1
            }
        };
        &mut self.users[i].1
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            // A bug that panics on one request must not stop every write of
            // the server: that request is dropped (its caller sees its reply
            // channel close) and the writer goes on.
            // A store that cannot take writes now (disk nearly full, or
            // failed) refuses this group's writes; reads and resumes go on.
            let refusal = self.store.writable().err();
            for r in group.drain(..) {
                if let Some(e) = &refusal {
                    if let Some(r) = self.refuse(r, e) {
                        self.out.resumes.push(r);
                    }
                    continue;
                }
                let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(r)));
                if handled.is_err() {
                    tracing::error!("the sequencer panicked on a request; it was dropped");
                }
            }
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.finish_group())).is_err() {
                tracing::error!("the sequencer panicked while publishing a group");
                self.out = Outgoing::default();
            }
        }
        if let Err(e) = self.store.sync() {
            tracing::error!("final flush failed: {e}");
        }
    }

    fn handle(&mut self, r: Request) {
        match r {
            Request::Chat {
                conversation,
                user,
                op,
                outbox,
            } => self.chat(conversation, &user, op, outbox),
            Request::CreateConversation {
                creator,
                title,
                participants,
                reply,
            } => {
                let r = self.create_conversation(&creator, title, participants);
                self.answer(reply, r);
            }
            Request::Notify { user, text, reply } => {
                let r = self.notify(user, text);
                self.answer(reply, r);
            }
            Request::MarkRead { user, id, reply } => {
                let r = self.mark_read(&user, id);
                self.answer(reply, r);
            }
            Request::ReadAll { user, reply } => {
                let r = self.read_all(&user);
                self.answer(reply, r);
            }
            Request::Resume(r) => self.out.resumes.push(r),
        }
    }

    /// Answers a write with `unavailable` without trying it; hands back a
    /// resume, which only reads.
    fn refuse(&mut self, r: Request, e: &StoreError) -> Option<Resume> {
        let unavailable = || WriteError::Unavailable(StoreError::Io(e.to_string()));
        match r {
            Request::Chat { outbox, .. } => self.out.failed.push(outbox),
            Request::CreateConversation { reply, .. } => drop(reply.send(Err(unavailable()))),
            Request::Notify { reply, .. } => drop(reply.send(Err(unavailable()))),
            Request::MarkRead { reply, .. } => drop(reply.send(Err(unavailable()))),
            Request::ReadAll { reply, .. } => drop(reply.send(Err(unavailable()))),
            Request::Resume(r) => return Some(r),
        }
        None
    }

    /// Answers after the group's flush: with the result if it held, with
    /// `Unavailable` if the flush failed.
    fn answer<T: Send + 'static>(&mut self, reply: Reply<T>, r: Result<T, WriteError>) {
        self.out
            .replies
            .push(Box::new(move |flush_err: Option<&StoreError>| {
                let r = match (r, flush_err) {
                    (Ok(_), Some(e)) => Err(WriteError::Unavailable(StoreError::Io(e.to_string()))),
                    (r, _) => r,
                };
                let _ = reply.send(r);
            }));
    }

    fn commit(&mut self, change: Change<'_>, next: Counters) -> Result<(), StoreError> {
        self.reserve(&next)?;
        self.store.commit(change, &next)?;
        self.counters = next;
        self.out.writes += 1;
        Ok(())
    }

    /// In `interval` mode a crash loses the last writes, and with them the
    /// counters that issued ids clients may already have seen. So ids are
    /// reserved in blocks, durably, before they are used: after a crash,
    /// counting resumes above every id that could have been shown.
    fn reserve(&mut self, next: &Counters) -> Result<(), StoreError> {
        if !matches!(self.durability, Durability::Interval(_)) {
            return Ok(()); // every issued id is flushed before it is shown
        }
        let r = &self.reserved;
        if next.conversation <= r.conversation
            && next.message <= r.message
            && next.notification <= r.notification
            && next.event <= r.event
        {
            return Ok(());
        }
        let reserved = Counters {
            conversation: next.conversation + ID_BLOCK,
            message: next.message + ID_BLOCK,
            notification: next.notification + ID_BLOCK,
            event: next.event + ID_BLOCK,
        };
        self.store.reserve(&reserved)?;
        self.reserved = reserved;
        Ok(())
    }

    fn participants(&mut self, conversation: u64) -> Result<Arc<[Arc<str>]>, StoreError> {
        if let Some(p) = self.participants.get(&conversation) {
            return Ok(p.clone());
        }
        let list: Arc<[Arc<str>]> = match self.store.conversation(conversation)? {
            Some(c) => c.participants.iter().map(|p| Arc::from(p.as_str())).collect(),
            None => Arc::from([]),
        };
        if self.participants.len() >= PARTICIPANT_CACHE {
            self.participants.clear();
        }
        self.participants.insert(conversation, list.clone());
        Ok(list)
    }

    fn chat(&mut self, conversation: u64, user: &Arc<str>, op: ChatOp, outbox: Arc<Outbox>) {
        match self.chat_inner(conversation, user, op) {
            Ok(()) => {}
            Err(ChatError::Rejected(r)) => self.out.rejections.push((outbox, r)),
            Err(ChatError::Store(e)) => {
                tracing::error!("chat write failed: {e}");
                self.out.failed.push(outbox);
            }
        }
    }

    fn chat_inner(&mut self, conversation: u64, user: &Arc<str>, op: ChatOp) -> Result<(), ChatError> {
        let mut next = self.counters;
        next.event += 1;
        let seq = next.event;
        let (message, kind, write_kind) = match op {
            ChatOp::Send(text) => {
                #[cfg(feature = "test-hooks")]
                crate::test_hooks::panic_if_asked("sequencer", &text);
                next.message += 1;
                let m = Message {
                    id: next.message,
                    conversation,
                    sender: user.to_string(),
                    content: text.into(),
                    timestamp: Micros::now(),
                    edited: false,
                    deleted: false,
                    seq,
                };
                (m, EventKind::Created, "message")
            }
            ChatOp::Edit(id, content) => {
                let mut m = self.existing(conversation, id, user)?;
                m.content = content.into();
                m.edited = true;
                (m, EventKind::Edited, "edit")
            }
            ChatOp::Delete(id) => {
                let mut m = self.existing(conversation, id, user)?;
                m.deleted = true;
                (m, EventKind::Deleted, "delete")
            }
        };
        self.scratch.clear();
        let event = match kind {
            EventKind::Created => ChatEvent::Created(MessageView {
                id: message.id,
                sender: &message.sender,
                content: &message.content,
                timestamp: message.timestamp,
                edited: None,
            }),
            EventKind::Edited => ChatEvent::Edited {
                id: message.id,
                content: &message.content,
            },
            EventKind::Deleted => ChatEvent::Deleted { id: message.id },
        };
        protocol::encode_chat_event(&mut self.scratch, &event);

        let mut notifications: SmallVec<[Notification; 4]> = SmallVec::new();
        if kind == EventKind::Created {
            let participants = self.participants(conversation)?;
            let absent = self.hub.absent(conversation, &participants, user);
            // Built only when someone is to be notified: in a room where
            // everyone is watching, a message allocates no notification text.
            let text = if absent.is_empty() {
                String::new()
            } else {
                format!("New message from {user}")
            };
            for p in absent {
                next.notification += 1;
                notifications.push(Notification {
                    id: next.notification,
                    user: p.to_string(),
                    message: text.clone(),
                    is_read: false,
                    timestamp: message.timestamp,
                });
            }
        }
        self.reserve(&next)?;
        let scratch = std::mem::take(&mut self.scratch);
        let r = self.store.commit(
            Change::Chat {
                message: &message,
                kind,
                seq,
                payload: &scratch,
                notifications: &notifications,
            },
            &next,
        );
        self.scratch = scratch;
        r?;
        self.counters = next;
        self.out.writes += 1;
        self.metrics.write(write_kind);

        let entry = self.out.conversation(conversation);
        frame::put_frame(&mut entry.1, OpCode::Text, &self.scratch);
        entry.2 += 1;
        for n in &notifications {
            self.metrics.write("notification");
            self.queue_notification(n);
        }
        Ok(())
    }

    /// The message `id` of this conversation, if it is live and `user` sent
    /// it; Part C's order: `not_found` before `forbidden`.
    fn existing(&self, conversation: u64, id: u64, user: &str) -> Result<Message, ChatError> {
        match self.store.message(conversation, id)? {
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

    fn queue_notification(&mut self, n: &Notification) {
        self.scratch.clear();
        protocol::encode_notification(&mut self.scratch, &notification_view(n));
        let scratch = std::mem::take(&mut self.scratch);
        frame::put_frame(self.out.user(&n.user), OpCode::Text, &scratch);
        self.scratch = scratch;
    }

    fn create_conversation(
        &mut self,
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
        let mut next = self.counters;
        next.conversation += 1;
        let conv = Conversation {
            id: next.conversation,
            title,
            participants,
            created_at: Micros::now(),
        };
        self.commit(Change::Conversation(&conv), next)?;
        self.metrics.write("conversation");
        Ok(conv)
    }

    fn notify(&mut self, user: String, text: String) -> Result<Notification, WriteError> {
        let mut next = self.counters;
        next.notification += 1;
        let n = Notification {
            id: next.notification,
            user,
            message: text,
            is_read: false,
            timestamp: Micros::now(),
        };
        self.commit(Change::Notifications(std::slice::from_ref(&n)), next)?;
        self.metrics.write("notification");
        self.queue_notification(&n);
        Ok(n)
    }

    fn mark_read(&mut self, user: &str, id: u64) -> Result<Notification, WriteError> {
        let mut n = match self.store.notification(id)? {
            Some(n) if n.user == user => n,
            _ => return Err(WriteError::NotFound),
        };
        if !n.is_read {
            n.is_read = true;
            self.commit(Change::Notifications(std::slice::from_ref(&n)), self.counters)?;
        }
        Ok(n)
    }

    fn read_all(&mut self, user: &str) -> Result<u64, WriteError> {
        let mut changed = Vec::new();
        for id in self.store.unread(user)? {
            if let Some(mut n) = self.store.notification(id)? {
                n.is_read = true;
                changed.push(n);
            }
        }
        if !changed.is_empty() {
            self.commit(Change::Notifications(&changed), self.counters)?;
        }
        Ok(changed.len() as u64)
    }

    /// Flushes the group, then publishes and answers it.
    fn finish_group(&mut self) {
        let mut out = std::mem::take(&mut self.out);
        let mut flush_err = None;
        if out.writes > 0 && !matches!(self.durability, Durability::Interval(_)) {
            let started = Instant::now();
            if let Err(e) = self.store.sync() {
                tracing::error!("store flush failed: {e}");
                flush_err = Some(e);
            }
            self.metrics
                .flush_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics.group_size.observe(out.writes as f64);
        }
        if flush_err.is_none() {
            for (conversation, frames, events) in out.conversations.drain(..) {
                let frames = frames.freeze();
                let n = self.hub.publish_conversation(conversation, &frames);
                self.metrics.deliveries.inc_by(n as u64 * events);
            }
            for (user, frames) in out.users.drain(..) {
                let frames = frames.freeze();
                let n = self.hub.publish_user(&user, &frames);
                self.metrics.deliveries.inc_by(n as u64);
            }
            for (outbox, r) in out.rejections.drain(..) {
                self.reject(&outbox, &r);
            }
        } else {
            // Nothing of this group is shown: its writers hear it failed.
            for (_, frames, _) in out.conversations.drain(..) {
                drop(frames);
            }
            out.failed.extend(out.rejections.drain(..).map(|(o, _)| o));
        }
        for outbox in out.failed.drain(..) {
            self.reject(&outbox, &protocol::UNAVAILABLE);
        }
        for reply in out.replies.drain(..) {
            reply(flush_err.as_ref());
        }
        for r in out.resumes.drain(..) {
            self.resume(r);
        }
        out.index.clear();
        out.users.clear();
        out.user_index.clear();
        out.writes = 0;
        self.out = out;
    }

    fn reject(&mut self, outbox: &Outbox, r: &Rejection) {
        self.metrics.error(r.code.as_str());
        self.scratch.clear();
        protocol::encode_error(&mut self.scratch, r);
        outbox.push_text(&self.scratch);
    }

    fn resume(&mut self, r: Resume) {
        let mut frames = BytesMut::new();
        let (result, reply) = match r {
            Resume::Chat {
                conversation,
                after_seq,
                outbox,
                reply,
            } => {
                let r = self
                    .store
                    .events_after(conversation, after_seq, self.max_replay)
                    .map(|replay| {
                        if let Some(after) = replay.truncated_after {
                            self.scratch.clear();
                            protocol::encode_truncated(&mut self.scratch, after);
                            frame::put_frame(&mut frames, OpCode::Text, &self.scratch);
                        }
                        for e in &replay.items {
                            frame::put_frame(&mut frames, OpCode::Text, &e.payload);
                        }
                        if !frames.is_empty() {
                            outbox.push_unbounded(frames.freeze());
                        }
                        self.hub.join(conversation, &outbox);
                    });
                (r, reply)
            }
            Resume::Notifications { after, outbox, reply } => {
                let r = self
                    .store
                    .notifications_after(&outbox.user, after, self.max_replay)
                    .map(|replay| {
                        if let Some(after) = replay.truncated_after {
                            self.scratch.clear();
                            protocol::encode_truncated(&mut self.scratch, after);
                            frame::put_frame(&mut frames, OpCode::Text, &self.scratch);
                        }
                        for n in &replay.items {
                            self.scratch.clear();
                            protocol::encode_notification(&mut self.scratch, &notification_view(n));
                            frame::put_frame(&mut frames, OpCode::Text, &self.scratch);
                        }
                        if !frames.is_empty() {
                            outbox.push_unbounded(frames.freeze());
                        }
                        self.hub.listen(&outbox);
                    });
                (r, reply)
            }
        };
        let _ = reply.send(result.map_err(WriteError::from));
    }
}

enum ChatError {
    Rejected(Rejection),
    Store(StoreError),
}

impl From<StoreError> for ChatError {
    fn from(e: StoreError) -> Self {
        ChatError::Store(e)
    }
}

pub fn notification_view(n: &Notification) -> NotificationView<'_> {
    NotificationView {
        id: n.id,
        message: &n.message,
        is_read: n.is_read,
        timestamp: Rfc3339(n.timestamp),
    }
}
