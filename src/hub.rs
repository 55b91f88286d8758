//! Who is listening to what on this node, and handing them bytes.
//!
//! A [`Hub`] maps each conversation to its open chat sockets and each user to
//! their notification sockets. Publishing clones one `Bytes` (already framed,
//! the same for every receiver) into each receiver's bounded [`Outbox`]: no
//! encoding and no allocation per receiver. Nothing here is async, and the
//! hub never touches the store.
//!
//! Two interfaces face the writer side, so that a cluster can put its own
//! implementation in front of this one without the sequencer changing:
//! - [`FanOut`]: where a group's output goes. The local implementation is
//!   the hub itself; across nodes a bus publishes the same [`Batch`] and each
//!   node's subscriber hands it to its own hub.
//! - [`Presence`]: who is watching a conversation, which decides who gets a
//!   notification for a chat message. Locally that is the hub's rooms.
//!
//! A socket joins in exactly one place, [`Hub::subscribe`], and leaves in
//! exactly one place, when its [`Membership`] drops.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use dashmap::DashMap;
use smallvec::SmallVec;

use crate::ids::{ConversationId, Seq};
pub use crate::outbox::Outbox;
use crate::wire::Closing;

/// What a socket is subscribed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Chat(ConversationId),
    Notifications,
}

impl Topic {
    /// The metrics label of a socket on this topic.
    pub fn kind(self) -> &'static str {
        match self {
            Topic::Chat(_) => "chat",
            Topic::Notifications => "notifications",
        }
    }
}

/// One conversation's share of a write group, ready to deliver: every event
/// of the group for that conversation, framed, in commit order, in one
/// buffer that every receiver shares.
#[derive(Debug, Clone)]
pub struct Batch {
    pub conversation: ConversationId,
    pub frames: Bytes,
    /// How many events `frames` holds (deliveries are counted per event).
    pub events: u32,
    /// The log position of the last event in `frames`: a receiver that
    /// knows the position it had can tell whether it missed something.
    pub last_seq: Seq,
}

/// One user's new notifications of a write group, framed in commit order.
#[derive(Debug, Clone)]
pub struct Notes {
    pub user: Arc<str>,
    pub frames: Bytes,
    /// The user's notification before these (0: none, or not known by an
    /// embedded store), and the last of these: a receiver that knows the
    /// last one it had can tell whether it missed something.
    pub prev: u64,
    pub last: u64,
}

/// Where the writer's output goes once it is durable.
pub trait FanOut: Send + Sync {
    /// Hands a conversation's batch to every socket watching it; returns
    /// how many sockets (of this node) it reached.
    fn publish(&self, batch: &Batch) -> usize;
    /// Hands framed notifications to every notification socket of their
    /// user; returns how many sockets (of this node) it reached.
    fn publish_user(&self, notes: &Notes) -> usize;
}

/// Who is watching which conversation.
pub trait Presence: Send + Sync {
    /// The participants other than `sender` with no chat socket open on the
    /// conversation: who gets a notification for a new message.
    fn absent(
        &self,
        conversation: ConversationId,
        participants: &[Arc<str>],
        sender: &str,
    ) -> SmallVec<[Arc<str>; 4]>;

    /// [`Presence::absent`] for each of a group's new messages at once (a
    /// cluster asks Redis once per group, not once per message).
    fn absent_each(&self, asks: &[Ask<'_>]) -> Vec<SmallVec<[Arc<str>; 4]>> {
        asks.iter()
            .map(|a| self.absent(a.conversation, a.participants, a.sender))
            .collect()
    }
}

/// One new message's question to [`Presence`].
pub struct Ask<'a> {
    pub conversation: ConversationId,
    pub participants: &'a [Arc<str>],
    pub sender: &'a str,
}

/// The sockets open on one conversation, and which users they belong to.
#[derive(Default)]
struct Room {
    peers: Vec<Arc<Outbox>>,
    /// Open chat sockets per user: a user with at least one gets no
    /// notification for the conversation's messages.
    watching: HashMap<Arc<str>, u32>,
    /// Removed from the map: a joiner that finds this retries.
    dead: bool,
}

/// A room behind its own lock, so that a fan-out to a big room holds that
/// room only, never a map shard: joins to other rooms go on meanwhile.
type SharedRoom = Arc<Mutex<Room>>;

fn lock(room: &Mutex<Room>) -> MutexGuard<'_, Room> {
    // A room is a list of whole entries; a panic elsewhere cannot leave it
    // half-updated in a way that matters, so poisoning is ignored.
    room.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
pub struct Hub {
    rooms: DashMap<ConversationId, SharedRoom>,
    inboxes: DashMap<Arc<str>, SmallVec<[Arc<Outbox>; 2]>>,
    /// Told when a user starts or stops watching a conversation on this
    /// node (their first socket on it joins, their last leaves): a cluster
    /// shares it with the other nodes.
    watch: OnceLock<WatchHook>,
}

/// `(conversation, user, watching)`, called under the room's lock: it must
/// only hand the change on, never wait.
pub type WatchHook = Box<dyn Fn(ConversationId, &Arc<str>, bool) + Send + Sync>;

/// A socket's place in the hub. Dropping it is the one way to leave.
///
/// Kept at three words (the topic packed into one: conversation ids are
/// positive), because every open socket carries one.
pub struct Membership {
    hub: Arc<Hub>,
    outbox: Arc<Outbox>,
    /// `None` for the notifications topic.
    conversation: Option<NonZeroU64>,
}

impl Membership {
    pub fn topic(&self) -> Topic {
        match self.conversation {
            Some(c) => Topic::Chat(ConversationId(c.get())),
            None => Topic::Notifications,
        }
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        match self.topic() {
            Topic::Chat(id) => self.hub.leave(id, &self.outbox),
            Topic::Notifications => self.hub.unlisten(&self.outbox),
        }
    }
}

impl Hub {
    pub fn new() -> Hub {
        Hub::default()
    }

    /// Joins `outbox` to `topic`: from now on it gets everything published
    /// there. Conversation id 0 does not exist and is never joined.
    pub fn subscribe(self: &Arc<Self>, topic: Topic, outbox: &Arc<Outbox>) -> Membership {
        let conversation = match topic {
            Topic::Chat(id) => {
                self.join(id, outbox);
                Some(NonZeroU64::new(id.get()).expect("conversation ids are positive"))
            }
            Topic::Notifications => {
                self.listen(outbox);
                None
            }
        };
        Membership {
            hub: self.clone(),
            outbox: outbox.clone(),
            conversation,
        }
    }

    fn join(&self, conversation: ConversationId, outbox: &Arc<Outbox>) {
        loop {
            // The map's shard is held only to find the room, never while
            // waiting for the room's lock (a fan-out may hold it).
            let room = self.rooms.entry(conversation).or_default().clone();
            let mut r = lock(&room);
            if r.dead {
                // Emptied and being removed by a leaver: take a fresh one.
                drop(r);
                std::thread::yield_now();
                continue;
            }
            r.peers.push(outbox.clone());
            let n = r.watching.entry(outbox.user.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                if let Some(hook) = self.watch.get() {
                    hook(conversation, &outbox.user, true);
                }
            }
            return;
        }
    }

    fn leave(&self, conversation: ConversationId, outbox: &Arc<Outbox>) {
        let Some(room) = self.room(conversation) else {
            return;
        };
        let mut r = lock(&room);
        if let Some(i) = r.peers.iter().position(|p| Arc::ptr_eq(p, outbox)) {
            r.peers.swap_remove(i);
            if let Some(n) = r.watching.get_mut(&outbox.user) {
                *n -= 1;
                if *n == 0 {
                    r.watching.remove(&outbox.user);
                    if let Some(hook) = self.watch.get() {
                        hook(conversation, &outbox.user, false);
                    }
                }
            }
        }
        if r.peers.is_empty() {
            r.dead = true;
            drop(r);
            self.rooms
                .remove_if(&conversation, |_, cur| Arc::ptr_eq(cur, &room));
        }
    }

    fn listen(&self, outbox: &Arc<Outbox>) {
        self.inboxes
            .entry(outbox.user.clone())
            .or_default()
            .push(outbox.clone());
    }

    fn unlisten(&self, outbox: &Arc<Outbox>) {
        let empty = match self.inboxes.get_mut(&outbox.user) {
            Some(mut list) => {
                if let Some(i) = list.iter().position(|p| Arc::ptr_eq(p, outbox)) {
                    list.swap_remove(i);
                }
                list.is_empty()
            }
            None => false,
        };
        if empty {
            self.inboxes.remove_if(&outbox.user, |_, l| l.is_empty());
        }
    }

    fn room(&self, conversation: ConversationId) -> Option<SharedRoom> {
        self.rooms.get(&conversation).map(|r| r.clone())
    }

    /// Hands `frames` to every socket of the conversation; returns how many.
    pub fn publish_conversation(&self, conversation: ConversationId, frames: &Bytes) -> usize {
        match self.room(conversation) {
            Some(room) => {
                let r = lock(&room);
                for p in &r.peers {
                    p.push(frames.clone());
                }
                r.peers.len()
            }
            None => 0,
        }
    }

    /// Calls `f` on every open socket (shutdown, the idle reaper).
    pub fn each(&self, mut f: impl FnMut(&Arc<Outbox>)) {
        let rooms: Vec<SharedRoom> = self.rooms.iter().map(|r| r.clone()).collect();
        for room in rooms {
            lock(&room).peers.iter().for_each(&mut f);
        }
        for list in self.inboxes.iter() {
            list.iter().for_each(&mut f);
        }
    }

    pub fn close_all(&self, closing: Closing) {
        self.each(|p| p.close(closing));
    }

    /// Sets the hook told when a user starts or stops watching a
    /// conversation here. Set once, before any socket joins.
    pub fn on_watch(&self, hook: WatchHook) {
        let _ = self.watch.set(hook);
    }

    /// Every (conversation, user) watched on this node now.
    pub fn watching(&self) -> Vec<(ConversationId, Arc<str>)> {
        let rooms: Vec<(ConversationId, SharedRoom)> =
            self.rooms.iter().map(|r| (*r.key(), r.clone())).collect();
        let mut out = Vec::new();
        for (c, room) in rooms {
            out.extend(lock(&room).watching.keys().map(|u| (c, u.clone())));
        }
        out
    }

    /// How many sockets of this node are open on `conversation`.
    pub fn listeners(&self, conversation: ConversationId) -> usize {
        self.room(conversation).map_or(0, |room| lock(&room).peers.len())
    }

    /// Whether a socket of this node listens to `topic` (of `user`, for
    /// notifications).
    pub fn is_listened(&self, topic: Topic, user: &str) -> bool {
        match topic {
            Topic::Chat(c) => self.rooms.contains_key(&c),
            Topic::Notifications => self.inboxes.contains_key(user),
        }
    }

    /// Closes every socket of this node on `topic` (of `user`, for
    /// notifications).
    pub fn close_topic(&self, topic: Topic, user: &str, closing: Closing) {
        match topic {
            Topic::Chat(c) => {
                if let Some(room) = self.room(c) {
                    lock(&room).peers.iter().for_each(|p| p.close(closing));
                }
            }
            Topic::Notifications => {
                if let Some(list) = self.inboxes.get(user) {
                    list.iter().for_each(|p| p.close(closing));
                }
            }
        }
    }
}

impl FanOut for Hub {
    fn publish(&self, batch: &Batch) -> usize {
        self.publish_conversation(batch.conversation, &batch.frames)
    }

    fn publish_user(&self, notes: &Notes) -> usize {
        self.publish_notes(&notes.user, &notes.frames)
    }
}

impl Hub {
    /// Hands `frames` to every notification socket of `user`; returns how many.
    pub fn publish_notes(&self, user: &str, frames: &Bytes) -> usize {
        match self.inboxes.get(user) {
            Some(list) => {
                for p in list.iter() {
                    p.push(frames.clone());
                }
                list.len()
            }
            None => 0,
        }
    }
}

impl Presence for Hub {
    fn absent(
        &self,
        conversation: ConversationId,
        participants: &[Arc<str>],
        sender: &str,
    ) -> SmallVec<[Arc<str>; 4]> {
        let room = self.room(conversation);
        let room = room.as_deref().map(lock);
        participants
            .iter()
            .filter(|p| &***p != sender)
            .filter(|p| !room.as_ref().is_some_and(|r| r.watching.contains_key(&***p)))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(user: &str) -> Arc<Outbox> {
        Outbox::new(Arc::from(user), 1 << 20)
    }

    #[test]
    fn a_membership_leaves_when_dropped() {
        let hub = Arc::new(Hub::new());
        let c = ConversationId(7);
        let a = outbox("alice");
        let m = hub.subscribe(Topic::Chat(c), &a);
        assert_eq!(m.topic(), Topic::Chat(c));
        assert_eq!(hub.publish_conversation(c, &Bytes::from_static(b"x")), 1);
        let parts: [Arc<str>; 2] = [Arc::from("alice"), Arc::from("bob")];
        assert_eq!(hub.absent(c, &parts, "bob").len(), 0, "alice watches");
        drop(m);
        assert_eq!(hub.publish_conversation(c, &Bytes::from_static(b"x")), 0);
        assert_eq!(hub.absent(c, &parts, "bob").len(), 1, "nobody watches");
        assert!(hub.rooms.is_empty(), "an empty room is removed");
    }

    #[test]
    fn notifications_reach_every_socket_of_the_user_only() {
        let hub = Arc::new(Hub::new());
        let (a1, a2, b) = (outbox("alice"), outbox("alice"), outbox("bob"));
        let _m = [
            hub.subscribe(Topic::Notifications, &a1),
            hub.subscribe(Topic::Notifications, &a2),
            hub.subscribe(Topic::Notifications, &b),
        ];
        assert_eq!(hub.publish_notes("alice", &Bytes::from_static(b"n")), 2);
        assert_eq!(hub.publish_notes("carol", &Bytes::from_static(b"n")), 0);
    }

    #[test]
    fn joins_and_leaves_from_many_threads_leave_no_ghost() {
        let hub = Arc::new(Hub::new());
        let c = ConversationId(1);
        std::thread::scope(|s| {
            for t in 0..4 {
                let hub = hub.clone();
                s.spawn(move || {
                    for i in 0..2000 {
                        let o = outbox(&format!("u{t}-{i}"));
                        let m = hub.subscribe(Topic::Chat(c), &o);
                        drop(m);
                    }
                });
            }
        });
        assert!(hub.rooms.is_empty());
        let o = outbox("late");
        let _m = hub.subscribe(Topic::Chat(c), &o);
        assert_eq!(hub.publish_conversation(c, &Bytes::from_static(b"x")), 1);
    }
}
