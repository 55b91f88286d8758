//! The one writer: every change to the store goes through here, in one total
//! order, and is delivered only after it is durable.
//!
//! A dedicated thread takes requests in groups (whatever queued up while the
//! previous group was being committed). For each group it begins a store
//! [`Group`], handles each request against it (validation that needs stored
//! state, ids from the backend, one atomic change per write), starts the
//! group's commit (one append + one `fdatasync` for the whole group: group
//! commit, done by the store's log thread), and goes on to the next group
//! while it runs; a group is published and answered only once its commit
//! has returned, and groups are published in order (see `Writer::run`).
//! Each conversation's events of a group are encoded once into one buffer of
//! frames, and that one buffer goes to every socket of the conversation.
//!
//! Because this thread is the only publisher, a resuming socket is replayed
//! and subscribed here, between two groups: nothing can be published between
//! the end of its replay and the start of its live stream.
//!
//! | file | concern |
//! | --- | --- |
//! | `mod.rs` | the requests, the handle, the group loop |
//! | `output.rs` | what a group publishes and answers once it is durable |
//! | `chat.rs` | conversations and their messages (send, edit, delete) |
//! | `notifications.rs` | notifications: service-sent, mark read, read all |
//! | `resume.rs` | the replay-then-live hand-over, for both topics |
//! | `power_cut.rs` | (tests) power cuts under load on the commit log |
//!
//! This thread is the store's one blocking boundary: it calls the store's
//! write side synchronously. Publishing may write to sockets from here (an
//! idle socket is written directly, see [`crate::outbox`]); it never reads
//! from one.

mod chat;
mod notifications;
mod output;
mod resume;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;
use tokio::sync::{mpsc, oneshot};

use crate::hub::{Ask, FanOut, Hub, Membership, Presence, Topic};
use crate::ids::{ConversationId, MessageId, NotificationId};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::protocol;
use crate::store::{Change, Commit, Conversation, Group, Notification, Plan, Store, StoreError};

pub use notifications::notification_view;
use output::Output;

/// Most requests handled under one commit.
const MAX_GROUP: usize = 1024;
/// Requests waiting for the writer; senders wait beyond it (backpressure).
const QUEUE: usize = 16 * 1024;

/// A write that could not be done.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("not found")]
    NotFound,
    #[error("the store cannot be written")]
    Unavailable(#[from] StoreError),
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// What a chat socket asks for, already validated by `protocol`.
#[derive(Debug)]
pub enum ChatOp {
    Send(Box<str>),
    Edit(MessageId, Box<str>),
    Delete(MessageId),
}

pub type Reply<T> = oneshot::Sender<Result<T, WriteError>>;

pub enum Request {
    Chat {
        conversation: ConversationId,
        op: ChatOp,
        /// The sender's socket: its user is the sender, and `not_found` /
        /// `forbidden` go to it only.
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
        id: NotificationId,
        reply: Reply<Notification>,
    },
    ReadAll {
        user: Arc<str>,
        reply: Reply<u64>,
    },
    /// Done after the group is published, so it joins between two groups.
    Resume(Resume),
}

/// A socket that replays what it missed, then goes live (Part D): the
/// chat topic replays the conversation's log after position `after`, the
/// notifications topic the user's notifications with an id above it.
pub struct Resume {
    pub topic: Topic,
    pub after: u64,
    pub outbox: Arc<Outbox>,
    pub reply: Reply<Membership>,
}

/// What the writer writes to and publishes through.
pub struct Wiring {
    pub store: Arc<dyn Store>,
    /// Where resuming sockets join: this node's sockets.
    pub hub: Arc<Hub>,
    /// Where a durable group's output goes.
    pub fanout: Arc<dyn FanOut>,
    /// Who is watching, for who gets a notification.
    pub presence: Arc<dyn Presence>,
    pub metrics: Arc<Metrics>,
    /// `--max-replay-events`.
    pub max_replay: usize,
}

impl Wiring {
    /// One node on its own: its hub is its fan-out and its presence.
    pub fn local(store: Arc<dyn Store>, hub: Arc<Hub>, metrics: Arc<Metrics>, max_replay: usize) -> Wiring {
        Wiring {
            store,
            fanout: hub.clone(),
            presence: hub.clone(),
            hub,
            metrics,
            max_replay,
        }
    }
}

/// The handle sockets and REST handlers submit requests through.
#[derive(Clone)]
pub struct Sequencer {
    tx: mpsc::Sender<Request>,
}

impl Sequencer {
    /// Starts the writer thread; it ends when every handle is dropped, after
    /// a last flush.
    pub fn start(wiring: Wiring) -> std::io::Result<(Sequencer, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = Writer {
            w: wiring,
            participants: HashMap::new(),
            scratch: Vec::with_capacity(1024),
            out: Output::default(),
            spare: Output::default(),
            plan: Plan::default(),
            absent: VecDeque::new(),
        };
        let handle = std::thread::Builder::new()
            .name("parley-sequencer".into())
            .spawn(move || writer.run(rx))?;
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
    w: Wiring,
    /// Participants of recently written conversations (they never change).
    participants: HashMap<ConversationId, Arc<[Arc<str>]>>,
    /// Reused for encoding each event's JSON.
    scratch: Vec<u8>,
    /// The output of the group being handled.
    out: Output,
    /// A delivered group's output, kept for its buffers' capacity.
    spare: Output,
    /// What the group being begun will touch (kept for its capacity).
    plan: Plan,
    /// For each new message of the group, in order: who gets a
    /// notification for it, decided before its ids are asked for.
    /// (`None`: ask again when handling it.)
    absent: VecDeque<Option<SmallVec<[Arc<str>; 4]>>>,
}

/// A group whose commit is in flight, with what it will publish.
struct InFlight {
    commit: Box<dyn Commit>,
    out: Output,
    started: Instant,
}

impl Writer {
    /// The group loop, pipelined: while one group's commit is in flight
    /// (the log thread appending and syncing it), the next group is handled;
    /// then the first is waited for, the second's commit started, and only
    /// then the first published, so that its fan-out overlaps the second's
    /// sync. Groups are published in commit order, each only once durable.
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut requests = Vec::with_capacity(MAX_GROUP);
        let mut in_flight: Option<InFlight> = None;
        loop {
            // Block for requests only when nothing waits to be published.
            if in_flight.is_none() {
                match rx.blocking_recv() {
                    Some(first) => requests.push(first),
                    None => break,
                }
            }
            while requests.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => requests.push(r),
                    Err(_) => break,
                }
            }
            if requests.is_empty() {
                if let Some(f) = in_flight.take() {
                    let r = self.finish(f.commit, f.started);
                    self.deliver(f.out, r);
                }
                continue;
            }
            in_flight = self.group(&mut requests, in_flight);
        }
        if let Some(f) = in_flight.take() {
            let r = self.finish(f.commit, f.started);
            self.deliver(f.out, r);
        }
        if let Err(e) = self.w.store.flush() {
            tracing::error!("final flush failed: {}", e.chain());
        }
    }

    /// One group: begin, handle each request, then (once the previous
    /// group's commit is done) start its commit, publish the previous one,
    /// and hand this one back as the one in flight. A store that cannot take
    /// writes now (disk nearly full, or failed) refuses the group's writes
    /// whole; resumes, which only read, go on. If the previous group's
    /// commit failed, this group (whose reads may have seen it) is refused
    /// too.
    fn group(&mut self, requests: &mut Vec<Request>, mut previous: Option<InFlight>) -> Option<InFlight> {
        // A resume replays what is in the store and then goes live, so it
        // runs before the next group is even handled (a backend may show a
        // change as soon as it is applied): otherwise it would see that
        // group both replayed and live. Resumes are rare; the overlap is
        // given up for them only.
        // Set when the previous group's commit failed: this group's reads
        // may have seen it, so this group is refused too.
        let mut refused = None;
        if let Some(f) = previous.take_if(|f| !f.out.resumes.is_empty()) {
            let r = self.finish(f.commit, f.started);
            refused = r.as_ref().err().cloned();
            self.deliver(f.out, r);
        }
        let store = self.w.store.clone();
        self.plan(requests);
        let begun = store
            .writable()
            .and_then(|()| store.begin_planned(&self.plan))
            .and_then(|mut g| self.notifying(&mut *g, requests).map(|()| g));
        let mut group = match begun {
            Ok(g) => Some(g),
            Err(e) => {
                for r in requests.drain(..) {
                    self.refuse(r, &e);
                }
                None
            }
        };
        if let Some(g) = group.as_deref_mut() {
            for r in requests.drain(..) {
                // A bug that panics on one request must not stop every write
                // of the server: that request is dropped (its caller sees its
                // reply channel close) and the writer goes on.
                let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(g, r)));
                if handled.is_err() {
                    tracing::error!("the sequencer panicked on a request; it was dropped");
                }
            }
        }
        let out = std::mem::replace(&mut self.out, std::mem::take(&mut self.spare));
        let previous = previous.map(|f| {
            let r = self.finish(f.commit, f.started);
            if let Err(e) = &r {
                refused = Some(e.clone());
            }
            (f.out, r)
        });
        let this = match (refused, group) {
            (Some(e), Some(_)) => {
                // Dropped uncommitted: nothing of it is kept or shown.
                self.deliver(out, Err(e));
                None
            }
            (None, Some(g)) if out.writes > 0 => Some(InFlight {
                commit: g.start_commit(),
                out,
                started: Instant::now(),
            }),
            (_, g) => {
                drop(g);
                // Nothing to make durable: published (answers, resumes)
                // after the previous group, keeping the order.
                Some(InFlight {
                    commit: Box::new(NothingToCommit),
                    out,
                    started: Instant::now(),
                })
            }
        };
        if let Some((out, r)) = previous {
            self.deliver(out, r);
        }
        this
    }

    /// What the group will touch, from its requests.
    fn plan(&mut self, requests: &[Request]) {
        let plan = &mut self.plan;
        plan.clear();
        for r in requests {
            match r {
                Request::Chat { conversation, op, .. } => {
                    plan.conversations.push(*conversation);
                    match op {
                        ChatOp::Send(_) => plan.new_messages += 1,
                        ChatOp::Edit(id, _) | ChatOp::Delete(id) => plan.messages.push((*conversation, *id)),
                    }
                }
                Request::MarkRead { id, .. } => plan.notifications.push(*id),
                Request::ReadAll { user, .. } => plan.unread.push(user.to_string()),
                Request::CreateConversation { .. } | Request::Notify { .. } | Request::Resume(_) => {}
            }
        }
    }

    /// Decides who gets a notification in this group (for each new
    /// message, the participants not watching its conversation; each
    /// service notification's user) and tells the group before any of their
    /// ids is asked for.
    fn notifying(&mut self, g: &mut dyn Group, requests: &[Request]) -> Result<(), StoreError> {
        self.absent.clear();
        let mut users: Vec<Arc<str>> = Vec::new();
        let mut count = 0;
        // Each new message: its conversation, the participants, the sender.
        type Send<'a> = (ConversationId, Arc<[Arc<str>]>, &'a str);
        let mut sends: Vec<Send<'_>> = Vec::new();
        for r in requests {
            match r {
                Request::Chat {
                    conversation,
                    op: ChatOp::Send(_),
                    outbox,
                } => {
                    let participants = self.participants(g, *conversation)?;
                    sends.push((*conversation, participants, &outbox.user));
                }
                Request::Notify { user, .. } => {
                    count += 1;
                    users.push(Arc::from(user.as_str()));
                }
                _ => {}
            }
        }
        if !sends.is_empty() {
            let asks: Vec<Ask<'_>> = sends
                .iter()
                .map(|(conversation, participants, sender)| Ask {
                    conversation: *conversation,
                    participants,
                    sender,
                })
                .collect();
            let presence = &self.w.presence;
            // A bug in presence costs those requests (handling each asks
            // again, and drops it then), not the group.
            let answers =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| presence.absent_each(&asks)));
            match answers {
                Ok(answers) => {
                    for absent in answers {
                        count += absent.len();
                        users.extend(absent.iter().cloned());
                        self.absent.push_back(Some(absent));
                    }
                }
                Err(_) => self.absent.extend(sends.iter().map(|_| None)),
            }
        }
        if count == 0 {
            return Ok(());
        }
        let names: Vec<&str> = users.iter().map(|u| &**u).collect();
        g.notifying(&names, count)
    }

    fn handle(&mut self, g: &mut dyn Group, r: Request) {
        match r {
            Request::Chat {
                conversation,
                op,
                outbox,
            } => self.chat(g, conversation, op, outbox),
            Request::CreateConversation {
                creator,
                title,
                participants,
                reply,
            } => {
                let r = self.create_conversation(g, &creator, title, participants);
                self.out.answer(reply, r);
            }
            Request::Notify { user, text, reply } => {
                let r = self.notify(g, user, text);
                self.out.answer(reply, r);
            }
            Request::MarkRead { user, id, reply } => {
                let r = self.mark_read(g, &user, id);
                self.out.answer(reply, r);
            }
            Request::ReadAll { user, reply } => {
                let r = self.read_all(g, &user);
                self.out.answer(reply, r);
            }
            Request::Resume(r) => self.out.resumes.push(r),
        }
    }

    /// Answers a write with `unavailable` without trying it.
    fn refuse(&mut self, r: Request, e: &StoreError) {
        match r {
            Request::Chat { outbox, .. } => self.out.reject(outbox, protocol::UNAVAILABLE),
            Request::CreateConversation { reply, .. } => fail(reply, e),
            Request::Notify { reply, .. } => fail(reply, e),
            Request::MarkRead { reply, .. } => fail(reply, e),
            Request::ReadAll { reply, .. } => fail(reply, e),
            Request::Resume(r) => self.out.resumes.push(r),
        }
    }

    /// The one way a change reaches the store: applied to the group and
    /// counted; durable when the group commits.
    fn apply(&mut self, g: &mut dyn Group, change: Change<'_>, kind: &'static str) -> Result<(), StoreError> {
        g.apply(change)?;
        self.out.writes += 1;
        self.w.metrics.write(kind);
        Ok(())
    }

    /// Waits for a group's commit; the time from its start to here (the
    /// append and `fdatasync`, and whatever overlapped them) is recorded.
    fn finish(&mut self, commit: Box<dyn Commit>, started: Instant) -> Result<(), StoreError> {
        let r = commit.wait();
        let m = &self.w.metrics;
        m.flush_seconds.observe(started.elapsed().as_secs_f64());
        if let Err(e) = &r {
            tracing::error!("store commit failed: {}", e.chain());
        }
        r
    }

    /// Publishes and answers a group (everything of it, if the commit
    /// held; only failures, if it did not), then runs its resumes.
    fn deliver(&mut self, mut out: Output, committed: Result<(), StoreError>) {
        if out.writes > 0 {
            self.w.metrics.group_size.observe(out.writes as f64);
        }
        let delivered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            out.deliver(
                committed.err(),
                &*self.w.fanout,
                &self.w.metrics,
                &mut self.scratch,
            );
            for r in out.resumes.drain(..) {
                self.resume(r);
            }
        }));
        if delivered.is_err() {
            tracing::error!("the sequencer panicked while publishing a group");
            out = Output::default();
        }
        // Its buffers' capacity serves a later group.
        self.spare = out;
    }
}

/// The commit of a group that wrote nothing.
struct NothingToCommit;

impl Commit for NothingToCommit {
    fn wait(self: Box<Self>) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Tells a REST writer its write was refused.
fn fail<T>(reply: Reply<T>, e: &StoreError) {
    let _ = reply.send(Err(WriteError::Unavailable(e.clone())));
}

#[cfg(test)]
mod power_cut;
#[cfg(test)]
mod tests;
