//! The replay-then-live hand-over of Part D, one routine for both topics.
//!
//! Run between two groups, after the previous one is published: since this
//! thread is the only publisher, everything up to now is in the store (and
//! replayed), and everything after reaches the socket live.

use bytes::BytesMut;
use pollster::block_on;

use super::{Resume, WriteError, Writer};
use crate::hub::Topic;
use crate::ids::{NotificationId, Seq};
use crate::protocol;
use crate::store::StoreError;
use crate::wire::{self, OpCode};

impl Writer {
    pub(super) fn resume(&mut self, r: Resume) {
        let Resume {
            topic,
            after,
            outbox,
            reply,
        } = r;
        let result = self.replay(topic, after, &outbox.user).map(|frames| {
            if !frames.is_empty() {
                outbox.push_unbounded(frames.freeze());
            }
            self.w.hub.subscribe(topic, &outbox)
        });
        let _ = reply.send(result.map_err(WriteError::from));
    }

    /// What `topic` logged after `after`, framed: a `resume.truncated`
    /// frame first when more was missed than `--max-replay-events`.
    fn replay(&mut self, topic: Topic, after: u64, user: &str) -> Result<BytesMut, StoreError> {
        let store = &self.w.store;
        let max = self.w.max_replay;
        let mut frames = BytesMut::new();
        let mut put = |json: &[u8]| wire::put_frame(&mut frames, OpCode::Text, json);
        let scratch = &mut self.scratch;
        // The store's reads are async for the sake of network backends;
        // this thread is the blocking boundary, so it waits here.
        match topic {
            Topic::Chat(conversation) => {
                let replay = block_on(store.events_after(conversation, Seq(after), max))?;
                if let Some(after) = replay.truncated_after {
                    scratch.clear();
                    protocol::encode_truncated(scratch, after);
                    put(scratch);
                }
                for e in &replay.items {
                    put(&e.payload);
                }
            }
            Topic::Notifications => {
                let replay = block_on(store.notifications_after(user, NotificationId(after), max))?;
                if let Some(after) = replay.truncated_after {
                    scratch.clear();
                    protocol::encode_truncated(scratch, after);
                    put(scratch);
                }
                for n in &replay.items {
                    scratch.clear();
                    protocol::encode_notification(scratch, &super::notification_view(n));
                    put(scratch);
                }
            }
        }
        Ok(frames)
    }
}
