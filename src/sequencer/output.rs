//! What one group publishes and answers once it is durable.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;

use super::{Reply, Resume, WriteError};
use crate::hub::{Batch, FanOut, Notes};
use crate::ids::{ConversationId, NotificationId, Seq};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::protocol::{self, Rejection};
use crate::store::StoreError;
use crate::wire::{self, OpCode};

/// A reply waiting for its group's commit; told the commit's error, if any.
type Answer = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// One conversation's events of the group, framed in commit order.
struct Pending {
    conversation: ConversationId,
    frames: BytesMut,
    events: u32,
    last_seq: Seq,
}

/// One user's notifications of the group, framed in commit order.
struct PendingNotes {
    user: Arc<str>,
    frames: BytesMut,
    prev: u64,
    last: u64,
}

/// The group's output, filled while its requests are handled.
#[derive(Default)]
pub(super) struct Output {
    /// Frames per conversation, in accepted order; `index` finds the entry.
    conversations: Vec<Pending>,
    index: HashMap<ConversationId, usize>,
    users: Vec<PendingNotes>,
    /// Finds a user's entry: a message to a large room notifies thousands.
    user_index: HashMap<Arc<str>, usize>,
    /// Error frames for single sockets (`not_found`, `forbidden`,
    /// `unavailable`); sent only after the commit, like everything else.
    /// `None` marks the sender of an accepted chat write: it hears nothing
    /// unless the commit fails, and then `unavailable` like the rest.
    rejections: Vec<(Arc<Outbox>, Option<Rejection>)>,
    replies: Vec<Answer>,
    pub resumes: Vec<Resume>,
    /// Changes applied in this group.
    pub writes: usize,
}

impl Output {
    /// Adds one event's JSON to its conversation's frames.
    pub fn event(&mut self, conversation: ConversationId, seq: Seq, json: &[u8]) {
        let i = *self.index.entry(conversation).or_insert_with(|| {
            self.conversations.push(Pending {
                conversation,
                frames: BytesMut::new(),
                events: 0,
                last_seq: seq,
            });
            self.conversations.len() - 1
        });
        let p = &mut self.conversations[i];
        wire::put_frame(&mut p.frames, OpCode::Text, json);
        p.events += 1;
        p.last_seq = seq;
    }

    /// Adds one notification frame's JSON for `user`; `prev` tells the
    /// user's notification before this group's first one, if known.
    pub fn notification(
        &mut self,
        user: &str,
        id: NotificationId,
        prev: impl FnOnce() -> Option<NotificationId>,
        json: &[u8],
    ) {
        let i = match self.user_index.get(user) {
            Some(&i) => i,
            None => {
                let name: Arc<str> = Arc::from(user);
                self.users.push(PendingNotes {
                    user: name.clone(),
                    frames: BytesMut::new(),
                    prev: prev().map_or(0, |p| p.0),
                    last: id.0,
                });
                self.user_index.insert(name, self.users.len() - 1);
                self.users.len() - 1
            }
        };
        let p = &mut self.users[i];
        wire::put_frame(&mut p.frames, OpCode::Text, json);
        p.last = id.0;
    }

    pub fn reject(&mut self, outbox: Arc<Outbox>, r: Rejection) {
        self.rejections.push((outbox, Some(r)));
    }

    /// A chat write of `outbox`'s user was accepted: if the group's commit
    /// fails, the sender must still hear that it was not kept.
    pub fn accepted(&mut self, outbox: Arc<Outbox>) {
        self.rejections.push((outbox, None));
    }

    /// Answers a REST write after the group's commit: with its result if
    /// the commit held, with `Unavailable` if it did not.
    pub fn answer<T: Send + 'static>(&mut self, reply: Reply<T>, r: Result<T, WriteError>) {
        self.replies.push(Box::new(move |failed: Option<&StoreError>| {
            let r = match (r, failed) {
                (Ok(_), Some(e)) => Err(WriteError::Unavailable(e.clone())),
                (r, _) => r,
            };
            let _ = reply.send(r);
        }));
    }

    /// Publishes the group if it is durable (`failed` is `None`); if not,
    /// nothing of it is shown and every writer hears it failed. Leaves the
    /// resumes for the caller and the buffers' capacity for the next group.
    pub fn deliver(
        &mut self,
        failed: Option<StoreError>,
        fanout: &dyn FanOut,
        metrics: &Metrics,
        scratch: &mut Vec<u8>,
    ) {
        if failed.is_none() {
            for p in self.conversations.drain(..) {
                let batch = Batch {
                    conversation: p.conversation,
                    frames: p.frames.freeze(),
                    events: p.events,
                    last_seq: p.last_seq,
                };
                let n = fanout.publish(&batch);
                metrics.deliveries.inc_by(n as u64 * u64::from(batch.events));
            }
            for p in self.users.drain(..) {
                let notes = Notes {
                    user: p.user,
                    frames: p.frames.freeze(),
                    prev: p.prev,
                    last: p.last,
                };
                let n = fanout.publish_user(&notes);
                metrics.deliveries.inc_by(n as u64);
            }
        } else {
            self.conversations.clear();
            self.users.clear();
            for r in &mut self.rejections {
                r.1 = Some(protocol::UNAVAILABLE);
            }
        }
        for (outbox, r) in self.rejections.drain(..) {
            let Some(r) = r else { continue };
            metrics.error(r.code.as_str());
            scratch.clear();
            protocol::encode_error(scratch, &r);
            outbox.push_text(scratch);
        }
        for reply in self.replies.drain(..) {
            reply(failed.as_ref());
        }
        self.index.clear();
        self.user_index.clear();
        self.writes = 0;
    }
}
