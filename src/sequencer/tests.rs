//! The sequencer on the in-memory backend, seen from where a user sees it:
//! the frames each socket's outbox would write, the answers REST writers
//! get, and what the store keeps.
//!
//! Each test starts a real writer thread with a real [`Hub`], behind a
//! [`Probe`] that records what the writer published (and can hold the
//! writer still, so that a test decides which requests share a group).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};
use smallvec::SmallVec;

use super::*;
use crate::hub::{Batch, FanOut, Hub, Membership, Notes, Presence, Topic};
use crate::ids::Seq;
use crate::outbox::tests::take;
use crate::store::{LoggedEvent, MemoryStore, Message, Page, Replay};
use crate::wire::Closing;

/// The user whose notifications hold the writer (see [`Probe::hold`]).
const GATE: &str = "gate";

/// The hub, with a record of everything published through it and a gate
/// that stops the writer thread while it publishes to [`GATE`].
struct Probe {
    hub: Arc<Hub>,
    batches: Mutex<Vec<Batch>>,
    /// (held, the writer is waiting at the gate)
    gate: Mutex<(bool, bool)>,
    /// A conversation whose presence lookups panic: a bug in one request.
    broken: Mutex<Option<ConversationId>>,
    changed: Condvar,
}

impl Probe {
    fn new(hub: Arc<Hub>) -> Arc<Probe> {
        Arc::new(Probe {
            hub,
            batches: Mutex::new(Vec::new()),
            gate: Mutex::new((false, false)),
            changed: Condvar::new(),
            broken: Mutex::new(None),
        })
    }

    fn batches(&self) -> Vec<Batch> {
        self.batches.lock().unwrap().clone()
    }

    /// Holds the writer thread at its next publish to [`GATE`], so that
    /// what is submitted meanwhile forms the next group.
    async fn hold(&self, seq: &Sequencer) {
        self.gate.lock().unwrap().0 = true;
        let (tx, _rx) = tokio::sync::oneshot::channel();
        seq.submit(Request::Notify {
            user: GATE.into(),
            text: "hold".into(),
            reply: tx,
        })
        .await
        .unwrap();
        let g = self.gate.lock().unwrap();
        let (g, timeout) = self
            .changed
            .wait_timeout_while(g, Duration::from_secs(10), |g| !g.1)
            .unwrap();
        assert!(!timeout.timed_out() && g.1, "the writer never reached the gate");
    }

    fn release(&self) {
        self.gate.lock().unwrap().0 = false;
        self.changed.notify_all();
    }
}

impl FanOut for Probe {
    fn publish(&self, batch: &Batch) -> usize {
        self.batches.lock().unwrap().push(batch.clone());
        self.hub.publish(batch)
    }

    fn publish_user(&self, notes: &Notes) -> usize {
        if &*notes.user == GATE {
            let mut g = self.gate.lock().unwrap();
            g.1 = true;
            self.changed.notify_all();
            while g.0 {
                g = self.changed.wait(g).unwrap();
            }
            g.1 = false;
        }
        self.hub.publish_user(notes)
    }
}

impl Presence for Probe {
    fn absent(
        &self,
        conversation: ConversationId,
        participants: &[Arc<str>],
        sender: &str,
    ) -> SmallVec<[Arc<str>; 4]> {
        if *self.broken.lock().unwrap() == Some(conversation) {
            panic!("a bug in presence (this panic is the test's)");
        }
        self.hub.absent(conversation, participants, sender)
    }
}

/// The in-memory backend, whose commits can be made to fail after every
/// change of the group was applied: a flush that fails.
#[derive(Clone, Default)]
struct Flaky {
    inner: MemoryStore,
    fail_commit: Arc<AtomicBool>,
}

struct FlakyGroup<'a> {
    inner: Box<dyn Group + 'a>,
    fail: bool,
}

impl Group for FlakyGroup<'_> {
    fn conversation(&mut self, id: ConversationId) -> crate::store::Result<Option<Conversation>> {
        self.inner.conversation(id)
    }
    fn message(&mut self, c: ConversationId, id: MessageId) -> crate::store::Result<Option<Message>> {
        self.inner.message(c, id)
    }
    fn notification(&mut self, id: NotificationId) -> crate::store::Result<Option<Notification>> {
        self.inner.notification(id)
    }
    fn unread(&mut self, user: &str) -> crate::store::Result<Vec<NotificationId>> {
        self.inner.unread(user)
    }
    fn next_conversation(&mut self) -> crate::store::Result<ConversationId> {
        self.inner.next_conversation()
    }
    fn next_message(&mut self) -> crate::store::Result<MessageId> {
        self.inner.next_message()
    }
    fn next_notification(&mut self) -> crate::store::Result<NotificationId> {
        self.inner.next_notification()
    }
    fn next_seq(&mut self, c: ConversationId) -> crate::store::Result<Seq> {
        self.inner.next_seq(c)
    }
    fn apply(&mut self, change: Change<'_>) -> crate::store::Result<()> {
        self.inner.apply(change)
    }
    fn commit(self: Box<Self>) -> crate::store::Result<()> {
        if self.fail {
            return Err(StoreError::io(std::io::Error::other("the flush failed")));
        }
        self.inner.commit()
    }
}

#[async_trait]
impl Store for Flaky {
    async fn conversation(&self, id: ConversationId) -> crate::store::Result<Option<Conversation>> {
        self.inner.conversation(id).await
    }
    async fn conversation_exists(&self, id: ConversationId) -> crate::store::Result<bool> {
        self.inner.conversation_exists(id).await
    }
    async fn is_participant(&self, c: ConversationId, user: &str) -> crate::store::Result<bool> {
        self.inner.is_participant(c, user).await
    }
    async fn conversations_of(&self, user: &str) -> crate::store::Result<Vec<Conversation>> {
        self.inner.conversations_of(user).await
    }
    async fn message(&self, c: ConversationId, id: MessageId) -> crate::store::Result<Option<Message>> {
        self.inner.message(c, id).await
    }
    async fn history(
        &self,
        c: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> crate::store::Result<Page<Message>> {
        self.inner.history(c, before, limit).await
    }
    async fn events_after(
        &self,
        c: ConversationId,
        after: Seq,
        max: usize,
    ) -> crate::store::Result<Replay<LoggedEvent>> {
        self.inner.events_after(c, after, max).await
    }
    async fn notification(&self, id: NotificationId) -> crate::store::Result<Option<Notification>> {
        self.inner.notification(id).await
    }
    async fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<NotificationId>,
        limit: usize,
    ) -> crate::store::Result<Page<Notification>> {
        self.inner.notifications(user, unread_only, before, limit).await
    }
    async fn unread_count(&self, user: &str) -> crate::store::Result<u64> {
        self.inner.unread_count(user).await
    }
    async fn notifications_after(
        &self,
        user: &str,
        after: NotificationId,
        max: usize,
    ) -> crate::store::Result<Replay<Notification>> {
        self.inner.notifications_after(user, after, max).await
    }
    fn writable(&self) -> crate::store::Result<()> {
        self.inner.writable()
    }
    fn begin(&self) -> crate::store::Result<Box<dyn Group + '_>> {
        Ok(Box::new(FlakyGroup {
            inner: self.inner.begin()?,
            fail: self.fail_commit.load(Ordering::SeqCst),
        }))
    }
    fn flush(&self) -> crate::store::Result<()> {
        self.inner.flush()
    }
}

/// A running writer and everything around it.
struct Rig {
    store: Flaky,
    hub: Arc<Hub>,
    probe: Arc<Probe>,
    seq: Option<Sequencer>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Rig {
    fn new(max_replay: usize) -> Rig {
        let store = Flaky::default();
        let hub = Arc::new(Hub::new());
        let probe = Probe::new(hub.clone());
        let (seq, thread) = Sequencer::start(Wiring {
            store: Arc::new(store.clone()),
            hub: hub.clone(),
            fanout: probe.clone(),
            presence: probe.clone(),
            metrics: Arc::new(Metrics::new()),
            max_replay,
        })
        .unwrap();
        Rig {
            store,
            hub,
            probe,
            seq: Some(seq),
            thread: Some(thread),
        }
    }

    fn seq(&self) -> &Sequencer {
        self.seq.as_ref().unwrap()
    }

    async fn conversation(&self, creator: &str, others: &[&str]) -> ConversationId {
        let others = others.iter().map(|s| s.to_string()).collect();
        let c = self
            .seq()
            .ask(|reply| Request::CreateConversation {
                creator: Arc::from(creator),
                title: None,
                participants: others,
                reply,
            })
            .await
            .unwrap();
        c.id
    }

    /// A socket of `user` open on `topic`, joined as the socket layer does.
    fn socket(&self, user: &str, topic: Topic) -> Socket {
        let outbox = Outbox::new(Arc::from(user), 1 << 20);
        let membership = self.hub.subscribe(topic, &outbox);
        Socket {
            outbox,
            _membership: Some(membership),
        }
    }

    /// A socket that is not (yet) joined: one asking to resume.
    fn unjoined(&self, user: &str) -> Socket {
        Socket {
            outbox: Outbox::new(Arc::from(user), 1 << 20),
            _membership: None,
        }
    }

    fn chat(&self, c: ConversationId, from: &Socket, op: ChatOp) -> Request {
        Request::Chat {
            conversation: c,
            op,
            outbox: from.outbox.clone(),
        }
    }

    async fn say(&self, c: ConversationId, from: &Socket, op: ChatOp) {
        self.seq().submit(self.chat(c, from, op)).await.unwrap();
    }

    /// Waits until everything submitted before is published and answered:
    /// requests are handled in order, and answers go out after publishing.
    async fn settle(&self) {
        let n = self
            .seq()
            .ask(|reply| Request::ReadAll {
                user: Arc::from("nobody"),
                reply,
            })
            .await
            .unwrap();
        assert_eq!(n, 0);
    }

    async fn resume(&self, socket: &mut Socket, topic: Topic, after: u64) {
        let outbox = socket.outbox.clone();
        let m = self
            .seq()
            .ask(|reply| {
                Request::Resume(Resume {
                    topic,
                    after,
                    outbox,
                    reply,
                })
            })
            .await
            .unwrap();
        assert_eq!(m.topic(), topic);
        socket._membership = Some(m);
    }

    async fn seq_of(&self, c: ConversationId, id: u64) -> u64 {
        self.store.message(c, MessageId(id)).await.unwrap().unwrap().seq.0
    }
}

impl Drop for Rig {
    /// The writer ends once every handle is gone; a test that leaves it
    /// running would hide a writer that hangs.
    fn drop(&mut self) {
        self.probe.release();
        drop(self.seq.take());
        if let Some(t) = self.thread.take() {
            if !std::thread::panicking() {
                t.join().expect("the writer thread ends cleanly");
            }
        }
    }
}

struct Socket {
    outbox: Arc<Outbox>,
    _membership: Option<Membership>,
}

impl Socket {
    /// The JSON of every text frame this socket would write now.
    fn received(&self) -> Vec<Value> {
        let (frames, closing) = take(&self.outbox);
        assert_eq!(closing, None::<Closing>, "the socket was not asked to close");
        frames
            .iter()
            .map(|f| {
                assert_eq!(f.opcode, 0x1, "only text frames");
                serde_json::from_slice(&f.payload).expect("every frame is JSON")
            })
            .collect()
    }
}

fn send(text: &str) -> ChatOp {
    ChatOp::Send(text.into())
}

/// The `code` of each error frame, `None` for anything else.
fn codes(frames: &[Value]) -> Vec<Option<&str>> {
    frames
        .iter()
        .map(|f| (f["type"] == "error").then(|| f["code"].as_str().unwrap()))
        .collect()
}

fn contents(frames: &[Value]) -> Vec<&str> {
    frames.iter().map(|f| f["content"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn a_message_reaches_every_socket_of_the_conversation_once_in_order() {
    let rig = Rig::new(1000);
    let c = rig.conversation("alice", &["bob"]).await;
    let other = rig.conversation("carol", &["dave"]).await;
    let alice = rig.socket("alice", Topic::Chat(c));
    let alice2 = rig.socket("alice", Topic::Chat(c));
    let bob = rig.socket("bob", Topic::Chat(c));
    let dave = rig.socket("dave", Topic::Chat(other));
    for i in 0..5 {
        let from = if i % 2 == 0 { &alice } else { &bob };
        rig.say(c, from, send(&format!("m{i}"))).await;
    }
    rig.settle().await;

    let seen = alice.received();
    assert_eq!(contents(&seen), ["m0", "m1", "m2", "m3", "m4"]);
    let ids: Vec<u64> = seen.iter().map(|f| f["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    assert!(ids[0] > 0);
    assert_eq!(seen[0]["sender"], "alice");
    assert_eq!(seen[1]["sender"], "bob");
    assert!(seen[0]["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(alice2.received(), seen, "every socket, the sender's included");
    assert_eq!(bob.received(), seen);
    assert!(dave.received().is_empty(), "another conversation hears nothing");
    assert!(alice.received().is_empty(), "nothing is sent twice");

    for (i, id) in ids.iter().enumerate() {
        let m = rig
            .store
            .message(c, MessageId(*id))
            .await
            .unwrap()
            .expect("stored");
        assert_eq!(m.content, format!("m{i}"));
        assert!(!m.edited && !m.deleted);
    }
    let history = rig.store.history(c, None, 10).await.unwrap();
    assert_eq!(history.items.len(), 5);
    let published: u32 = rig.probe.batches().iter().map(|b| b.events).sum();
    assert_eq!(published, 5, "each event published once");
}

#[tokio::test]
async fn edits_and_deletes_by_the_sender_are_published() {
    let rig = Rig::new(1000);
    let c = rig.conversation("alice", &["bob"]).await;
    let alice = rig.socket("alice", Topic::Chat(c));
    let bob = rig.socket("bob", Topic::Chat(c));
    rig.say(c, &alice, send("helo")).await;
    rig.settle().await;
    let id = alice.received()[0]["id"].as_u64().unwrap();
    bob.received();

    rig.say(c, &alice, ChatOp::Edit(MessageId(id), "hello".into()))
        .await;
    rig.say(c, &alice, ChatOp::Delete(MessageId(id))).await;
    rig.settle().await;
    let expected = vec![
        json!({"type": "message.edited", "message": {"id": id, "content": "hello"}}),
        json!({"type": "message.deleted", "message_id": id}),
    ];
    assert_eq!(alice.received(), expected);
    assert_eq!(bob.received(), expected);
    let m = rig.store.message(c, MessageId(id)).await.unwrap().unwrap();
    assert!(m.edited && m.deleted);
    assert_eq!(m.content, "hello");
    assert!(rig.store.history(c, None, 10).await.unwrap().items.is_empty());
}

/// One table of Part C's cases for edits and deletes (long: each case
/// sets up its own message).
#[tokio::test]
async fn changing_someone_elses_message_is_answered_to_the_sender_only() {
    let rig = Rig::new(1000);
    let c = rig.conversation("alice", &["bob"]).await;
    let other = rig.conversation("bob", &["carol"]).await;
    let alice = rig.socket("alice", Topic::Chat(c));
    let bob = rig.socket("bob", Topic::Chat(c));
    let bob_elsewhere = rig.socket("bob", Topic::Chat(other));
    rig.say(c, &alice, send("mine")).await;
    rig.say(c, &alice, send("gone soon")).await;
    rig.say(other, &bob_elsewhere, send("in another conversation"))
        .await;
    rig.settle().await;
    let ids: Vec<u64> = alice
        .received()
        .iter()
        .map(|f| f["id"].as_u64().unwrap())
        .collect();
    let elsewhere = bob_elsewhere.received()[0]["id"].as_u64().unwrap();
    bob.received();
    rig.say(c, &alice, ChatOp::Delete(MessageId(ids[1]))).await;
    rig.settle().await;
    alice.received();
    bob.received();

    rig.say(c, &bob, ChatOp::Edit(MessageId(ids[0]), "theirs".into()))
        .await;
    rig.say(c, &bob, ChatOp::Delete(MessageId(ids[0]))).await;
    rig.say(c, &bob, ChatOp::Edit(MessageId(999_999), "x".into()))
        .await;
    rig.say(c, &bob, ChatOp::Delete(MessageId(999_999))).await;
    // Part C: someone else's deleted message is not_found, not forbidden.
    rig.say(c, &bob, ChatOp::Edit(MessageId(ids[1]), "x".into()))
        .await;
    // A message of another conversation is not in this one.
    rig.say(c, &bob, ChatOp::Delete(MessageId(elsewhere))).await;
    // The sender's own deleted message cannot be changed either.
    rig.say(c, &alice, ChatOp::Delete(MessageId(ids[1]))).await;
    rig.settle().await;

    let bob_saw = bob.received();
    assert_eq!(
        codes(&bob_saw),
        [
            Some("forbidden"),
            Some("forbidden"),
            Some("not_found"),
            Some("not_found"),
            Some("not_found"),
            Some("not_found"),
        ]
    );
    assert!(bob_saw.iter().all(|f| f["detail"].is_string()));
    assert_eq!(
        codes(&alice.received()),
        [Some("not_found")],
        "the other user hears nothing of bob's"
    );
    assert!(bob_elsewhere.received().is_empty());
    let m = rig.store.message(c, MessageId(ids[0])).await.unwrap().unwrap();
    assert_eq!((m.content.as_str(), m.edited, m.deleted), ("mine", false, false));
    let m = rig
        .store
        .message(other, MessageId(elsewhere))
        .await
        .unwrap()
        .unwrap();
    assert!(!m.deleted);
    let published: u32 = rig.probe.batches().iter().map(|b| b.events).sum();
    assert_eq!(published, 4, "three messages and one delete; no refused change");
}

#[tokio::test]
async fn notifications_go_to_participants_not_watching_only() {
    let rig = Rig::new(1000);
    let c = rig.conversation("alice", &["bob", "carol"]).await;
    let alice = rig.socket("alice", Topic::Chat(c));
    let _bob = rig.socket("bob", Topic::Chat(c));
    let carol_inbox = rig.socket("carol", Topic::Notifications);
    let bob_inbox = rig.socket("bob", Topic::Notifications);
    let alice_inbox = rig.socket("alice", Topic::Notifications);

    rig.say(c, &alice, send("hi all")).await;
    rig.settle().await;
    let id = alice.received()[0]["id"].as_u64().unwrap();
    let carol_saw = carol_inbox.received();
    assert_eq!(carol_saw.len(), 1, "carol has no chat socket open: {carol_saw:?}");
    let n = &carol_saw[0]["message"];
    assert_eq!(n["message"], "New message from alice");
    assert_eq!(n["is_read"], false);
    assert!(n["id"].as_u64().unwrap() > 0);
    assert!(bob_inbox.received().is_empty(), "bob is watching");
    assert!(alice_inbox.received().is_empty(), "never the sender");
    assert_eq!(rig.store.unread_count("carol").await.unwrap(), 1);
    assert_eq!(rig.store.unread_count("bob").await.unwrap(), 0);
    assert_eq!(rig.store.unread_count("alice").await.unwrap(), 0);

    // Edits and deletes notify nobody, watching or not.
    rig.say(c, &alice, ChatOp::Edit(MessageId(id), "hi, all".into()))
        .await;
    rig.say(c, &alice, ChatOp::Delete(MessageId(id))).await;
    rig.settle().await;
    assert!(carol_inbox.received().is_empty());
    assert_eq!(rig.store.unread_count("carol").await.unwrap(), 1);

    // Once carol watches and bob leaves, it is the other way round.
    let carol = rig.socket("carol", Topic::Chat(c));
    drop(_bob);
    rig.say(c, &carol, send("back")).await;
    rig.settle().await;
    assert_eq!(
        bob_inbox.received()[0]["message"]["message"],
        "New message from carol"
    );
    assert!(carol_inbox.received().is_empty());
    assert!(alice_inbox.received().is_empty());
    assert_eq!(rig.store.unread_count("bob").await.unwrap(), 1);
    assert_eq!(rig.store.unread_count("alice").await.unwrap(), 0);
}

#[tokio::test]
async fn notification_requests_are_answered_after_they_are_stored() {
    let rig = Rig::new(1000);
    let inbox = rig.socket("bob", Topic::Notifications);
    let n = rig
        .seq()
        .ask(|reply| Request::Notify {
            user: "bob".into(),
            text: "ping".into(),
            reply,
        })
        .await
        .unwrap();
    assert_eq!(rig.store.notification(n.id).await.unwrap(), Some(n.clone()));
    assert_eq!(inbox.received()[0]["message"]["id"], n.id.0);
    let read = rig
        .seq()
        .ask(|reply| Request::MarkRead {
            user: Arc::from("alice"),
            id: n.id,
            reply,
        })
        .await;
    assert!(
        matches!(read, Err(WriteError::NotFound)),
        "someone else's: {read:?}"
    );
    for _ in 0..2 {
        let read = rig
            .seq()
            .ask(|reply| Request::MarkRead {
                user: Arc::from("bob"),
                id: n.id,
                reply,
            })
            .await
            .unwrap();
        assert!(read.is_read, "idempotent");
    }
    assert_eq!(rig.store.unread_count("bob").await.unwrap(), 0);
}

/// Socket and REST writers in one failing group (long: it checks every
/// kind of writer, then that the next group works).
#[tokio::test]
async fn a_failed_commit_shows_nothing_and_tells_every_writer() {
    let rig = Rig::new(1000);
    let c = rig.conversation("alice", &["bob", "carol"]).await;
    let alice = rig.socket("alice", Topic::Chat(c));
    let bob = rig.socket("bob", Topic::Chat(c));
    let carol_inbox = rig.socket("carol", Topic::Notifications);
    rig.say(c, &alice, send("first")).await;
    rig.settle().await;
    let first = alice.received()[0]["id"].as_u64().unwrap();
    bob.received();
    carol_inbox.received();
    let before = rig.probe.batches().len();

    // One group, whose flush fails: sends, an edit, a refused edit, REST writes.
    rig.probe.hold(rig.seq()).await;
    rig.store.fail_commit.store(true, Ordering::SeqCst);
    let seq = rig.seq().clone();
    rig.say(c, &alice, send("lost 1")).await;
    rig.say(c, &bob, send("lost 2")).await;
    rig.say(c, &alice, ChatOp::Edit(MessageId(first), "lost edit".into()))
        .await;
    rig.say(c, &bob, ChatOp::Delete(MessageId(first))).await;
    let notify = tokio::spawn(async move {
        seq.ask(|reply| Request::Notify {
            user: "carol".into(),
            text: "lost".into(),
            reply,
        })
        .await
    });
    let seq = rig.seq().clone();
    let create = tokio::spawn(async move {
        seq.ask(|reply| Request::CreateConversation {
            creator: Arc::from("alice"),
            title: None,
            participants: vec![],
            reply,
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    rig.probe.release();
    let notify = notify.await.unwrap();
    let create = create.await.unwrap();
    rig.store.fail_commit.store(false, Ordering::SeqCst);
    rig.settle().await;

    assert!(matches!(notify, Err(WriteError::Unavailable(_))), "{notify:?}");
    assert!(matches!(create, Err(WriteError::Unavailable(_))), "{create:?}");
    assert_eq!(
        codes(&alice.received()),
        [Some("unavailable"), Some("unavailable")],
        "alice's send and edit failed"
    );
    assert_eq!(
        codes(&bob.received()),
        [Some("unavailable"), Some("unavailable")],
        "bob's send failed, and his refused delete is not shown as forbidden: nothing of the group is"
    );
    assert!(carol_inbox.received().is_empty());
    assert_eq!(rig.probe.batches().len(), before, "nothing published");

    // The next group works again.
    rig.say(c, &bob, send("after")).await;
    rig.settle().await;
    let seen = alice.received();
    assert_eq!(contents(&seen), ["after"]);
    assert_eq!(bob.received(), seen);
    assert!(seen[0]["id"].as_u64().unwrap() > first);
}

#[tokio::test]
async fn a_store_that_cannot_be_written_refuses_the_group_but_resumes_go_on() {
    let rig = Rig::new(1000);
    let c = rig.conversation("alice", &["bob"]).await;
    let alice = rig.socket("alice", Topic::Chat(c));
    rig.say(c, &alice, send("kept")).await;
    rig.settle().await;
    let kept = alice.received();

    rig.store.inner.set_failing(true);
    rig.say(c, &alice, send("refused")).await;
    let create = rig
        .seq()
        .ask(|reply| Request::CreateConversation {
            creator: Arc::from("alice"),
            title: None,
            participants: vec![],
            reply,
        })
        .await;
    assert!(matches!(create, Err(WriteError::Unavailable(_))), "{create:?}");
    let read_all = rig
        .seq()
        .ask(|reply| Request::ReadAll {
            user: Arc::from("bob"),
            reply,
        })
        .await;
    assert!(
        matches!(read_all, Err(WriteError::Unavailable(_))),
        "{read_all:?}"
    );
    let mut bob = rig.unjoined("bob");
    rig.resume(&mut bob, Topic::Chat(c), 0).await;
    assert_eq!(bob.received(), kept, "the replay reads what is stored");
    assert_eq!(codes(&alice.received()), [Some("unavailable")]);

    rig.store.inner.set_failing(false);
    rig.say(c, &alice, send("works")).await;
    rig.settle().await;
    assert_eq!(contents(&alice.received()), ["works"]);
    assert_eq!(contents(&bob.received()), ["works"], "the resumed socket is live");
}

#[tokio::test]
async fn a_resume_replays_then_goes_live_with_no_gap_and_no_duplicate() {
    let rig = Rig::new(1000);
    let c = rig.conversation("alice", &["bob"]).await;
    let alice = rig.socket("alice", Topic::Chat(c));
    for i in 0..3 {
        rig.say(c, &alice, send(&format!("before {i}"))).await;
    }
    rig.settle().await;
    let seen = alice.received();
    let first = seen[0]["id"].as_u64().unwrap();
    let after = rig.seq_of(c, first).await;

    // Messages keep coming from another task while bob resumes.
    let seq = rig.seq().clone();
    let writer = alice.outbox.clone();
    let sender = tokio::spawn(async move {
        for i in 0..300 {
            seq.submit(Request::Chat {
                conversation: c,
                op: send(&format!("during {i}")),
                outbox: writer.clone(),
            })
            .await
            .unwrap();
            if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    tokio::task::yield_now().await;
    let mut bob = rig.unjoined("bob");
    rig.resume(&mut bob, Topic::Chat(c), after).await;
    sender.await.unwrap();
    rig.say(c, &alice, send("after")).await;
    rig.settle().await;

    let everything = {
        let mut v = seen.clone();
        v.extend(alice.received());
        v
    };
    let bob_saw = bob.received();
    assert_eq!(
        bob_saw,
        everything[1..].to_vec(),
        "everything after `after`, once, in order"
    );
    assert_eq!(bob_saw.len(), 2 + 300 + 1);
    assert_eq!(bob_saw.last().unwrap()["content"], "after");
}

#[tokio::test]
async fn a_resume_replays_edits_and_deletes_as_they_went_out() {
    let rig = Rig::new(1000);
    let c = rig.conversation("alice", &["bob"]).await;
    let alice = rig.socket("alice", Topic::Chat(c));
    rig.say(c, &alice, send("a")).await;
    rig.settle().await;
    let a = alice.received()[0]["id"].as_u64().unwrap();
    rig.say(c, &alice, send("b")).await;
    rig.say(c, &alice, ChatOp::Edit(MessageId(a), "a2".into())).await;
    rig.say(c, &alice, ChatOp::Delete(MessageId(a))).await;
    rig.settle().await;
    let live = alice.received();
    let mut bob = rig.unjoined("bob");
    rig.resume(&mut bob, Topic::Chat(c), rig.seq_of(c, a).await).await;
    assert_eq!(bob.received(), live);
    let mut from_start = rig.unjoined("bob");
    rig.resume(&mut from_start, Topic::Chat(c), 0).await;
    assert_eq!(from_start.received().len(), 4, "after=0 replays from the start");
}

#[tokio::test]
async fn a_long_absence_replays_the_newest_events_after_a_truncation_mark() {
    let rig = Rig::new(3);
    let c = rig.conversation("alice", &["bob"]).await;
    let alice = rig.socket("alice", Topic::Chat(c));
    for i in 0..6 {
        rig.say(c, &alice, send(&format!("m{i}"))).await;
    }
    rig.settle().await;
    let seen = alice.received();
    let ids: Vec<u64> = seen.iter().map(|f| f["id"].as_u64().unwrap()).collect();

    let mut bob = rig.unjoined("bob");
    rig.resume(&mut bob, Topic::Chat(c), rig.seq_of(c, ids[0]).await)
        .await;
    let bob_saw = bob.received();
    assert_eq!(bob_saw[0], json!({"type": "resume.truncated", "after": ids[2]}));
    assert_eq!(bob_saw[1..], seen[3..], "the newest three");

    // Within the bound: no mark.
    let mut carol = rig.unjoined("bob");
    rig.resume(&mut carol, Topic::Chat(c), rig.seq_of(c, ids[2]).await)
        .await;
    assert_eq!(carol.received(), seen[3..]);

    rig.say(c, &alice, send("live")).await;
    rig.settle().await;
    assert_eq!(contents(&bob.received()), ["live"]);
    assert_eq!(contents(&carol.received()), ["live"]);
}

#[tokio::test]
async fn the_notifications_topic_resumes_the_same_way() {
    let rig = Rig::new(3);
    let mut ids = Vec::new();
    for i in 0..6 {
        let n = rig
            .seq()
            .ask(|reply| Request::Notify {
                user: "bob".into(),
                text: format!("n{i}"),
                reply,
            })
            .await
            .unwrap();
        ids.push(n.id.0);
    }
    // Another user's notifications are never replayed to bob.
    rig.seq()
        .ask(|reply| Request::Notify {
            user: "carol".into(),
            text: "not bob's".into(),
            reply,
        })
        .await
        .unwrap();

    let mut bob = rig.unjoined("bob");
    rig.resume(&mut bob, Topic::Notifications, ids[0]).await;
    let saw = bob.received();
    assert_eq!(saw[0], json!({"type": "resume.truncated", "after": ids[2]}));
    let replayed: Vec<&str> = saw[1..]
        .iter()
        .map(|f| f["message"]["message"].as_str().unwrap())
        .collect();
    assert_eq!(replayed, ["n3", "n4", "n5"]);

    let mut again = rig.unjoined("bob");
    rig.resume(&mut again, Topic::Notifications, ids[3]).await;
    let saw = again.received();
    assert_eq!(saw.len(), 2, "within the bound, no mark: {saw:?}");
    assert_eq!(saw[0]["message"]["id"], ids[4]);

    let seq = rig.seq().clone();
    let live = seq
        .ask(|reply| Request::Notify {
            user: "bob".into(),
            text: "live".into(),
            reply,
        })
        .await
        .unwrap();
    for s in [&bob, &again] {
        let saw = s.received();
        assert_eq!(saw.len(), 1);
        assert_eq!(saw[0]["message"]["id"], live.id.0);
    }
}

#[tokio::test]
async fn a_notification_resume_races_no_live_notification() {
    let rig = Rig::new(1000);
    let seq = rig.seq().clone();
    let first = seq
        .ask(|reply| Request::Notify {
            user: "bob".into(),
            text: "first".into(),
            reply,
        })
        .await
        .unwrap();
    let spam = tokio::spawn(async move {
        for i in 0..200 {
            let (tx, _rx) = tokio::sync::oneshot::channel();
            seq.submit(Request::Notify {
                user: "bob".into(),
                text: format!("{i}"),
                reply: tx,
            })
            .await
            .unwrap();
        }
    });
    tokio::task::yield_now().await;
    let mut bob = rig.unjoined("bob");
    rig.resume(&mut bob, Topic::Notifications, first.id.0).await;
    spam.await.unwrap();
    rig.settle().await;
    let ids: Vec<u64> = bob
        .received()
        .iter()
        .map(|f| f["message"]["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 200);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order, no duplicate");
    assert!(ids[0] > first.id.0);
}

#[tokio::test]
async fn two_thousand_requests_at_once_arrive_in_order() {
    let rig = Rig::new(1000);
    let c = rig.conversation("alice", &["bob"]).await;
    let alice = rig.socket("alice", Topic::Chat(c));
    let bob = rig.socket("bob", Topic::Chat(c));
    // Everything queues while the writer is held, so groups are full.
    rig.probe.hold(rig.seq()).await;
    for i in 0..2000 {
        let from = if i % 3 == 0 { &bob } else { &alice };
        let r = rig.chat(c, from, send(&i.to_string()));
        assert!(rig.seq().try_submit(r).is_ok(), "the queue has room");
    }
    rig.probe.release();
    rig.settle().await;

    let seen = alice.received();
    let expected: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
    assert_eq!(contents(&seen), expected);
    let ids: Vec<u64> = seen.iter().map(|f| f["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(bob.received(), seen);
    let batches: Vec<Batch> = rig
        .probe
        .batches()
        .into_iter()
        .filter(|b| b.conversation == c)
        .collect();
    assert!(
        batches.len() >= 2,
        "more than one group: at most {MAX_GROUP} each"
    );
    assert!(batches.iter().all(|b| b.events as usize <= MAX_GROUP));
    assert!(
        batches.iter().any(|b| b.events > 1),
        "requests queued together share a group"
    );
    assert!(batches.windows(2).all(|w| w[0].last_seq < w[1].last_seq));
}

#[tokio::test]
async fn a_request_that_panics_is_dropped_and_the_rest_of_its_group_goes_on() {
    let rig = Rig::new(1000);
    let c = rig.conversation("alice", &["bob"]).await;
    let broken = rig.conversation("alice", &["bob"]).await;
    let alice = rig.socket("alice", Topic::Chat(c));
    let alice_broken = rig.socket("alice", Topic::Chat(broken));
    *rig.probe.broken.lock().unwrap() = Some(broken);
    rig.probe.hold(rig.seq()).await;
    rig.say(c, &alice, send("before")).await;
    rig.say(broken, &alice_broken, send("panics")).await;
    rig.say(c, &alice, send("after")).await;
    rig.probe.release();
    rig.settle().await;
    assert_eq!(contents(&alice.received()), ["before", "after"]);
    assert!(
        alice_broken.received().is_empty(),
        "the dropped request shows nothing"
    );
    assert!(rig
        .store
        .history(broken, None, 10)
        .await
        .unwrap()
        .items
        .is_empty());

    *rig.probe.broken.lock().unwrap() = None;
    rig.say(broken, &alice_broken, send("fixed")).await;
    rig.settle().await;
    assert_eq!(
        contents(&alice_broken.received()),
        ["fixed"],
        "the writer still runs"
    );
}
