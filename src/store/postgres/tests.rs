//! The PostgreSQL backend against a real PostgreSQL, started for the test
//! (tests/support/engines.rs): the conformance suite, then what only a
//! shared database has to get right.

#[path = "../../../tests/support/engines.rs"]
mod engines;

use super::*;

/// A runtime the store's connections live on, as the server's would.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

struct Pg {
    rt: tokio::runtime::Runtime,
    url: String,
}

impl crate::store::conformance::Backend for Pg {
    fn open(&self) -> Box<dyn Store> {
        Box::new(self.rt.block_on(PgStore::open(&self.url)).unwrap())
    }
}

#[test]
fn passes_the_store_conformance_suite() {
    let pg = engines::Postgres::start();
    let backend = Pg {
        rt: runtime(),
        url: pg.new_database(),
    };
    crate::store::conformance::run(&backend);
}

/// Two nodes (two stores on one database) write to the same conversations
/// at once, each group naming them in the opposite order: nobody waits on
/// anybody forever, every event gets its own position, and within each
/// conversation message ids increase with the position (commit order).
#[test]
fn two_nodes_writing_the_same_conversations_keep_one_order() {
    let pg = engines::Postgres::start();
    let rt = runtime();
    let url = pg.new_database();
    let a = rt.block_on(PgStore::open(&url)).unwrap();
    let b = rt.block_on(PgStore::open(&url)).unwrap();
    let convs: Vec<ConversationId> = {
        let mut g = a.begin().unwrap();
        let ids: Vec<_> = (0..3)
            .map(|_| {
                let c = Conversation {
                    id: g.next_conversation().unwrap(),
                    title: None,
                    participants: vec!["alice".into(), "bob".into()],
                    created_at: Micros(1),
                };
                g.apply(Change::Conversation(&c)).unwrap();
                c.id
            })
            .collect();
        g.commit().unwrap();
        ids
    };
    const GROUPS: usize = 60;
    let write = |store: &PgStore, reversed: bool| {
        for i in 0..GROUPS {
            let mut order = convs.clone();
            if reversed {
                order.reverse();
            }
            let plan = Plan {
                conversations: order.clone(),
                new_messages: order.len(),
                ..Plan::default()
            };
            let mut g = store.begin_planned(&plan).unwrap();
            g.notifying(&["bob"], order.len()).unwrap();
            for c in &order {
                let seq = g.next_seq(*c).unwrap();
                let m = Message {
                    id: g.next_message().unwrap(),
                    conversation: *c,
                    sender: "alice".into(),
                    content: format!("{i}"),
                    timestamp: Micros(2),
                    edited: false,
                    deleted: false,
                    seq,
                };
                let n = Notification {
                    id: g.next_notification().unwrap(),
                    user: "bob".into(),
                    message: "new".into(),
                    is_read: false,
                    timestamp: Micros(2),
                };
                g.apply(Change::Chat {
                    message: &m,
                    kind: EventKind::Created,
                    seq,
                    payload: b"{}",
                    notifications: std::slice::from_ref(&n),
                })
                .unwrap();
            }
            g.start_commit().wait().unwrap();
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| write(&a, false));
        s.spawn(|| write(&b, true));
    });
    for c in &convs {
        let replay = pollster::block_on(a.events_after(*c, Seq(0), 10_000)).unwrap();
        let seqs: Vec<u64> = replay.items.iter().map(|e| e.seq.0).collect();
        assert_eq!(
            seqs,
            (1..=2 * GROUPS as u64).collect::<Vec<_>>(),
            "one position per event"
        );
        let ids: Vec<u64> = replay.items.iter().map(|e| e.message.0).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids follow positions: {ids:?}"
        );
    }
    let bob = pollster::block_on(a.notifications_after("bob", NotificationId(0), 10_000)).unwrap();
    assert_eq!(bob.items.len(), 2 * GROUPS * convs.len());
}
