//! The sequencer on the commit log + sled backend, through power cuts at
//! random moments while clients write through it: every message, edit,
//! deletion, conversation and notification that any socket saw or any
//! writer had acknowledged is there after the restart, ids keep
//! increasing, and a resume replays.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::hub::{Hub, Topic};
use crate::ids::{ConversationId, MessageId, NotificationId, Seq};
use crate::metrics::Metrics;
use crate::outbox::tests::take;
use crate::outbox::Outbox;
use crate::sequencer::{ChatOp, Request, Sequencer, Wiring};
use crate::store::log::{SimulatedDisk, Tear};
use crate::store::{EventKind, Store, WalOptions, WalStore};

fn open(dir: &std::path::Path, options: impl Fn() -> WalOptions) -> WalStore {
    crate::store::reopen(|| WalStore::open(dir, options()))
}

/// A message as its sender last saw it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    conversation: ConversationId,
    content: String,
    deleted: bool,
}

#[derive(Default)]
struct Acked {
    messages: BTreeMap<u64, Seen>,
    notifications: BTreeMap<u64, (String, String)>,
    conversations: Vec<ConversationId>,
}

impl Acked {
    fn max_message(&self) -> u64 {
        self.messages.keys().last().copied().unwrap_or(0)
    }
    fn max_notification(&self) -> u64 {
        self.notifications.keys().last().copied().unwrap_or(0)
    }
}

/// Every acknowledged thing is in `store`, as last seen.
async fn verify(store: &dyn Store, acked: &Acked) {
    for c in &acked.conversations {
        assert!(
            store.conversation(*c).await.unwrap().is_some(),
            "conversation {c:?} lost"
        );
    }
    for (id, seen) in &acked.messages {
        let m = store
            .message(seen.conversation, MessageId(*id))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("message {id} lost"));
        assert_eq!(
            (&m.content, m.deleted),
            (&seen.content, seen.deleted),
            "message {id}"
        );
    }
    for (id, (user, text)) in &acked.notifications {
        let n = store
            .notification(NotificationId(*id))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("notification {id} lost"));
        assert_eq!((&n.user, &n.message), (user, text));
    }
    // A resume from the start replays a creation for every message,
    // in log order.
    for c in &acked.conversations {
        let replay = store.events_after(*c, Seq(0), usize::MAX).await.unwrap();
        let seqs: Vec<u64> = replay.items.iter().map(|e| e.seq.0).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "log order: {seqs:?}");
        let created: std::collections::BTreeSet<u64> = replay
            .items
            .iter()
            .filter(|e| e.kind == EventKind::Created)
            .map(|e| e.message.0)
            .collect();
        for (id, seen) in &acked.messages {
            if seen.conversation == *c {
                assert!(created.contains(id), "message {id} missing from the replay");
            }
        }
    }
}

fn text_frames(outbox: &Outbox) -> Vec<Value> {
    take(outbox)
        .0
        .iter()
        .map(|f| serde_json::from_slice(&f.payload).unwrap())
        .collect()
}

/// Waits for the frame `want` picks out on `outbox` (frames of other
/// senders are skipped); `None` on an error frame, or after `stop` and a
/// while without it.
async fn wait_for(outbox: &Outbox, stop: &AtomicBool, want: impl Fn(&Value) -> bool) -> Option<Value> {
    let mut idle = 0;
    loop {
        for f in text_frames(outbox) {
            if f["type"] == "error" {
                return None;
            }
            if want(&f) {
                return Some(f);
            }
        }
        idle += 1;
        if stop.load(Ordering::Relaxed) && idle > 2000 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One chat client: sends, edits and deletes its own messages one at a
/// time until refused; returns what it saw acknowledged.
async fn chatter(
    seq: Sequencer,
    hub: Arc<Hub>,
    conversation: ConversationId,
    user: &'static str,
    stop: Arc<AtomicBool>,
) -> BTreeMap<u64, Seen> {
    let outbox = Outbox::new(Arc::from(user), 64 << 20);
    let _member = hub.subscribe(Topic::Chat(conversation), &outbox);
    let mut mine: BTreeMap<u64, Seen> = BTreeMap::new();
    for n in 0u64.. {
        let chat = |op| Request::Chat {
            conversation,
            op,
            outbox: outbox.clone(),
        };
        let last = mine.iter().rev().find(|(_, s)| !s.deleted).map(|(id, _)| *id);
        match (n % 5, last) {
            (3, Some(id)) => {
                let text = format!("{user} edit {n}");
                if seq
                    .submit(chat(ChatOp::Edit(MessageId(id), text.clone().into())))
                    .await
                    .is_err()
                {
                    break;
                }
                let edited = wait_for(&outbox, &stop, |f| {
                    f["type"] == "message.edited"
                        && f["message"]["id"] == id
                        && f["message"]["content"] == *text
                });
                if edited.await.is_none() {
                    break;
                }
                mine.get_mut(&id).unwrap().content = text;
            }
            (4, Some(id)) => {
                if seq.submit(chat(ChatOp::Delete(MessageId(id)))).await.is_err() {
                    break;
                }
                let deleted = wait_for(&outbox, &stop, |f| {
                    f["type"] == "message.deleted" && f["message_id"] == id
                });
                if deleted.await.is_none() {
                    break;
                }
                mine.get_mut(&id).unwrap().deleted = true;
            }
            _ => {
                let text = format!("{user} says {n}");
                if seq.submit(chat(ChatOp::Send(text.clone().into()))).await.is_err() {
                    break;
                }
                let Some(f) = wait_for(&outbox, &stop, |f| {
                    f["content"] == *text && f.get("type").is_none()
                })
                .await
                else {
                    break;
                };
                let id = f["id"].as_u64().unwrap();
                mine.insert(
                    id,
                    Seen {
                        conversation,
                        content: text,
                        deleted: false,
                    },
                );
            }
        }
    }
    mine
}

/// Service notifications until refused.
async fn notifier(seq: Sequencer, cycle: u32) -> BTreeMap<u64, (String, String)> {
    let mut acked = BTreeMap::new();
    for n in 0.. {
        let (user, text) = (format!("u{}", n % 3), format!("note {cycle}.{n}"));
        let (u, t) = (user.clone(), text.clone());
        match seq
            .ask(|reply| Request::Notify {
                user: u,
                text: t,
                reply,
            })
            .await
        {
            Ok(note) => {
                acked.insert(note.id.0, (user, text));
            }
            Err(_) => break,
        }
    }
    acked
}

async fn power_cycles(seed: u64, tear: Tear, wipe_sled: bool) {
    let dir = tempfile::tempdir().unwrap();
    let disk = SimulatedDisk::new(seed);
    disk.set_tear(tear);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let options = || WalOptions {
        segment_bytes: 16 << 10,
        // Without checkpoints the log keeps every segment, so sled can
        // be wiped: its unsynced state lost wholesale.
        checkpoint_bytes: if wipe_sled { Some(u64::MAX) } else { None },
        log_dir: Some(disk.dir()),
        ..WalOptions::default()
    };
    let mut acked = Acked::default();
    for cycle in 0..4 {
        let store = Arc::new(open(dir.path(), options));
        verify(&*store, &acked).await;
        let hub = Arc::new(Hub::new());
        let (seq, writer) = Sequencer::start(Wiring::local(
            store.clone(),
            hub.clone(),
            Arc::new(Metrics::new()),
            100_000,
        ))
        .unwrap();
        let conversation = seq
            .ask(|reply| Request::CreateConversation {
                creator: Arc::from("alice"),
                title: None,
                participants: vec!["bob".into(), "carol".into()],
                reply,
            })
            .await
            .expect("a conversation after the restart")
            .id;
        acked.conversations.push(conversation);
        let (before_m, before_n) = (acked.max_message(), acked.max_notification());
        let stop = Arc::new(AtomicBool::new(false));
        let chatters: Vec<_> = ["alice", "bob", "carol"]
            .into_iter()
            .map(|u| tokio::spawn(chatter(seq.clone(), hub.clone(), conversation, u, stop.clone())))
            .collect();
        let notes = tokio::spawn(notifier(seq.clone(), cycle));
        tokio::time::sleep(Duration::from_millis(rng.random_range(30..150))).await;
        disk.cut();
        stop.store(true, Ordering::Relaxed);
        let mut fresh = Acked::default();
        for c in chatters {
            fresh.messages.extend(c.await.unwrap());
        }
        fresh.notifications = notes.await.unwrap();
        assert!(
            !fresh.messages.is_empty() && !fresh.notifications.is_empty(),
            "load ran"
        );
        // Ids kept increasing across the previous restart.
        assert!(*fresh.messages.keys().next().unwrap() > before_m);
        assert!(*fresh.notifications.keys().next().unwrap() > before_n);
        acked.messages.extend(fresh.messages);
        acked.notifications.extend(fresh.notifications);
        // The process dies: its writer and store go away.
        drop(seq);
        writer.join().unwrap();
        drop(hub);
        drop(Arc::into_inner(store).expect("the writer let go of the store"));
        if wipe_sled {
            std::fs::remove_dir_all(dir.path().join("db")).unwrap();
        }
    }
    let store = open(dir.path(), options);
    verify(&store, &acked).await;
    eprintln!(
        "seed {seed} {tear:?} wipe {wipe_sled}: {} messages, {} notifications kept over 4 cuts",
        acked.messages.len(),
        acked.notifications.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_power_cuts_under_load() {
    for seed in 1..=3 {
        power_cycles(seed, Tear::LastPrefix, false).await;
        power_cycles(seed + 10, Tear::Sectors, false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_power_cuts_that_also_lose_sled() {
    for seed in 1..=3 {
        power_cycles(seed + 20, Tear::Sectors, true).await;
    }
}
